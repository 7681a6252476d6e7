// Package devicekey keeps a device's Ed25519 identity key and turns it into
// the self-signed TLS client certificate the broker authenticates devices by.
// The private key never leaves the file it was created in (mode 0600).
package devicekey

import (
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// LoadOrCreate reads the PEM (PKCS #8) Ed25519 key at path, or creates it with
// mode 0600 (parent directory 0700) when it does not exist. A key file that
// others may read is refused.
func LoadOrCreate(path string) (ed25519.PrivateKey, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		return create(path)
	}
	if err != nil {
		return nil, fmt.Errorf("reading key: %w", err)
	}
	if err := checkMode(path); err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "PRIVATE KEY" {
		return nil, fmt.Errorf("key %s: not a PEM PRIVATE KEY", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("key %s: %w", path, err)
	}
	ek, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("key %s: not an Ed25519 key", path)
	}
	return ek, nil
}

func checkMode(path string) error {
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("checking key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return fmt.Errorf("key %s has mode %v; it must be 0600", path, fi.Mode().Perm())
	}
	return nil
}

func create(path string) (ed25519.PrivateKey, error) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating device key: %w", err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(priv)
	if err != nil {
		return nil, fmt.Errorf("encoding device key: %w", err)
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("creating key directory: %w", err)
	}
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating device key: %w", err)
	}
	if err := pem.Encode(f, &pem.Block{Type: "PRIVATE KEY", Bytes: der}); err != nil {
		f.Close()
		return nil, fmt.Errorf("writing device key: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return nil, fmt.Errorf("writing device key: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("writing device key: %w", err)
	}
	return priv, nil
}

// TLSCertificate wraps priv in a short self-signed certificate for use as a
// TLS client certificate. Only the public key inside it matters to the broker.
func TLSCertificate(priv ed25519.PrivateKey, now time.Time) (tls.Certificate, error) {
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1),
		Subject:      pkix.Name{CommonName: "pinhole device " + Fingerprint(priv.Public().(ed25519.PublicKey))},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("making device certificate: %w", err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv}, nil
}

// FromConnectionState returns the Ed25519 key of the peer's client
// certificate, proved by the TLS handshake's signature.
func FromConnectionState(cs *tls.ConnectionState) (ed25519.PublicKey, error) {
	if cs == nil || len(cs.PeerCertificates) == 0 {
		return nil, errors.New("no device certificate presented")
	}
	pub, ok := cs.PeerCertificates[0].PublicKey.(ed25519.PublicKey)
	if !ok {
		return nil, errors.New("device certificate key is not Ed25519")
	}
	return pub, nil
}

// Fingerprint names a device key: "SHA256:" and the unpadded base64 of its
// SHA-256, like OpenSSH prints key fingerprints.
func Fingerprint(pub ed25519.PublicKey) string {
	sum := sha256.Sum256(pub)
	return "SHA256:" + base64.RawStdEncoding.EncodeToString(sum[:])
}
