package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestRefusedBeforeDataDir: a bad flag or config file is refused with a
// message on stderr, and the data dir is neither created nor given keys.
func TestRefusedBeforeDataDir(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// args are the command and its flags after --data DATA --config
		// CONFIG; "DATA" in them is replaced by the data dir.
		args       []string
		config     func(t *testing.T, dir string) string // nil means a valid config file
		wantCode   int
		wantStderr string
	}{
		{name: "deny/bootstrap_bad_admin_name", args: []string{"bootstrap", "--admin", "Ada Lovelace"},
			wantCode: 2, wantStderr: `--admin "Ada Lovelace": use 1-63 lower-case letters`},
		{name: "deny/bootstrap_admin_starting_with_digit", args: []string{"bootstrap", "--admin", "1ada"},
			wantCode: 2, wantStderr: `--admin "1ada"`},
		{name: "deny/bootstrap_no_admin", args: []string{"bootstrap"},
			wantCode: 2, wantStderr: "--admin is required"},
		{name: "deny/bootstrap_bad_public_url", args: []string{"bootstrap", "--admin", "ada", "--public-url", "http://pinhole.example"},
			wantCode: 1, wantStderr: "public URL"},
		{name: "deny/serve_wg_port_70000", args: []string{"serve", "--wg-port", "70000"},
			wantCode: 1, wantStderr: "WireGuard port 70000 is out of range"},
		{name: "deny/serve_witness_in_data_dir", args: []string{"serve", "--audit-witness", "DATA/keys/ssh_user_ca"},
			wantCode: 1, wantStderr: "inside the data dir"},
		{name: "deny/serve_config_fifo", args: []string{"serve"}, config: mkfifo,
			wantCode: 1, wantStderr: "not a regular file (it is a FIFO)"},
		{name: "deny/bootstrap_config_dir", args: []string{"bootstrap", "--admin", "ada"},
			config:   func(t *testing.T, dir string) string { return dir },
			wantCode: 1, wantStderr: "not a regular file (it is a directory)"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			data := filepath.Join(dir, "data")
			config := filepath.Join(dir, "pinhole.yaml")
			if tc.config != nil {
				config = tc.config(t, dir)
			} else if err := os.WriteFile(config, []byte("roles: [dba]\n"), 0o600); err != nil {
				t.Fatal(err)
			}
			args := []string{tc.args[0], "--data", data, "--config", config, "--listen", "127.0.0.1:0"}
			for _, a := range tc.args[1:] {
				args = append(args, strings.ReplaceAll(a, "DATA", data))
			}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			var stdout, stderr bytes.Buffer
			code := make(chan int, 1)
			go func() { code <- run(ctx, args, &stdout, &stderr) }()
			select {
			case got := <-code:
				if got != tc.wantCode {
					t.Errorf("exit code = %d, want %d (stderr: %s)", got, tc.wantCode, stderr.String())
				}
			case <-time.After(30 * time.Second):
				t.Fatalf("pinhole-broker %v has not returned after 30 s", args)
			}
			if !strings.Contains(stderr.String(), tc.wantStderr) {
				t.Errorf("stderr %q does not say %q", stderr.String(), tc.wantStderr)
			}
			if _, err := os.Lstat(data); err == nil {
				t.Errorf("the data dir %s was created for a refused start", data)
			}
		})
	}
}

func mkfifo(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "fifo.yaml")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestBootstrapCreatesDataDir: a valid bootstrap makes the data dir 0700
// and prints the first admin's invite link.
func TestBootstrapCreatesDataDir(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	config := filepath.Join(dir, "pinhole.yaml")
	if err := os.WriteFile(config, []byte("roles: [dba]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	if code := run(context.Background(), []string{"bootstrap", "--data", data, "--config", config, "--admin", "ada"}, &stdout, &stderr); code != 0 {
		t.Fatalf("exit code %d, stderr: %s", code, stderr.String())
	}
	if !strings.Contains(stdout.String(), "first admin ada created") {
		t.Errorf("stdout %q has no invite", stdout.String())
	}
	fi, err := os.Stat(data)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o700 {
		t.Errorf("data dir mode = %v, want 0700", fi.Mode().Perm())
	}
}
