package devicekey

import (
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"os"
	"path/filepath"
	"testing"
	"time"
)

func TestLoadOrCreate(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "sub", "device.key")
	k1, err := LoadOrCreate(path)
	if err != nil {
		t.Fatal(err)
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v err %v", fi.Mode(), err)
	}
	k2, err := LoadOrCreate(path)
	if err != nil || !k1.Equal(k2) {
		t.Fatalf("reload: %v", err)
	}
	if err := os.Chmod(path, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := LoadOrCreate(path); err == nil {
		t.Fatal("world-readable key accepted")
	}
}

func TestTLSCertificateCarriesKey(t *testing.T) {
	t.Parallel()
	_, priv, _ := ed25519.GenerateKey(nil)
	c, err := TLSCertificate(priv, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(c.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	got, err := FromConnectionState(&tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}})
	if err != nil || !got.Equal(priv.Public()) {
		t.Fatalf("key from certificate: %v", err)
	}
	if _, err := FromConnectionState(&tls.ConnectionState{}); err == nil {
		t.Fatal("missing certificate accepted")
	}
}
