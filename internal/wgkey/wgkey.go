// Package wgkey holds WireGuard (Curve25519) key types. A Private cannot be
// compared with == and never prints its bytes; a Public prints as base64 the
// way the wg tool does and encodes as lower-case hex for the UAPI.
package wgkey

import (
	"crypto/ecdh"
	"crypto/rand"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
)

// Len is the length in bytes of a WireGuard key.
const Len = 32

// Private is a WireGuard private key. The zero value is not a valid key.
type Private struct {
	_ [0]func() // not comparable with ==
	k [Len]byte
}

// Public is a WireGuard public key. The zero value is not a valid key.
type Public [Len]byte

// NewPrivate generates a fresh private key from r (crypto/rand when r is nil).
func NewPrivate(r io.Reader) (Private, error) {
	if r == nil {
		r = rand.Reader
	}
	var p Private
	if _, err := io.ReadFull(r, p.k[:]); err != nil {
		return Private{}, fmt.Errorf("generating WireGuard key: %w", err)
	}
	// Clamp as Curve25519 requires (and as wg genkey does).
	p.k[0] &= 248
	p.k[31] = (p.k[31] & 127) | 64
	return p, nil
}

// ParsePrivate parses a base64 private key as written by wg genkey.
func ParsePrivate(s string) (Private, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != Len {
		return Private{}, errors.New("wgkey: private key must be 32 bytes of base64")
	}
	var p Private
	copy(p.k[:], b)
	return p, nil
}

// IsZero reports whether p is the zero value.
func (p Private) IsZero() bool {
	var z [Len]byte
	return subtle.ConstantTimeCompare(p.k[:], z[:]) == 1
}

// Equal compares two private keys in constant time.
func (p Private) Equal(o Private) bool { return subtle.ConstantTimeCompare(p.k[:], o.k[:]) == 1 }

// Public returns the public half of p.
func (p Private) Public() Public {
	k, err := ecdh.X25519().NewPrivateKey(p.k[:])
	if err != nil {
		// Only reachable with a key of the wrong length, which the type prevents.
		panic("wgkey: invalid private key length")
	}
	var pub Public
	copy(pub[:], k.PublicKey().Bytes())
	return pub
}

// MarshalText writes the key as base64 (for files kept 0600 by the caller).
func (p Private) MarshalText() ([]byte, error) {
	return []byte(base64.StdEncoding.EncodeToString(p.k[:])), nil
}

// UnmarshalText reads a base64 key written by MarshalText.
func (p *Private) UnmarshalText(b []byte) error {
	k, err := ParsePrivate(string(b))
	if err != nil {
		return err
	}
	*p = k
	return nil
}

// UAPIHex returns the key as lower-case hex, the form wireguard-go's UAPI takes.
func (p Private) UAPIHex() string { return hex.EncodeToString(p.k[:]) }

// String never reveals the key.
func (p Private) String() string { return "wgkey.Private([redacted])" }

// LogValue keeps the key out of structured logs.
func (p Private) LogValue() slog.Value { return slog.StringValue("[redacted]") }

// ParsePublic parses a base64 public key as printed by wg.
func ParsePublic(s string) (Public, error) {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != Len {
		return Public{}, errors.New("wgkey: public key must be 32 bytes of base64")
	}
	var p Public
	copy(p[:], b)
	if p.IsZero() {
		return Public{}, errors.New("wgkey: public key is all zeros")
	}
	return p, nil
}

// IsZero reports whether p is the zero value.
func (p Public) IsZero() bool { return p == Public{} }

// String returns the key in base64, as wg show prints it.
func (p Public) String() string { return base64.StdEncoding.EncodeToString(p[:]) }

// UAPIHex returns the key as lower-case hex, the form wireguard-go's UAPI takes.
func (p Public) UAPIHex() string { return hex.EncodeToString(p[:]) }

// MarshalText encodes the key as base64.
func (p Public) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText decodes a base64 key.
func (p *Public) UnmarshalText(b []byte) error {
	k, err := ParsePublic(string(b))
	if err != nil {
		return err
	}
	*p = k
	return nil
}
