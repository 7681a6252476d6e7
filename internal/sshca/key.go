// Package sshca issues and checks OpenSSH certificates for pinhole grants.
//
// The broker holds a user CA and a host CA. A user certificate names the
// grant in its key id, carries the target login as its only principal, is
// bound to the agent's tunnel address with the source-address critical
// option, and dies with the grant. A host certificate lets users trust the
// recording proxy through one @cert-authority line instead of a TOFU prompt.
//
// Signing keys are ed25519 and sit behind ssh.Signer (and so behind
// crypto.Signer), so an HSM or KMS can hold them later.
package sshca

import (
	"bytes"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/crypto/ssh"
)

// maxKeyFileSize bounds how much of a private key file is read.
const maxKeyFileSize = 64 << 10

// NewKey returns a fresh ed25519 signer whose key is drawn from rand
// (crypto/rand when rand is nil).
func NewKey(rand io.Reader) (ssh.Signer, error) {
	_, priv, err := newEd25519(rand)
	if err != nil {
		return nil, err
	}
	s, err := ssh.NewSignerFromSigner(priv)
	if err != nil {
		return nil, fmt.Errorf("sshca: wrapping ed25519 key: %w", err)
	}
	return s, nil
}

func newEd25519(r io.Reader) (ed25519.PublicKey, ed25519.PrivateKey, error) {
	if r == nil {
		r = rand.Reader
	}
	pub, priv, err := ed25519.GenerateKey(r)
	if err != nil {
		return nil, nil, fmt.Errorf("sshca: generating ed25519 key: %w", err)
	}
	return pub, priv, nil
}

// LoadOrCreateKey loads an OpenSSH-format ed25519 private key from path, or
// creates one (file mode 0600, missing parent directories 0700) when the file
// does not exist. It refuses a key file whose permission bits are looser than
// 0600, a file that is not a regular file, and a key of any other type.
//
// Creation is atomic: the key is written to a temporary file and linked into
// place, so a concurrent creator either wins or loads the winner's key.
func LoadOrCreateKey(path string) (ssh.Signer, error) {
	s, err := loadKey(path)
	if err == nil || !errors.Is(err, fs.ErrNotExist) {
		return s, err
	}
	if err := createKey(path); err != nil {
		if errors.Is(err, fs.ErrExist) {
			return loadKey(path)
		}
		return nil, err
	}
	return loadKey(path)
}

func loadKey(path string) (ssh.Signer, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("sshca: opening key %s: %w", path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("sshca: stat key %s: %w", path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("sshca: key %s is not a regular file", path)
	}
	if perm := fi.Mode().Perm(); perm&^0o600 != 0 {
		return nil, fmt.Errorf("sshca: key %s has mode %#o, want 0600 or stricter (chmod 600 %s)", path, perm, path)
	}
	data, err := io.ReadAll(io.LimitReader(f, maxKeyFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("sshca: reading key %s: %w", path, err)
	}
	if len(data) > maxKeyFileSize {
		return nil, fmt.Errorf("sshca: key %s is larger than %d bytes", path, maxKeyFileSize)
	}
	raw, err := ssh.ParseRawPrivateKey(data)
	if err != nil {
		return nil, fmt.Errorf("sshca: parsing key %s: %w", path, err)
	}
	var priv ed25519.PrivateKey
	switch k := raw.(type) {
	case *ed25519.PrivateKey:
		priv = *k
	case ed25519.PrivateKey:
		priv = k
	default:
		return nil, fmt.Errorf("sshca: key %s is %T, want ed25519", path, raw)
	}
	s, err := ssh.NewSignerFromSigner(priv)
	if err != nil {
		return nil, fmt.Errorf("sshca: wrapping key %s: %w", path, err)
	}
	return s, nil
}

func createKey(path string) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("sshca: creating key directory %s: %w", dir, err)
	}
	_, priv, err := newEd25519(nil)
	if err != nil {
		return err
	}
	block, err := ssh.MarshalPrivateKey(priv, "pinhole")
	if err != nil {
		return fmt.Errorf("sshca: encoding key: %w", err)
	}
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("sshca: creating temporary key file: %w", err)
	}
	tmpName := tmp.Name()
	defer os.Remove(tmpName)
	if err := tmp.Chmod(0o600); err != nil {
		tmp.Close()
		return fmt.Errorf("sshca: chmod temporary key file: %w", err)
	}
	if _, err := tmp.Write(pem.EncodeToMemory(block)); err != nil {
		tmp.Close()
		return fmt.Errorf("sshca: writing key: %w", err)
	}
	if err := tmp.Sync(); err != nil {
		tmp.Close()
		return fmt.Errorf("sshca: syncing key: %w", err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("sshca: closing key: %w", err)
	}
	// Link fails with EEXIST when another process created the key first.
	if err := os.Link(tmpName, path); err != nil {
		return fmt.Errorf("sshca: installing key %s: %w", path, err)
	}
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		d.Close()
	}
	return nil
}

// AuthorizedKey formats pub (a key or a certificate) as one authorized_keys
// line without a trailing newline, e.g. for TrustedUserCAKeys or an
// @cert-authority known_hosts entry.
func AuthorizedKey(pub ssh.PublicKey) string {
	return strings.TrimSuffix(string(ssh.MarshalAuthorizedKey(pub)), "\n")
}

// CertSigner returns a signer that presents cert and signs with key. The
// certificate must certify key's public key.
func CertSigner(cert *ssh.Certificate, key ssh.Signer) (ssh.Signer, error) {
	if cert == nil || key == nil {
		return nil, errors.New("sshca: CertSigner needs a certificate and a key")
	}
	if !bytes.Equal(cert.Key.Marshal(), key.PublicKey().Marshal()) {
		return nil, errors.New("sshca: certificate does not certify this key")
	}
	s, err := ssh.NewCertSigner(cert, key)
	if err != nil {
		return nil, fmt.Errorf("sshca: building certificate signer: %w", err)
	}
	return s, nil
}

func defaultRand() io.Reader { return rand.Reader }
