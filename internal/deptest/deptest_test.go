package deptest

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

// forbiddenInCore are standard-library packages the domain core must not
// import directly: they do I/O, escape the type system or reach the OS.
// (Standard packages the core does import may use some of these
// internally, e.g. fmt uses os; only direct imports are checked.)
var forbiddenInCore = []string{
	"os", "os/exec", "os/signal", "os/user",
	"net", "net/http", "net/http/httptest", "net/http/httputil", "net/http/cookiejar", "net/http/pprof",
	"net/rpc", "net/smtp",
	"database/sql", "database/sql/driver",
	"syscall", "io/ioutil", "plugin", "unsafe", "runtime/cgo", "runtime/debug",
	"log/syslog", "crypto/tls", "path/filepath", "embed", "testing",
}

// requireGoFiles skips the test when dir (relative to the module root) has
// no .go files yet: the package is being written. Once it has any, the
// check runs.
func requireGoFiles(t *testing.T, dir string, recursive bool) {
	t.Helper()
	if !HasGoFiles(t, dir, recursive) {
		t.Skipf("%s has no .go files yet", dir)
	}
}

func TestDomainCoreImportsOnlyStdlib(t *testing.T) {
	t.Parallel()
	mod := ModulePath(t)
	for _, dir := range []string{"internal/access", "internal/policy", "internal/audit", "internal/wire"} {
		t.Run(dir, func(t *testing.T) {
			t.Parallel()
			requireGoFiles(t, dir, false)
			for _, v := range coreViolations(mod+"/"+dir, List(t, "-deps", "./"+dir)) {
				t.Error(v)
			}
		})
	}
}

// coreViolations lists what is wrong with the dependencies pkgs (from go
// list -deps) of the domain-core package self.
func coreViolations(self string, pkgs []Package) []string {
	var out []string
	for _, p := range pkgs {
		if p.ImportPath != self {
			if !p.Standard {
				out = append(out, fmt.Sprintf("%s depends on %s, which is not in the standard library", self, p.ImportPath))
			}
			continue
		}
		for _, imp := range p.Imports {
			if slices.Contains(forbiddenInCore, imp) || strings.HasPrefix(imp, "internal/") || strings.HasPrefix(imp, "vendor/") {
				out = append(out, fmt.Sprintf("%s imports %s; the domain core does no I/O", self, imp))
			}
		}
	}
	return out
}

func TestCoreViolations(t *testing.T) {
	t.Parallel()
	const self = "example.com/m/internal/policy"
	tests := []struct {
		name string
		pkgs []Package
		want int
	}{
		{"ok/stdlib only", []Package{
			{ImportPath: self, Imports: []string{"fmt", "net/netip", "time"}},
			{ImportPath: "fmt", Standard: true, Imports: []string{"os"}}, {ImportPath: "os", Standard: true},
		}, 0},
		{"deny/imports os", []Package{{ImportPath: self, Imports: []string{"fmt", "os"}}, {ImportPath: "os", Standard: true}}, 1},
		{"deny/imports net and unsafe", []Package{{ImportPath: self, Imports: []string{"net", "unsafe"}}}, 2},
		{"deny/third-party dep", []Package{{ImportPath: self, Imports: []string{"go.yaml.in/yaml/v3"}}, {ImportPath: "go.yaml.in/yaml/v3"}}, 1},
		{"deny/in-module dep", []Package{{ImportPath: self, Imports: []string{"example.com/m/internal/wgkey"}}, {ImportPath: "example.com/m/internal/wgkey"}}, 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := coreViolations(self, tt.pkgs); len(got) != tt.want {
				t.Errorf("coreViolations = %q, want %d violations", got, tt.want)
			}
		})
	}
}

func TestCLIIsLight(t *testing.T) {
	t.Parallel()
	requireGoFiles(t, "cmd/pinhole", false)
	heavy := []string{"golang.zx2c4.com/wireguard", "gvisor.dev", "modernc.org/sqlite", "github.com/jackc/pgx", "database/sql"}
	for _, dep := range Deps(t, "./cmd/pinhole") {
		for _, h := range heavy {
			if Matches(dep, h) {
				t.Errorf("cmd/pinhole depends on %s (%s must stay out of the CLI)", dep, h)
			}
		}
	}
}

func TestBinariesHaveNoTestAuthenticator(t *testing.T) {
	t.Parallel()
	banned := []string{ModulePath(t) + "/internal/fido/fidotest", "github.com/descope/virtualwebauthn", ModulePath(t) + "/internal/testnet"}
	for _, dir := range []string{"cmd/pinhole", "cmd/pinhole-broker", "cmd/pinhole-agent"} {
		t.Run(dir, func(t *testing.T) {
			t.Parallel()
			requireGoFiles(t, dir, false)
			for _, dep := range Deps(t, "./"+dir) {
				for _, b := range banned {
					if Matches(dep, b) {
						t.Errorf("%s depends on %s, test-only code", dir, dep)
					}
				}
			}
		})
	}
}

func TestBrokerAndAgentDoNotImportEachOther(t *testing.T) {
	t.Parallel()
	mod := ModulePath(t)
	for _, tt := range []struct{ from, to string }{{"broker", "agent"}, {"agent", "broker"}} {
		t.Run(tt.from, func(t *testing.T) {
			t.Parallel()
			requireGoFiles(t, tt.from, true)
			banned := mod + "/" + tt.to
			for _, p := range List(t, "./"+tt.from+"/...") {
				for _, dep := range p.Deps {
					if Matches(dep, banned) {
						t.Errorf("%s depends on %s: %s/... and %s/... must not import each other", p.ImportPath, dep, tt.from, tt.to)
					}
				}
			}
		})
	}
}

func TestHelpers(t *testing.T) {
	t.Parallel()
	mod := ModulePath(t)
	if mod != "github.com/pinhole-dev/pinhole" {
		t.Errorf("ModulePath = %q", mod)
	}
	deps := Deps(t, "./internal/deptest")
	for _, want := range []string{mod + "/internal/deptest", "os/exec", "testing"} {
		if !slices.Contains(deps, want) {
			t.Errorf("Deps(./internal/deptest) lacks %s", want)
		}
	}
	if !HasGoFiles(t, "internal/deptest", false) || HasGoFiles(t, "internal/deptest/no-such-dir", true) {
		t.Error("HasGoFiles is wrong")
	}
	for _, tt := range []struct {
		path, prefix string
		want         bool
	}{
		{"a/b", "a/b", true}, {"a/b/c", "a/b", true}, {"a/bc", "a/b", false}, {"a", "a/b", false},
		{"golang.zx2c4.com/wireguard/wgctrl/wgtypes", "golang.zx2c4.com/wireguard", true},
		{"github.com/jackc/pgx/v5/pgconn", "github.com/jackc/pgx", true},
		{"database/sql/driver", "database/sql", true},
	} {
		if got := Matches(tt.path, tt.prefix); got != tt.want {
			t.Errorf("Matches(%q, %q) = %v", tt.path, tt.prefix, got)
		}
	}
}
