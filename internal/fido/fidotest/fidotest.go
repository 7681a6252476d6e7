// Package fidotest is a software FIDO2 authenticator standing in for a
// person's security key in tests and the demo program. It must never be
// imported by production code: its keys live in memory and it approves
// everything it is asked to.
//
// It plays the authenticator and the browser together: it consumes the
// options JSON that fido.BeginRegistration and fido.BeginAssertion return and
// produces the JSON a page would post (the shape of PublicKeyCredential
// toJSON()). It is built on github.com/descope/virtualwebauthn, which emits
// "packed" self-attestation and ES256 credentials.
package fidotest

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/descope/virtualwebauthn"
)

// Authenticator is a software authenticator bound to one relying party ID,
// posting from one origin. It is safe for concurrent use.
type Authenticator struct {
	mu       sync.Mutex
	rp       virtualwebauthn.RelyingParty
	auth     virtualwebauthn.Authenticator
	handles  map[string][]byte // base64url credential ID -> user handle
	verified bool
}

// New returns an authenticator for rpID whose responses claim origin. It
// verifies the user (UV flag set) until SetUserVerified(false).
func New(rpID, origin string) *Authenticator {
	return &Authenticator{
		rp:       virtualwebauthn.RelyingParty{ID: rpID, Name: rpID, Origin: origin},
		auth:     virtualwebauthn.NewAuthenticator(),
		handles:  make(map[string][]byte),
		verified: true,
	}
}

// SetUserVerified sets whether later responses carry the user verified flag.
func (a *Authenticator) SetUserVerified(v bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.verified = v
}

// SetOrigin sets the origin later responses claim, as a page on another
// origin would.
func (a *Authenticator) SetOrigin(origin string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.rp.Origin = origin
}

// SetSignCount sets the signature counter of every credential; the next
// assertion reports n+1. Tests use it to present a counter that went
// backwards, as a cloned key would.
func (a *Authenticator) SetSignCount(n uint32) {
	a.mu.Lock()
	defer a.mu.Unlock()
	for i := range a.auth.Credentials {
		a.auth.Credentials[i].Counter = n
	}
}

// Register creates a credential from options (exactly what
// fido.BeginRegistration returns) and returns the registration response.
// Like a real authenticator it refuses when it already holds an excluded
// credential.
func (a *Authenticator) Register(options []byte) ([]byte, error) {
	opts, err := virtualwebauthn.ParseAttestationOptions(string(options))
	if err != nil {
		return nil, fmt.Errorf("fidotest: parsing creation options: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if opts.RelyingPartyID != a.rp.ID {
		return nil, fmt.Errorf("fidotest: options are for relying party %q, authenticator is for %q", opts.RelyingPartyID, a.rp.ID)
	}
	for _, c := range a.auth.Credentials {
		if c.IsExcludedForAttestation(*opts) {
			return nil, errors.New("fidotest: authenticator already holds an excluded credential (InvalidStateError)")
		}
	}
	cred, err := newCredential()
	if err != nil {
		return nil, err
	}
	a.auth.Options.UserNotVerified = !a.verified
	resp := virtualwebauthn.CreateAttestationResponse(a.rp, a.auth, cred, *opts)
	a.auth.AddCredential(cred)
	a.handles[base64.RawURLEncoding.EncodeToString(cred.ID)] = []byte(opts.UserID)
	return asToJSON(resp, true)
}

// Assert signs an assertion for options (exactly what fido.BeginAssertion
// returns) with the first allowed credential it holds (any credential when
// the options allow all), incrementing its signature counter first, and
// returns the assertion response.
func (a *Authenticator) Assert(options []byte) ([]byte, error) {
	opts, err := virtualwebauthn.ParseAssertionOptions(string(options))
	if err != nil {
		return nil, fmt.Errorf("fidotest: parsing request options: %w", err)
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if opts.RelyingPartyID != a.rp.ID {
		return nil, fmt.Errorf("fidotest: options are for relying party %q, authenticator is for %q", opts.RelyingPartyID, a.rp.ID)
	}
	var cred *virtualwebauthn.Credential
	if len(opts.AllowCredentials) == 0 && len(a.auth.Credentials) > 0 {
		cred = &a.auth.Credentials[0]
	} else {
		cred = a.auth.FindAllowedCredential(*opts)
	}
	if cred == nil {
		return nil, errors.New("fidotest: no allowed credential (NotAllowedError)")
	}
	cred.Counter++ // virtualwebauthn never increments it
	a.auth.Options.UserNotVerified = !a.verified
	a.auth.Options.UserHandle = slices.Clone(a.handles[base64.RawURLEncoding.EncodeToString(cred.ID)])
	resp := virtualwebauthn.CreateAssertionResponse(a.rp, a.auth, *cred, *opts)
	return asToJSON(resp, false)
}

// asToJSON adds the members a browser's toJSON() output has and
// virtualwebauthn leaves out.
func asToJSON(resp string, registration bool) ([]byte, error) {
	var m map[string]any
	if err := json.Unmarshal([]byte(resp), &m); err != nil {
		return nil, fmt.Errorf("fidotest: decoding response: %w", err)
	}
	m["authenticatorAttachment"] = "cross-platform"
	m["clientExtensionResults"] = map[string]any{}
	if registration {
		if r, ok := m["response"].(map[string]any); ok {
			r["transports"] = []string{"usb"}
		}
	}
	b, err := json.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("fidotest: encoding response: %w", err)
	}
	return b, nil
}

// newCredential makes a P-256 credential whose public coordinates are both
// 32 bytes long. virtualwebauthn encodes them with big.Int.Bytes(), which
// drops leading zero bytes, so about one key in 128 would otherwise be
// refused by the relying party ("x or y coordinate has invalid length").
func newCredential() (virtualwebauthn.Credential, error) {
	for range 64 {
		k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return virtualwebauthn.Credential{}, fmt.Errorf("fidotest: generating key: %w", err)
		}
		if len(k.X.Bytes()) != 32 || len(k.Y.Bytes()) != 32 {
			continue
		}
		der, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			return virtualwebauthn.Credential{}, fmt.Errorf("fidotest: encoding key: %w", err)
		}
		return virtualwebauthn.NewCredentialWithImportedKey(virtualwebauthn.KeyTypeEC2, der), nil
	}
	return virtualwebauthn.Credential{}, errors.New("fidotest: no usable key after 64 tries")
}
