// Package deptest is a test helper that lists a package's dependencies with
// `go list`, so tests can fail when a package imports what it must not (the
// domain core importing I/O, the CLI linking WireGuard, a binary linking the
// test authenticator). It is for tests only and runs the go command found
// on PATH (go test puts its own toolchain first).
package deptest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// listTimeout bounds one go list run.
const listTimeout = 5 * time.Minute

// Package is one package as reported by `go list -e`.
type Package struct {
	// ImportPath is the package's import path.
	ImportPath string
	// Standard reports whether it is in the standard library.
	Standard bool
	// Imports are its direct imports (non-test files).
	Imports []string
	// Deps are all its transitive dependencies (non-test files).
	Deps []string
	// Error is go list's load error for it, or "".
	Error string
}

// ModuleRoot returns the directory of the nearest go.mod at or above the
// current directory, failing the test when there is none.
func ModuleRoot(t testing.TB) string {
	t.Helper()
	dir, err := os.Getwd()
	if err != nil {
		t.Fatalf("deptest: %v", err)
	}
	for {
		if _, err := os.Stat(filepath.Join(dir, "go.mod")); err == nil {
			return dir
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			t.Fatalf("deptest: no go.mod above the working directory")
		}
		dir = parent
	}
}

// ModulePath returns the module path from the root go.mod.
func ModulePath(t testing.TB) string {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(ModuleRoot(t), "go.mod"))
	if err != nil {
		t.Fatalf("deptest: %v", err)
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(strings.TrimSpace(sc.Text()), "module "); ok {
			return strings.Trim(strings.TrimSpace(rest), `"`)
		}
	}
	t.Fatalf("deptest: no module line in go.mod")
	return ""
}

// HasGoFiles reports whether the directory dir (relative to the module
// root) or, when recursive, any directory below it holds a .go file.
func HasGoFiles(t testing.TB, dir string, recursive bool) bool {
	t.Helper()
	root := filepath.Join(ModuleRoot(t), filepath.FromSlash(dir))
	found := false
	errFound := errors.New("found")
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if path != root && (!recursive || strings.HasPrefix(d.Name(), ".") || strings.HasPrefix(d.Name(), "_") || d.Name() == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if strings.HasSuffix(d.Name(), ".go") {
			found = true
			return errFound
		}
		return nil
	})
	if err != nil && !errors.Is(err, errFound) && !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("deptest: walking %s: %v", dir, err)
	}
	return found
}

// Deps returns the import paths of pkg and of everything it depends on,
// standard library included, as `go list -deps` prints them. pkg is an
// import path or a pattern relative to the module root ("./cmd/pinhole").
// The test fails if a package cannot be loaded: a dependency check must
// not pass because loading failed.
func Deps(t testing.TB, pkg string) []string {
	t.Helper()
	var paths []string
	for _, p := range List(t, "-deps", pkg) {
		paths = append(paths, p.ImportPath)
	}
	return paths
}

// List runs `go list -e` with args (flags, then patterns) from the module
// root and returns the packages it reports. The test fails if go list fails
// or reports a package it could not load.
func List(t testing.TB, args ...string) []Package {
	t.Helper()
	const sep = "\x1f"
	format := strings.Join([]string{
		"{{.ImportPath}}", "{{.Standard}}",
		"{{join .Imports \" \"}}", "{{join .Deps \" \"}}",
		"{{if .Error}}{{.Error}}{{end}}{{range .DepsErrors}}{{.}}; {{end}}",
	}, sep)
	ctx, cancel := context.WithTimeout(context.Background(), listTimeout)
	defer cancel()
	cmdArgs := append([]string{"list", "-e", "-f", strings.ReplaceAll(format, "\n", " ") + "\x1e"}, args...)
	cmd := exec.CommandContext(ctx, "go", cmdArgs...)
	cmd.Dir = ModuleRoot(t)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("deptest: go %s: %v\n%s", strings.Join(cmdArgs, " "), err, stderr.String())
	}
	var pkgs []Package
	var loadErrs []string
	for _, rec := range strings.Split(stdout.String(), "\x1e") {
		rec = strings.TrimSpace(rec)
		if rec == "" {
			continue
		}
		f := strings.Split(rec, sep)
		if len(f) != 5 {
			t.Fatalf("deptest: unexpected go list output %q", rec)
		}
		p := Package{ImportPath: f[0], Standard: f[1] == "true", Imports: strings.Fields(f[2]), Deps: strings.Fields(f[3]), Error: strings.TrimSpace(f[4])}
		if p.Error != "" {
			loadErrs = append(loadErrs, fmt.Sprintf("%s: %s", p.ImportPath, p.Error))
		}
		pkgs = append(pkgs, p)
	}
	if len(loadErrs) > 0 {
		t.Fatalf("deptest: go list %s could not load every package:\n%s", strings.Join(args, " "), strings.Join(loadErrs, "\n"))
	}
	if len(pkgs) == 0 {
		t.Fatalf("deptest: go list %s matched no packages\n%s", strings.Join(args, " "), stderr.String())
	}
	return pkgs
}

// Matches reports whether path is prefix or inside it ("a/b" matches "a/b"
// and "a/b/c", not "a/bc").
func Matches(path, prefix string) bool {
	return path == prefix || strings.HasPrefix(path, prefix+"/")
}
