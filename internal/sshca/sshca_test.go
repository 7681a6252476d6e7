package sshca_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/sshca"
)

var update = flag.Bool("update", false, "rewrite golden files in testdata")

// detRand is a deterministic byte stream (SHA-256 in counter mode) for
// reproducible keys.
type detRand struct {
	n   uint64
	buf []byte
}

func (r *detRand) Read(p []byte) (int, error) {
	for i := range p {
		if len(r.buf) == 0 {
			sum := sha256.Sum256(binary.BigEndian.AppendUint64(nil, r.n))
			r.n++
			r.buf = sum[:]
		}
		p[i] = r.buf[0]
		r.buf = r.buf[1:]
	}
	return len(p), nil
}

func mustKey(t *testing.T) ssh.Signer {
	t.Helper()
	k, err := sshca.NewKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

var t0 = time.Date(2026, 5, 1, 9, 0, 0, 0, time.UTC)

func baseUser(key ssh.PublicKey) sshca.UserCert {
	return sshca.UserCert{
		Key:         key,
		KeyID:       "grant=g-1 user=alice",
		Serial:      7,
		Principals:  []string{"root"},
		ValidAfter:  t0,
		ValidBefore: t0.Add(time.Hour),
		PermitPTY:   true,
	}
}

func TestIssueUserValidation(t *testing.T) {
	t.Parallel()
	ca := mustKey(t)
	user := mustKey(t)
	caCert, err := sshca.IssueUser(nil, ca, baseUser(ca.PublicKey()))
	if err != nil {
		t.Fatal(err)
	}
	certSigner, err := sshca.CertSigner(caCert, ca)
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		ca      ssh.Signer
		mod     func(*sshca.UserCert)
		wantErr string
	}{
		{name: "ok/minimal", ca: ca, mod: func(*sshca.UserCert) {}},
		{name: "ok/24h", ca: ca, mod: func(c *sshca.UserCert) { c.ValidBefore = c.ValidAfter.Add(24 * time.Hour) }},
		{name: "deny/no-principals", ca: ca, mod: func(c *sshca.UserCert) { c.Principals = nil }, wantErr: "at least one principal"},
		{name: "deny/empty-principal", ca: ca, mod: func(c *sshca.UserCert) { c.Principals = []string{""} }, wantErr: "principal is empty"},
		{name: "deny/comma-principal", ca: ca, mod: func(c *sshca.UserCert) { c.Principals = []string{"a,b"} }, wantErr: "comma"},
		{name: "deny/no-key-id", ca: ca, mod: func(c *sshca.UserCert) { c.KeyID = "" }, wantErr: "key id is empty"},
		{name: "deny/control-key-id", ca: ca, mod: func(c *sshca.UserCert) { c.KeyID = "a\nb" }, wantErr: "control character"},
		{name: "deny/before-not-after", ca: ca, mod: func(c *sshca.UserCert) { c.ValidBefore = c.ValidAfter }, wantErr: "is not after"},
		{name: "deny/too-long", ca: ca, mod: func(c *sshca.UserCert) { c.ValidBefore = c.ValidAfter.Add(24*time.Hour + time.Second) }, wantErr: "exceeds the maximum"},
		{name: "deny/zero-times", ca: ca, mod: func(c *sshca.UserCert) { c.ValidAfter = time.Time{} }, wantErr: "needs both"},
		{name: "deny/nil-key", ca: ca, mod: func(c *sshca.UserCert) { c.Key = nil }, wantErr: "no public key"},
		{name: "deny/cert-as-key", ca: ca, mod: func(c *sshca.UserCert) { c.Key = caCert }, wantErr: "cannot certify a certificate"},
		{name: "deny/invalid-prefix", ca: ca, mod: func(c *sshca.UserCert) { c.SourceAddresses = []netip.Prefix{{}} }, wantErr: "invalid source address"},
		{name: "deny/nil-ca", ca: nil, mod: func(*sshca.UserCert) {}, wantErr: "no CA signer"},
		{name: "deny/cert-ca", ca: certSigner, mod: func(*sshca.UserCert) {}, wantErr: "plain key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := baseUser(user.PublicKey())
			tt.mod(&c)
			_, err := sshca.IssueUser(nil, tt.ca, c)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("IssueUser: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("IssueUser error = %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func TestCheckUserCert(t *testing.T) {
	t.Parallel()
	ca := mustKey(t)
	otherCA := mustKey(t)
	user := mustKey(t)
	cas := []ssh.PublicKey{otherCA.PublicKey(), ca.PublicKey()}

	issue := func(t *testing.T, signer ssh.Signer, mod func(*sshca.UserCert)) *ssh.Certificate {
		t.Helper()
		c := baseUser(user.PublicKey())
		mod(&c)
		cert, err := sshca.IssueUser(nil, signer, c)
		if err != nil {
			t.Fatal(err)
		}
		return cert
	}
	// signRaw signs a certificate IssueUser would refuse to make.
	signRaw := func(t *testing.T, mod func(*ssh.Certificate)) *ssh.Certificate {
		t.Helper()
		cert := &ssh.Certificate{
			Key: user.PublicKey(), CertType: ssh.UserCert, KeyId: "raw", ValidPrincipals: []string{"root"},
			ValidAfter: uint64(t0.Unix()), ValidBefore: uint64(t0.Add(time.Hour).Unix()),
		}
		mod(cert)
		if err := cert.SignCert(rand.Reader, ca); err != nil {
			t.Fatal(err)
		}
		return cert
	}
	host, err := sshca.IssueHost(nil, ca, sshca.HostCert{Key: user.PublicKey(), KeyID: "host", Principals: []string{"root"}, ValidAfter: t0, ValidBefore: t0.Add(time.Hour)})
	if err != nil {
		t.Fatal(err)
	}
	noop := func(*sshca.UserCert) {}
	tests := []struct {
		name      string
		cert      *ssh.Certificate
		principal string
		now       time.Time
		wantErr   string
	}{
		{name: "ok/inside", cert: issue(t, ca, noop), principal: "root", now: t0.Add(time.Minute)},
		{name: "ok/skew-before-start", cert: issue(t, ca, noop), principal: "root", now: t0.Add(-20 * time.Second)},
		{name: "ok/skew-after-end", cert: issue(t, ca, noop), principal: "root", now: t0.Add(time.Hour + 20*time.Second)},
		{name: "ok/source-address", cert: issue(t, ca, func(c *sshca.UserCert) {
			c.SourceAddresses = []netip.Prefix{netip.MustParsePrefix("100.64.0.7/32")}
		}), principal: "root", now: t0},
		{name: "deny/expired", cert: issue(t, ca, noop), principal: "root", now: t0.Add(time.Hour + time.Minute), wantErr: "expired"},
		{name: "deny/not-yet-valid", cert: issue(t, ca, noop), principal: "root", now: t0.Add(-time.Minute), wantErr: "not yet valid"},
		{name: "deny/wrong-principal", cert: issue(t, ca, noop), principal: "postgres", now: t0, wantErr: "not in the set of valid principals"},
		{name: "deny/empty-principal", cert: issue(t, ca, noop), principal: "", now: t0, wantErr: "empty principal"},
		{name: "deny/wrong-ca", cert: issue(t, mustKey(t), noop), principal: "root", now: t0, wantErr: "unknown authority"},
		{name: "deny/host-cert", cert: host, principal: "root", now: t0, wantErr: "not a user certificate"},
		{name: "deny/force-command", cert: signRaw(t, func(c *ssh.Certificate) {
			c.CriticalOptions = map[string]string{"force-command": "id"}
		}), principal: "root", now: t0, wantErr: "unsupported critical option"},
		{name: "deny/bad-source-address", cert: signRaw(t, func(c *ssh.Certificate) {
			c.CriticalOptions = map[string]string{"source-address": "nonsense"}
		}), principal: "root", now: t0, wantErr: "neither an address nor"},
		{name: "deny/bad-signature", cert: func() *ssh.Certificate {
			c := issue(t, ca, noop)
			c.ValidPrincipals = []string{"root", "postgres"} // tampered after signing
			return c
		}(), principal: "root", now: t0, wantErr: "signature does not verify"},
		{name: "deny/nil", cert: nil, principal: "root", now: t0, wantErr: "no certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := sshca.CheckUserCert(cas, tt.cert, tt.principal, tt.now)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("CheckUserCert: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("CheckUserCert error = %v, want it to contain %q", err, tt.wantErr)
			}
			if !errors.Is(err, sshca.ErrRejected) {
				t.Fatalf("error %v does not wrap ErrRejected", err)
			}
		})
	}
}

func TestSourceAddresses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		opts    map[string]string
		want    []netip.Prefix
		wantErr bool
	}{
		{name: "ok/absent", opts: nil, want: nil},
		{name: "ok/cidr-and-addr", opts: map[string]string{"source-address": "10.0.0.5/8,192.0.2.1"},
			want: []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8"), netip.MustParsePrefix("192.0.2.1/32")}},
		{name: "ok/v6", opts: map[string]string{"source-address": "fd00::1"}, want: []netip.Prefix{netip.MustParsePrefix("fd00::1/128")}},
		{name: "deny/garbage", opts: map[string]string{"source-address": "10.0.0.1,x"}, wantErr: true},
		{name: "deny/empty", opts: map[string]string{"source-address": ""}, wantErr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := &ssh.Certificate{Permissions: ssh.Permissions{CriticalOptions: tt.opts}}
			got, err := sshca.SourceAddresses(c)
			if (err != nil) != tt.wantErr {
				t.Fatalf("err = %v, wantErr %v", err, tt.wantErr)
			}
			if diff := cmp.Diff(got, tt.want, cmp.Comparer(func(a, b netip.Prefix) bool { return a == b })); diff != "" {
				t.Fatalf("prefixes (-got +want):\n%s", diff)
			}
		})
	}
}

// certFields is the golden, signature-free view of a certificate.
type certFields struct {
	Type            uint32            `json:"type"`
	KeyType         string            `json:"key_type"`
	KeyFingerprint  string            `json:"key_fingerprint"`
	CAFingerprint   string            `json:"ca_fingerprint"`
	KeyID           string            `json:"key_id"`
	Serial          uint64            `json:"serial"`
	Principals      []string          `json:"principals"`
	ValidAfter      string            `json:"valid_after"`
	ValidBefore     string            `json:"valid_before"`
	CriticalOptions map[string]string `json:"critical_options"`
	Extensions      []string          `json:"extensions"`
}

func fields(c *ssh.Certificate) certFields {
	var ext []string
	for k := range c.Extensions {
		ext = append(ext, k)
	}
	sort.Strings(ext)
	return certFields{
		Type: c.CertType, KeyType: c.Key.Type(), KeyFingerprint: ssh.FingerprintSHA256(c.Key),
		CAFingerprint: ssh.FingerprintSHA256(c.SignatureKey), KeyID: c.KeyId, Serial: c.Serial,
		Principals: c.ValidPrincipals, CriticalOptions: c.CriticalOptions, Extensions: ext,
		ValidAfter:  time.Unix(int64(c.ValidAfter), 0).UTC().Format(time.RFC3339),
		ValidBefore: time.Unix(int64(c.ValidBefore), 0).UTC().Format(time.RFC3339),
	}
}

func TestGoldenCertFields(t *testing.T) {
	t.Parallel()
	r := &detRand{}
	ca, err := sshca.NewKey(r)
	if err != nil {
		t.Fatal(err)
	}
	user, err := sshca.NewKey(r)
	if err != nil {
		t.Fatal(err)
	}
	uc, err := sshca.IssueUser(r, ca, sshca.UserCert{
		Key: user.PublicKey(), KeyID: "grant=g-42 user=alice", Serial: 42, Principals: []string{"postgres"},
		SourceAddresses: []netip.Prefix{netip.MustParsePrefix("100.64.0.7/32"), netip.MustParsePrefix("fd7a::/48")},
		ValidAfter:      t0, ValidBefore: t0.Add(45 * time.Minute), PermitPTY: true, PermitAgentForwarding: true,
	})
	if err != nil {
		t.Fatal(err)
	}
	hc, err := sshca.IssueHost(r, ca, sshca.HostCert{
		Key: user.PublicKey(), KeyID: "proxy db-prod", Serial: 43, Principals: []string{"db-prod", "10.1.2.3"},
		ValidAfter: t0, ValidBefore: t0.Add(30 * 24 * time.Hour),
	})
	if err != nil {
		t.Fatal(err)
	}
	got, err := json.MarshalIndent(map[string]certFields{"user": fields(uc), "host": fields(hc)}, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	got = append(got, '\n')
	path := filepath.Join("testdata", "certs.golden.json")
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if diff := cmp.Diff(string(got), string(want)); diff != "" {
		t.Fatalf("certificate fields differ from %s (-got +want):\n%s", path, diff)
	}
}

func TestIssueHostValidation(t *testing.T) {
	t.Parallel()
	ca := mustKey(t)
	key := mustKey(t).PublicKey()
	base := sshca.HostCert{Key: key, KeyID: "h", Principals: []string{"db-prod"}, ValidAfter: t0, ValidBefore: t0.Add(time.Hour)}
	tests := []struct {
		name    string
		mod     func(*sshca.HostCert)
		wantErr string
	}{
		{name: "ok/base", mod: func(*sshca.HostCert) {}},
		{name: "deny/no-principals", mod: func(c *sshca.HostCert) { c.Principals = nil }, wantErr: "at least one principal"},
		{name: "deny/too-long", mod: func(c *sshca.HostCert) { c.ValidBefore = c.ValidAfter.Add(400 * 24 * time.Hour) }, wantErr: "exceeds"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := base
			tt.mod(&c)
			cert, err := sshca.IssueHost(nil, ca, c)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			checker := ssh.CertChecker{
				IsHostAuthority: func(auth ssh.PublicKey, _ string) bool {
					return string(auth.Marshal()) == string(ca.PublicKey().Marshal())
				},
				Clock: func() time.Time { return t0.Add(time.Minute) },
			}
			if err := checker.CheckHostKey("db-prod:22", nil, cert); err != nil {
				t.Fatalf("x/crypto rejects the host certificate: %v", err)
			}
		})
	}
}

func TestLoadOrCreateKey(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "ca")
	k1, err := sshca.LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if got := fi.Mode().Perm(); got != 0o600 {
		t.Errorf("key mode = %#o, want 0600", got)
	}
	di, err := os.Stat(filepath.Dir(path))
	if err != nil {
		t.Fatal(err)
	}
	if got := di.Mode().Perm(); got != 0o700 {
		t.Errorf("dir mode = %#o, want 0700", got)
	}
	if k1.PublicKey().Type() != ssh.KeyAlgoED25519 {
		t.Errorf("key type = %s", k1.PublicKey().Type())
	}
	k2, err := sshca.LoadOrCreateKey(path)
	if err != nil {
		t.Fatal(err)
	}
	if sshca.AuthorizedKey(k1.PublicKey()) != sshca.AuthorizedKey(k2.PublicKey()) {
		t.Fatal("reloaded key differs from the created one")
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Errorf("leftover files next to the key: %v", entries)
	}

	t.Run("deny/loose-mode", func(t *testing.T) {
		t.Parallel()
		p := filepath.Join(t.TempDir(), "k")
		if _, err := sshca.LoadOrCreateKey(p); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := sshca.LoadOrCreateKey(p)
		if err == nil || !strings.Contains(err.Error(), "want 0600") {
			t.Fatalf("error = %v, want a mode error", err)
		}
	})
	t.Run("deny/not-ed25519", func(t *testing.T) {
		t.Parallel()
		ek, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		block, err := ssh.MarshalPrivateKey(ek, "")
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(t.TempDir(), "k")
		if err := os.WriteFile(p, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
		_, err = sshca.LoadOrCreateKey(p)
		if err == nil || !strings.Contains(err.Error(), "want ed25519") {
			t.Fatalf("error = %v, want a key type error", err)
		}
	})
	t.Run("deny/garbage", func(t *testing.T) {
		t.Parallel()
		p := filepath.Join(t.TempDir(), "k")
		if err := os.WriteFile(p, []byte("not a key"), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := sshca.LoadOrCreateKey(p); err == nil {
			t.Fatal("garbage key accepted")
		}
	})
}

func TestCertSignerAndAuthorizedKey(t *testing.T) {
	t.Parallel()
	ca := mustKey(t)
	user := mustKey(t)
	cert, err := sshca.IssueUser(nil, ca, baseUser(user.PublicKey()))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sshca.CertSigner(cert, mustKey(t)); err == nil {
		t.Fatal("CertSigner accepted a key the certificate does not certify")
	}
	s, err := sshca.CertSigner(cert, user)
	if err != nil {
		t.Fatal(err)
	}
	line := sshca.AuthorizedKey(s.PublicKey())
	if strings.HasSuffix(line, "\n") || !strings.HasPrefix(line, "ssh-ed25519-cert-v01@openssh.com ") {
		t.Fatalf("AuthorizedKey = %q", line)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := pub.(*ssh.Certificate); !ok {
		t.Fatalf("parsed %T, want a certificate", pub)
	}
}
