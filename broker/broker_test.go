package broker

import (
	"bytes"
	"context"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// writeRules writes a minimal valid config file into dir and returns its path.
func writeRules(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "pinhole.yaml")
	if err := os.WriteFile(path, []byte("roles: [dba]\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// openAndClose runs Open once, so that dir holds a broker's data.
func openAndClose(t *testing.T, cfg Config) {
	t.Helper()
	b, err := Open(context.Background(), cfg)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
}

func requireMissing(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); err == nil {
		t.Errorf("%s was created for a refused start", path)
	}
}

func TestOpenDataDir(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		rel  string // the data dir, relative to a temporary dir; "" means "data"
		// setup, when set, prepares the data dir at path (which does not
		// exist yet).
		setup    func(t *testing.T, path string)
		wantErr  []string // substrings of the error; nil means success
		wantMode os.FileMode
	}{
		{name: "ok/missing_is_created_0700", wantMode: 0o700},
		{name: "ok/missing_parents_are_created", rel: "a/b/data", wantMode: 0o700},
		{name: "ok/empty_0755_is_tightened", wantMode: 0o700,
			setup: func(t *testing.T, path string) { mkdir(t, path, 0o755) }},
		{name: "ok/empty_1777_is_tightened", wantMode: 0o700,
			setup: func(t *testing.T, path string) { mkdir(t, path, os.ModeSticky|0o777) }},
		{name: "ok/own_data_dir_0700", wantMode: 0o700,
			setup: func(t *testing.T, path string) {
				openAndClose(t, Config{DataDir: path, ConfigFile: writeRules(t, t.TempDir())})
			}},
		{name: "deny/nonempty_1777", wantErr: []string{"mode 1777", "not empty", "dedicated directory"}, wantMode: os.ModeSticky | 0o777,
			setup: func(t *testing.T, path string) {
				mkdir(t, path, os.ModeSticky|0o777)
				touch(t, filepath.Join(path, "someone-elses-file"))
			}},
		{name: "deny/nonempty_0755_like_home", wantErr: []string{"mode 0755", "not empty", "dedicated directory"}, wantMode: 0o755,
			setup: func(t *testing.T, path string) {
				mkdir(t, path, 0o755)
				touch(t, filepath.Join(path, ".profile"))
			}},
		{name: "deny/nonempty_0750_group_readable", wantErr: []string{"mode 0750", "not empty", "dedicated directory"}, wantMode: 0o750,
			setup: func(t *testing.T, path string) {
				mkdir(t, path, 0o750)
				mkdir(t, filepath.Join(path, "keys"), 0o700)
			}},
		{name: "deny/own_data_dir_loosened", wantErr: []string{"mode 0755", "not empty", "dedicated directory"}, wantMode: 0o755,
			setup: func(t *testing.T, path string) {
				openAndClose(t, Config{DataDir: path, ConfigFile: writeRules(t, t.TempDir())})
				if err := os.Chmod(path, 0o755); err != nil {
					t.Fatal(err)
				}
			}},
		{name: "deny/a_file", wantErr: []string{"not a directory"}, wantMode: 0o600,
			setup: func(t *testing.T, path string) { touch(t, path) }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			data := filepath.Join(dir, "data")
			if tc.rel != "" {
				data = filepath.Join(dir, filepath.FromSlash(tc.rel))
			}
			if tc.setup != nil {
				tc.setup(t, data)
			}
			var before string
			if tc.wantErr != nil {
				before = snapshot(t, data)
			}
			b, err := Open(context.Background(), Config{DataDir: data, ConfigFile: writeRules(t, dir)})
			if err == nil {
				b.Close()
			}
			switch {
			case tc.wantErr == nil && err != nil:
				t.Fatalf("Open: %v", err)
			case tc.wantErr != nil && err == nil:
				t.Fatalf("Open succeeded, want an error with %q", tc.wantErr)
			case tc.wantErr != nil:
				for _, w := range append([]string{data}, tc.wantErr...) {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
				if after := snapshot(t, data); after != before {
					t.Errorf("the refused data dir changed:\nbefore: %s\nafter:  %s", before, after)
				}
			}
			fi, err := os.Stat(data)
			if err != nil {
				t.Fatal(err)
			}
			if got := fi.Mode() & (os.ModePerm | os.ModeSticky); got != tc.wantMode {
				t.Errorf("data dir mode = %v, want %v", got, tc.wantMode)
			}
		})
	}
}

func mkdir(t *testing.T, path string, mode os.FileMode) {
	t.Helper()
	if err := os.Mkdir(path, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(path, mode); err != nil {
		t.Fatal(err)
	}
}

func touch(t *testing.T, path string) {
	t.Helper()
	if err := os.WriteFile(path, nil, 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestBadFlagsLeaveDataDirAlone: every flag that can be checked alone is
// checked before the data dir is created and any key is made, by Open
// (bootstrap) and New (serve) alike.
func TestBadFlagsLeaveDataDirAlone(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		modify  func(c *Config)
		wantErr string
	}{
		{"deny/wg_port_70000", func(c *Config) { c.WireGuardPort = 70000 }, "WireGuard port 70000 is out of range"},
		{"deny/wg_port_negative", func(c *Config) { c.WireGuardPort = -1 }, "WireGuard port -1 is out of range"},
		{"deny/wg_host_with_port", func(c *Config) { c.WireGuardHost = "vpn.example:51820" }, `WireGuard host "vpn.example:51820"`},
		{"deny/wg_host_with_space", func(c *Config) { c.WireGuardHost = "vpn example" }, `WireGuard host "vpn example"`},
		{"deny/public_url_http", func(c *Config) { c.PublicURL = "http://pinhole.example" }, "public URL"},
		{"deny/public_url_ip", func(c *Config) { c.PublicURL = "https://192.0.2.1" }, "not an IP address"},
		{"deny/notify_webhook", func(c *Config) { c.NotifyWebhook = "ftp://x/y" }, "notify webhook"},
		{"deny/uapi_name", func(c *Config) { c.UAPIName = "../x" }, "UAPI name"},
		{"deny/witness_in_data_dir", func(c *Config) { c.AuditWitness = filepath.Join(c.DataDir, "w.jsonl") }, "inside the data dir"},
		{"deny/listen", func(c *Config) { c.Listen = "nowhere" }, "listen address"},
	}
	for _, tc := range tests {
		for _, fn := range []struct {
			name string
			open func(context.Context, Config) (*Broker, error)
		}{{"Open", Open}, {"New", New}} {
			t.Run(tc.name+"/"+fn.name, func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				cfg := Config{DataDir: filepath.Join(dir, "data"), ConfigFile: writeRules(t, dir), Listen: "127.0.0.1:0"}
				tc.modify(&cfg)
				b, err := fn.open(context.Background(), cfg)
				if err == nil {
					b.Close()
					t.Fatalf("%s succeeded, want an error with %q", fn.name, tc.wantErr)
				}
				if !strings.Contains(err.Error(), tc.wantErr) {
					t.Errorf("error %q does not say %q", err, tc.wantErr)
				}
				requireMissing(t, cfg.DataDir)
			})
		}
	}
}

func TestAuditWitnessInsideDataDirRefused(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// witness returns the witness path and the data dir to use, given a
		// data dir that already holds a broker's keys and store.
		witness func(t *testing.T, data string) (witness, dataDir string)
		wantErr string // "" means success
	}{
		{"deny/user_ca_key", func(t *testing.T, data string) (string, string) {
			return filepath.Join(data, "keys", "ssh_user_ca"), data
		}, "inside the data dir"},
		{"deny/store", func(t *testing.T, data string) (string, string) {
			return filepath.Join(data, "pinhole.db"), data
		}, "inside the data dir"},
		{"deny/data_dir_itself", func(t *testing.T, data string) (string, string) {
			return data, data
		}, "inside the data dir"},
		{"deny/new_file_in_data_dir", func(t *testing.T, data string) (string, string) {
			return filepath.Join(data, "recordings", "witness.jsonl"), data
		}, "inside the data dir"},
		{"deny/dotdot_into_data_dir", func(t *testing.T, data string) (string, string) {
			return filepath.Join(data, "..", "elsewhere", "..", filepath.Base(data), "pinhole.db"), data
		}, "inside the data dir"},
		{"deny/through_symlinked_dir", func(t *testing.T, data string) (string, string) {
			link := filepath.Join(t.TempDir(), "link")
			symlink(t, data, link)
			return filepath.Join(link, "keys", "ssh_user_ca"), data
		}, "inside the data dir"},
		{"deny/symlink_to_data_file", func(t *testing.T, data string) (string, string) {
			link := filepath.Join(t.TempDir(), "witness.jsonl")
			symlink(t, filepath.Join(data, "pinhole.db"), link)
			return link, data
		}, "inside the data dir"},
		{"deny/dangling_symlink_into_data_dir", func(t *testing.T, data string) (string, string) {
			link := filepath.Join(t.TempDir(), "witness.jsonl")
			symlink(t, filepath.Join(data, "new.jsonl"), link)
			return link, data
		}, "audit witness"},
		{"deny/data_dir_given_through_symlink", func(t *testing.T, data string) (string, string) {
			link := filepath.Join(t.TempDir(), "data-link")
			symlink(t, data, link)
			return filepath.Join(data, "pinhole.db"), link
		}, "inside the data dir"},
		{"ok/outside_data_dir", func(t *testing.T, data string) (string, string) {
			return filepath.Join(t.TempDir(), "witness.jsonl"), data
		}, ""},
		{"ok/sibling_with_data_dir_prefix", func(t *testing.T, data string) (string, string) {
			return data + "-witness.jsonl", data
		}, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			data := filepath.Join(dir, "data")
			rules := writeRules(t, dir)
			openAndClose(t, Config{DataDir: data, ConfigFile: rules})
			witness, dataDir := tc.witness(t, data)
			before := snapshot(t, data)
			b, err := Open(context.Background(), Config{DataDir: dataDir, ConfigFile: rules, AuditWitness: witness})
			if err == nil {
				b.Close()
			}
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("Open: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("witness %s accepted", witness)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("error %q does not say %q", err, tc.wantErr)
			}
			if tc.wantErr == "inside the data dir" && !strings.Contains(err.Error(), "cannot rewrite") {
				t.Errorf("error %q does not say why", err)
			}
			if after := snapshot(t, data); after != before {
				t.Errorf("the data dir changed:\nbefore: %s\nafter:  %s", before, after)
			}
		})
	}
}

func symlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// snapshot describes every file under dir by name, size and content, so
// that an append anywhere shows.
func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.Walk(dir, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		b.WriteString(path + " " + fi.Mode().String())
		if fi.Mode().IsRegular() {
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			b.WriteString(" " + string(bytes.ReplaceAll(data, []byte("\n"), []byte(`\n`))))
		}
		b.WriteString("; ")
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

func TestConfigFileMustBeRegular(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		config  func(t *testing.T, dir string) string
		wantErr string // "" means success
	}{
		{"ok/regular", func(t *testing.T, dir string) string { return writeRules(t, dir) }, ""},
		{"ok/symlink_to_regular", func(t *testing.T, dir string) string {
			link := filepath.Join(dir, "link.yaml")
			symlink(t, writeRules(t, dir), link)
			return link
		}, ""},
		{"deny/fifo", func(t *testing.T, dir string) string { return fifo(t, dir) }, "not a regular file (it is a FIFO)"},
		{"deny/symlink_to_fifo", func(t *testing.T, dir string) string {
			link := filepath.Join(dir, "link.yaml")
			symlink(t, fifo(t, dir), link)
			return link
		}, "not a regular file (it is a FIFO)"},
		{"deny/directory_1777", func(t *testing.T, dir string) string {
			d := filepath.Join(dir, "tmp")
			mkdir(t, d, os.ModeSticky|0o777)
			return d
		}, "not a regular file (it is a directory)"},
		{"deny/device", func(t *testing.T, dir string) string { return os.DevNull }, "not a regular file (it is a character device)"},
		{"deny/writable_by_others", func(t *testing.T, dir string) string {
			path := writeRules(t, dir)
			if err := os.Chmod(path, 0o666); err != nil {
				t.Fatal(err)
			}
			return path
		}, "writable by others"},
		{"deny/missing", func(t *testing.T, dir string) string { return filepath.Join(dir, "missing.yaml") }, "no such file"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			cfg := Config{DataDir: filepath.Join(dir, "data"), ConfigFile: tc.config(t, dir)}
			type result struct {
				b   *Broker
				err error
			}
			done := make(chan result, 1)
			go func() {
				b, err := Open(context.Background(), cfg)
				done <- result{b, err}
			}()
			var r result
			select {
			case r = <-done:
			case <-time.After(20 * time.Second):
				t.Fatalf("Open of config %s has not returned after 20 s", cfg.ConfigFile)
			}
			if r.err == nil {
				r.b.Close()
			}
			if tc.wantErr == "" {
				if r.err != nil {
					t.Fatalf("Open: %v", r.err)
				}
				return
			}
			if r.err == nil {
				t.Fatalf("config %s accepted", cfg.ConfigFile)
			}
			if !strings.Contains(r.err.Error(), tc.wantErr) || !strings.Contains(r.err.Error(), cfg.ConfigFile) {
				t.Errorf("error %q does not name the config file and say %q", r.err, tc.wantErr)
			}
			requireMissing(t, cfg.DataDir)
		})
	}
}

func fifo(t *testing.T, dir string) string {
	t.Helper()
	path := filepath.Join(dir, "fifo.yaml")
	if err := syscall.Mkfifo(path, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

// TestCertificateMustFitPublicURL: the certificate made on first start
// names the public URL's host; the host of the first public URL is
// pinned as the WebAuthn RP ID; a later start under another host is refused,
// and so is a certificate that does not name the public URL's host.
func TestCertificateMustFitPublicURL(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		first     string // public URL of the first start
		second    string // public URL of the second start
		removeTLS bool   // remove DATA/tls between the starts
		removePin bool   // remove DATA/rp_id between the starts (a data dir from before the pin)
		wantErr   []string
		wantNames []string // DNS names of the certificate served on the second start
	}{
		{name: "ok/same_host_other_port", first: "https://pinhole.example:8443", second: "https://pinhole.example:9443",
			wantNames: []string{"pinhole.example", "localhost"}},
		{name: "ok/default_then_default", first: "", second: "",
			wantNames: []string{"localhost"}},
		// The pinned RP ID refuses any change of host, even to one the
		// certificate names: keys registered under the first would not work.
		{name: "deny/back_to_localhost", first: "https://pinhole.example:8443", second: "",
			wantErr: []string{"bound to the host pinhole.example", "now names localhost", "fresh data dir"}},
		{name: "deny/new_host", first: "", second: "https://pinhole.example:8443",
			wantErr: []string{"bound to the host localhost", "now names pinhole.example"}},
		{name: "deny/other_host", first: "https://pinhole.example:8443", second: "https://other.example:8443",
			wantErr: []string{"bound to the host pinhole.example", "now names other.example"}},
		// Without a pin, the certificate check still refuses a host it does
		// not name.
		{name: "deny/new_host_no_pin", first: "", second: "https://pinhole.example:8443", removePin: true,
			wantErr: []string{"pinhole.example", "localhost, 127.0.0.1, ::1", "remove", "tls", "Security keys are bound", "registered again"}},
		{name: "ok/new_host_after_removing_tls_and_pin", first: "", second: "https://pinhole.example:8443", removeTLS: true, removePin: true,
			wantNames: []string{"pinhole.example", "localhost"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			cfg := Config{DataDir: filepath.Join(dir, "data"), ConfigFile: writeRules(t, dir), Listen: "127.0.0.1:0", PublicURL: tc.first}
			b, err := New(context.Background(), cfg)
			if err != nil {
				t.Fatalf("first start: %v", err)
			}
			b.Close()
			if tc.removeTLS {
				if err := os.RemoveAll(filepath.Join(cfg.DataDir, "tls")); err != nil {
					t.Fatal(err)
				}
			}
			if tc.removePin {
				if err := os.Remove(filepath.Join(cfg.DataDir, "rp_id")); err != nil {
					t.Fatal(err)
				}
			}
			cfg.PublicURL = tc.second
			b, err = New(context.Background(), cfg)
			if err == nil {
				defer b.Close()
			}
			if tc.wantErr != nil {
				if err == nil {
					t.Fatalf("second start under %s succeeded", tc.second)
				}
				for _, w := range tc.wantErr {
					if !strings.Contains(err.Error(), w) {
						t.Errorf("error %q does not say %q", err, w)
					}
				}
				return
			}
			if err != nil {
				t.Fatalf("second start: %v", err)
			}
			got := servedCert(t, b.CAFile)
			if strings.Join(got.DNSNames, ",") != strings.Join(tc.wantNames, ",") {
				t.Errorf("certificate DNS names = %v, want %v", got.DNSNames, tc.wantNames)
			}
		})
	}
}

func servedCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		t.Fatalf("%s holds no PEM", path)
	}
	c, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
