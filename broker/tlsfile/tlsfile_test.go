package tlsfile_test

import (
	"bytes"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pinhole-dev/pinhole/broker/tlsfile"
)

var now = time.Date(2031, 5, 6, 7, 8, 9, 0, time.UTC)

func leaf(t *testing.T, der [][]byte) *x509.Certificate {
	t.Helper()
	if len(der) != 1 {
		t.Fatalf("chain has %d certificates, want 1", len(der))
	}
	c, err := x509.ParseCertificate(der[0])
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func mode(t *testing.T, path string) os.FileMode {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Mode().Perm()
}

func TestCreateAndReload(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "data", "tls")
	hosts := []string{"localhost", "pinhole.example.com", "127.0.0.1", "::1", ""}

	got, certPath, err := tlsfile.LoadOrCreate(dir, hosts, now)
	if err != nil {
		t.Fatalf("LoadOrCreate: %v", err)
	}
	if want := filepath.Join(dir, "cert.pem"); certPath != want {
		t.Errorf("cert path = %q, want %q", certPath, want)
	}
	if m := mode(t, filepath.Join(dir, "key.pem")); m != 0o600 {
		t.Errorf("key mode = %v, want 0600", m)
	}
	if m := mode(t, dir); m != 0o700 {
		t.Errorf("directory mode = %v, want 0700", m)
	}

	c := leaf(t, got.Certificate)
	if d := cmp.Diff([]string{"localhost", "pinhole.example.com"}, c.DNSNames); d != "" {
		t.Errorf("DNS SANs (-want +got):\n%s", d)
	}
	var ips []string
	for _, ip := range c.IPAddresses {
		ips = append(ips, ip.String())
	}
	if d := cmp.Diff([]string{"127.0.0.1", "::1"}, ips); d != "" {
		t.Errorf("IP SANs (-want +got):\n%s", d)
	}
	if !c.NotBefore.Before(now) || !c.NotAfter.After(now.AddDate(1, 0, 0)) {
		t.Errorf("validity %s..%s does not cover %s and the next year", c.NotBefore, c.NotAfter, now)
	}

	// Agents pin cert.pem as their root; it must verify for every SAN.
	pemBytes, err := os.ReadFile(certPath)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(pemBytes) {
		t.Fatal("cert.pem holds no certificate")
	}
	for _, name := range []string{"localhost", "pinhole.example.com", "127.0.0.1", "::1"} {
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, DNSName: name, CurrentTime: now, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}); err != nil {
			t.Errorf("verify for %s: %v", name, err)
		}
	}
	if _, err := c.Verify(x509.VerifyOptions{Roots: roots, DNSName: "evil.example.com", CurrentTime: now}); err == nil {
		t.Error("verify for a name not in the SANs succeeded")
	}

	// Reload: the same certificate and key, whatever hosts and time are passed.
	again, certPath2, err := tlsfile.LoadOrCreate(dir, []string{"other.example"}, now.AddDate(0, 1, 0))
	if err != nil {
		t.Fatalf("reload: %v", err)
	}
	if certPath2 != certPath {
		t.Errorf("reload cert path = %q, want %q", certPath2, certPath)
	}
	if !bytes.Equal(again.Certificate[0], got.Certificate[0]) {
		t.Error("reload returned a different certificate")
	}
	if !again.PrivateKey.(interface{ Equal(crypto.PrivateKey) bool }).Equal(got.PrivateKey) {
		t.Error("reload returned a different key")
	}
}

func TestRefusesOpenKey(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		mode os.FileMode
	}{
		{"deny/world_readable", 0o644},
		{"deny/group_readable", 0o640},
		{"deny/group_writable", 0o620},
		{"deny/other_executable", 0o601},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			if _, _, err := tlsfile.LoadOrCreate(dir, []string{"localhost"}, now); err != nil {
				t.Fatal(err)
			}
			keyPath := filepath.Join(dir, "key.pem")
			if err := os.Chmod(keyPath, tc.mode); err != nil {
				t.Fatal(err)
			}
			_, _, err := tlsfile.LoadOrCreate(dir, []string{"localhost"}, now)
			if err == nil {
				t.Fatalf("key with mode %v accepted", tc.mode)
			}
			if !strings.Contains(err.Error(), keyPath) || !strings.Contains(err.Error(), "0600") {
				t.Errorf("error %q does not name the key file and the required mode", err)
			}
		})
	}
}

func TestBrokenFiles(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		breakFiles func(t *testing.T, dir string)
	}{
		{"deny/key_missing", func(t *testing.T, dir string) {
			if err := os.Remove(filepath.Join(dir, "key.pem")); err != nil {
				t.Fatal(err)
			}
		}},
		{"deny/key_garbage", func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, "key.pem"), []byte("not a key"), 0o600); err != nil {
				t.Fatal(err)
			}
		}},
		{"deny/cert_garbage", func(t *testing.T, dir string) {
			if err := os.WriteFile(filepath.Join(dir, "cert.pem"), []byte("not a cert"), 0o644); err != nil {
				t.Fatal(err)
			}
		}},
		{"deny/key_of_another_cert", func(t *testing.T, dir string) {
			other := t.TempDir()
			if _, _, err := tlsfile.LoadOrCreate(other, []string{"localhost"}, now); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(filepath.Join(other, "key.pem"))
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "key.pem"), b, 0o600); err != nil {
				t.Fatal(err)
			}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			if _, _, err := tlsfile.LoadOrCreate(dir, []string{"localhost"}, now); err != nil {
				t.Fatal(err)
			}
			tc.breakFiles(t, dir)
			if _, _, err := tlsfile.LoadOrCreate(dir, []string{"localhost"}, now); err == nil {
				t.Fatal("LoadOrCreate succeeded over broken files")
			}
		})
	}
}

func TestIPOnlyHosts(t *testing.T) {
	t.Parallel()
	c, _, err := tlsfile.LoadOrCreate(t.TempDir(), []string{"192.0.2.10"}, now)
	if err != nil {
		t.Fatal(err)
	}
	l := leaf(t, c.Certificate)
	if len(l.DNSNames) != 0 || len(l.IPAddresses) != 1 || !l.IPAddresses[0].Equal(net.ParseIP("192.0.2.10")) {
		t.Errorf("SANs = %v %v, want only IP 192.0.2.10", l.DNSNames, l.IPAddresses)
	}
}

func TestCheckHost(t *testing.T) {
	t.Parallel()
	c, _, err := tlsfile.LoadOrCreate(t.TempDir(), []string{"pinhole.example.com", "localhost", "127.0.0.1", "::1"}, now)
	if err != nil {
		t.Fatal(err)
	}
	unparsed := c
	unparsed.Leaf = nil
	tests := []struct {
		name    string
		host    string
		wantErr string // "" means valid
	}{
		{"ok/public_name", "pinhole.example.com", ""},
		{"ok/public_name_other_case", "Pinhole.Example.COM", ""},
		{"ok/localhost", "localhost", ""},
		{"ok/ipv4", "127.0.0.1", ""},
		{"ok/ipv6", "::1", ""},
		{"deny/other_name", "other.example.com", "the TLS certificate is for pinhole.example.com, localhost, 127.0.0.1, ::1, not for other.example.com"},
		{"deny/subdomain", "www.pinhole.example.com", "not for www.pinhole.example.com"},
		{"deny/other_ip", "192.0.2.10", "not for 192.0.2.10"},
	}
	for _, tc := range tests {
		for _, cert := range []struct {
			name string
			c    tls.Certificate
		}{{"leaf", c}, {"no_leaf", unparsed}} {
			t.Run(tc.name+"/"+cert.name, func(t *testing.T) {
				t.Parallel()
				err := tlsfile.CheckHost(cert.c, tc.host)
				switch {
				case tc.wantErr == "" && err != nil:
					t.Errorf("CheckHost(%s): %v", tc.host, err)
				case tc.wantErr != "" && err == nil:
					t.Errorf("CheckHost(%s) accepted a certificate for %v", tc.host, tlsfile.Names(leaf(t, cert.c.Certificate)))
				case tc.wantErr != "" && !strings.Contains(err.Error(), tc.wantErr):
					t.Errorf("CheckHost(%s) = %q, want it to say %q", tc.host, err, tc.wantErr)
				}
			})
		}
	}
}

func TestCheckHostRefusesEmptyCertificate(t *testing.T) {
	t.Parallel()
	if err := tlsfile.CheckHost(tls.Certificate{}, "localhost"); err == nil {
		t.Fatal("an empty certificate was accepted")
	}
}

func TestCreateListsEachHostOnce(t *testing.T) {
	t.Parallel()
	// The broker passes the public URL's host and then localhost, which is
	// the same host when the public URL is the default.
	c, _, err := tlsfile.LoadOrCreate(t.TempDir(), []string{"localhost", "localhost", "127.0.0.1", "::1", "127.0.0.1"}, now)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff([]string{"localhost", "127.0.0.1", "::1"}, tlsfile.Names(leaf(t, c.Certificate))); d != "" {
		t.Errorf("names (-want +got):\n%s", d)
	}
}
