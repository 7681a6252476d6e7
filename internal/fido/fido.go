// Package fido runs the two WebAuthn ceremonies pinhole needs, on top of
// github.com/go-webauthn/webauthn: registering a security key or passkey, and
// an assertion whose challenge the caller chooses so that it commits to what
// the approver saw. User verification (PIN or biometric) is required in both
// ceremonies; a response without the UV flag is refused.
//
// Each Begin call returns the options for the browser and opaque session
// bytes. The caller stores the session server-side (never in the browser:
// it is not authenticated), hands it back to the matching Finish call, and
// deletes it when that call returns, whatever the result: a session is
// single-use, and this package keeps no state to enforce that. Ceremonies
// expire after Config.Timeout.
//
// Browser side: the options are the JSON of the "publicKey" member, i.e. a
// PublicKeyCredentialCreationOptionsJSON or PublicKeyCredentialRequestOptionsJSON
// object, to be passed as is to PublicKeyCredential.parseCreationOptionsFromJSON
// or parseRequestOptionsFromJSON; the page posts back JSON.stringify(cred.toJSON()).
package fido

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"time"

	"github.com/go-webauthn/webauthn/protocol"
	"github.com/go-webauthn/webauthn/webauthn"
)

// Bounds on inputs.
const (
	// MaxResponseSize is the largest browser response Finish* accept.
	MaxResponseSize = 64 << 10
	// MaxSessionSize is the largest session Finish* accept.
	MaxSessionSize = 64 << 10
	// MinChallengeSize and MaxChallengeSize bound BeginAssertion's challenge.
	MinChallengeSize = 32
	MaxChallengeSize = 1024
	// MaxUserIDSize is the largest user handle WebAuthn allows.
	MaxUserIDSize = 64
	// MaxNameSize bounds User.Name and User.DisplayName.
	MaxNameSize = 256
	// MaxCredentials bounds how many credentials a user may have.
	MaxCredentials = 64
)

// DefaultTimeout is the ceremony timeout used when Config.Timeout is zero,
// and MaxTimeout the largest one New accepts.
const (
	DefaultTimeout = 5 * time.Minute
	MaxTimeout     = time.Hour
)

// Sentinel errors, wrapped by the errors this package returns (use
// errors.Is); the returned message always starts with "fido: ". Failures
// found by the WebAuthn library wrap a *protocol.Error instead (use
// errors.As).
var (
	// ErrTooLarge reports a response or session larger than its bound.
	ErrTooLarge = errors.New("fido: input too large")
	// ErrCloned reports an assertion whose signature counter did not
	// increase: the credential's private key may exist twice, or the
	// assertion is a replay.
	ErrCloned = errors.New("signature counter did not increase (cloned authenticator or replayed assertion)")
	// ErrSession reports a session that is malformed, belongs to the other
	// ceremony or to another relying party, or has expired.
	ErrSession = errors.New("fido: invalid session")
	// ErrExpired reports a ceremony finished after its timeout. It also
	// matches ErrSession.
	ErrExpired = fmt.Errorf("%w: ceremony expired", ErrSession)
	// ErrUserVerification reports a response without the user verified flag.
	ErrUserVerification = errors.New("user verification required but not performed")
	// ErrDuplicate reports a registration of a credential the user already has.
	ErrDuplicate = errors.New("credential already registered")
)

// Config configures a relying party.
type Config struct {
	// RPID is the relying party ID: the broker's domain name (not an IP
	// address), e.g. "pinhole.example.com", or "localhost" in tests.
	RPID string
	// RPDisplayName is shown by some authenticators; empty means RPID.
	RPDisplayName string
	// Origins are the exact origins the pages run on, e.g.
	// "https://pinhole.example.com". Each must be https (http only for
	// localhost) and its host must be RPID or a subdomain of it. Required.
	Origins []string
	// Timeout bounds each ceremony, from Begin to Finish; it is sent to the
	// browser and enforced here. Zero means DefaultTimeout.
	Timeout time.Duration
	// Now returns the current time for the expiry check; nil means
	// time.Now. (The WebAuthn library additionally checks the expiry it
	// records against the wall clock.)
	Now func() time.Time
}

// FIDO runs WebAuthn ceremonies for one relying party. It is safe for
// concurrent use.
type FIDO struct {
	wa      *webauthn.WebAuthn
	rpID    string
	timeout time.Duration
	now     func() time.Time
}

// New validates cfg and returns a FIDO.
func New(cfg Config) (*FIDO, error) {
	if cfg.RPID == "" {
		return nil, errors.New("fido: config: RPID is required")
	}
	if net.ParseIP(cfg.RPID) != nil {
		return nil, fmt.Errorf("fido: config: RPID %q is an IP address; WebAuthn needs a domain name", cfg.RPID)
	}
	if len(cfg.Origins) == 0 {
		return nil, errors.New("fido: config: at least one origin is required")
	}
	for _, o := range cfg.Origins {
		if err := checkOrigin(o, cfg.RPID); err != nil {
			return nil, fmt.Errorf("fido: config: origin %q: %w", o, err)
		}
	}
	timeout := cfg.Timeout
	switch {
	case timeout == 0:
		timeout = DefaultTimeout
	case timeout < 0 || timeout > MaxTimeout:
		return nil, fmt.Errorf("fido: config: timeout %s out of range (0, %s]", timeout, MaxTimeout)
	}
	name := cfg.RPDisplayName
	if name == "" {
		name = cfg.RPID
	}
	now := cfg.Now
	if now == nil {
		now = time.Now
	}
	limit := webauthn.TimeoutConfig{Enforce: true, Timeout: timeout, TimeoutUVD: timeout}
	wa, err := webauthn.New(&webauthn.Config{
		RPID:                  cfg.RPID,
		RPDisplayName:         name,
		RPOrigins:             append([]string(nil), cfg.Origins...),
		AttestationPreference: protocol.PreferNoAttestation,
		AuthenticatorSelection: protocol.AuthenticatorSelection{
			ResidentKey:        protocol.ResidentKeyRequirementPreferred,
			RequireResidentKey: protocol.ResidentKeyNotRequired(),
			UserVerification:   protocol.VerificationRequired,
		},
		Timeouts: webauthn.TimeoutsConfig{Login: limit, Registration: limit},
	})
	if err != nil {
		return nil, fmt.Errorf("fido: config: %w", err)
	}
	return &FIDO{wa: wa, rpID: cfg.RPID, timeout: timeout, now: now}, nil
}

// checkOrigin accepts a bare https origin whose host is rpID or below it
// (http is accepted for localhost, which browsers treat as secure).
func checkOrigin(origin, rpID string) error {
	u, err := url.Parse(origin)
	if err != nil {
		return err
	}
	if u.User != nil || (u.Path != "" && u.Path != "/") || u.RawQuery != "" || u.Fragment != "" || u.Opaque != "" {
		return errors.New("must be scheme://host[:port] only")
	}
	host := u.Hostname()
	switch {
	case u.Scheme == "https":
	case u.Scheme == "http" && (host == "localhost" || strings.HasSuffix(host, ".localhost")):
	default:
		return errors.New("must use https (http only for localhost)")
	}
	if !strings.EqualFold(host, rpID) && !strings.HasSuffix(strings.ToLower(host), "."+strings.ToLower(rpID)) {
		return fmt.Errorf("host %q is not %q or a subdomain of it", host, rpID)
	}
	return nil
}

// User is a person as the WebAuthn ceremonies see them. It implements
// webauthn.User.
type User struct {
	// ID is the user handle: 1 to 64 random bytes, never personal data
	// (authenticators store it and return it in assertions).
	ID []byte
	// Name is the account name shown when choosing a credential, e.g.
	// "alice@example.com".
	Name string
	// DisplayName is the person's name, e.g. "Alice Liddell".
	DisplayName string
	// Credentials are the user's registered credentials, with their stored
	// sign counts.
	Credentials []webauthn.Credential
}

var _ webauthn.User = User{}

// WebAuthnID implements webauthn.User.
func (u User) WebAuthnID() []byte { return u.ID }

// WebAuthnName implements webauthn.User.
func (u User) WebAuthnName() string { return u.Name }

// WebAuthnDisplayName implements webauthn.User.
func (u User) WebAuthnDisplayName() string { return u.DisplayName }

// WebAuthnCredentials implements webauthn.User.
func (u User) WebAuthnCredentials() []webauthn.Credential { return u.Credentials }

func (u User) validate() error {
	switch {
	case len(u.ID) == 0 || len(u.ID) > MaxUserIDSize:
		return fmt.Errorf("fido: user ID has %d bytes, want 1 to %d", len(u.ID), MaxUserIDSize)
	case u.Name == "" || len(u.Name) > MaxNameSize:
		return fmt.Errorf("fido: user name must be 1 to %d bytes", MaxNameSize)
	case len(u.DisplayName) > MaxNameSize:
		return fmt.Errorf("fido: user display name longer than %d bytes", MaxNameSize)
	case len(u.Credentials) > MaxCredentials:
		return fmt.Errorf("fido: user has %d credentials, more than %d", len(u.Credentials), MaxCredentials)
	}
	return nil
}

// BeginRegistration starts registering a new credential for u. Credentials u
// already has are excluded, user verification is required, and a
// discoverable (resident) credential is preferred. No attestation is asked
// for.
//
// options is the PublicKeyCredentialCreationOptionsJSON object (the
// "publicKey" member, without the wrapper) for
// PublicKeyCredential.parseCreationOptionsFromJSON; session is stored
// server-side and passed to FinishRegistration.
func (f *FIDO) BeginRegistration(u User) (options, session []byte, err error) {
	if err := u.validate(); err != nil {
		return nil, nil, err
	}
	creation, sd, err := f.wa.BeginRegistration(u,
		webauthn.WithExclusions(webauthn.Credentials(u.Credentials).CredentialDescriptors()),
		webauthn.WithResidentKeyRequirement(protocol.ResidentKeyRequirementPreferred),
		webauthn.WithConveyancePreference(protocol.PreferNoAttestation),
	)
	if err != nil {
		return nil, nil, fmt.Errorf("fido: beginning registration: %w", err)
	}
	return f.seal(ceremonyRegistration, creation.Response, sd)
}

// FinishRegistration verifies the browser's response (the JSON of
// cred.toJSON()) against session and returns the new credential to store
// with the user. It refuses a response without user verification, for
// another challenge, origin or relying party, and a credential u already
// has. Storing the credential so that its ID is unique across users is the
// caller's job.
func (f *FIDO) FinishRegistration(u User, session, response []byte) (*webauthn.Credential, error) {
	const op = "verifying registration"
	if err := checkSizes(session, response); err != nil {
		return nil, err
	}
	if err := u.validate(); err != nil {
		return nil, err
	}
	sd, err := f.open(ceremonyRegistration, session)
	if err != nil {
		return nil, err
	}
	parsed, err := protocol.ParseCredentialCreationResponseBytes(response)
	if err != nil {
		return nil, libError("parsing registration response", err)
	}
	// Checked here as well as by the library so that the refusal is always
	// ErrUserVerification.
	if !parsed.Response.AttestationObject.AuthData.Flags.HasUserVerified() {
		return nil, fmt.Errorf("fido: %s: %w", op, ErrUserVerification)
	}
	cred, err := f.wa.CreateCredential(u, sd, parsed)
	if err != nil {
		return nil, libError(op, err)
	}
	if !cred.Flags.UserVerified {
		return nil, fmt.Errorf("fido: %s: %w", op, ErrUserVerification)
	}
	for _, c := range u.Credentials {
		if bytes.Equal(c.ID, cred.ID) {
			return nil, fmt.Errorf("fido: %s: %w", op, ErrDuplicate)
		}
	}
	return cred, nil
}

// BeginAssertion starts an assertion by one of u's credentials over exactly
// challenge, which the caller builds to commit to what the user approves
// (e.g. a hash of the request as shown). It must be 32 to 1024 bytes.
//
// options is the PublicKeyCredentialRequestOptionsJSON object (the
// "publicKey" member, without the wrapper) for
// PublicKeyCredential.parseRequestOptionsFromJSON; session is stored
// server-side and passed to FinishAssertion.
func (f *FIDO) BeginAssertion(u User, challenge []byte) (options, session []byte, err error) {
	if len(challenge) < MinChallengeSize || len(challenge) > MaxChallengeSize {
		return nil, nil, fmt.Errorf("fido: challenge has %d bytes, want %d to %d", len(challenge), MinChallengeSize, MaxChallengeSize)
	}
	if err := u.validate(); err != nil {
		return nil, nil, err
	}
	if len(u.Credentials) == 0 {
		return nil, nil, errors.New("fido: user has no registered credentials")
	}
	assertion, sd, err := f.wa.BeginLogin(u,
		webauthn.WithChallenge(bytes.Clone(challenge)),
		webauthn.WithUserVerification(protocol.VerificationRequired),
	)
	if err != nil {
		return nil, nil, fmt.Errorf("fido: beginning assertion: %w", err)
	}
	return f.seal(ceremonyAssertion, assertion.Response, sd)
}

// FinishAssertion verifies the browser's response (the JSON of
// cred.toJSON()) against session and returns the credential that signed,
// with its sign count updated: the caller must store it (at least
// Authenticator.SignCount) before acting on the assertion.
//
// It refuses (wrapping the library's *protocol.Error, message prefixed
// "fido: verifying assertion: ") a wrong origin or relying party, another
// challenge, a bad signature and a credential that is not u's; it refuses
// a response without user verification (ErrUserVerification) and, when
// either counter is nonzero, a sign count that does not increase
// (ErrCloned) — which also catches a replayed response once the first use
// was stored. Authenticators that always report 0 (many passkeys) are not
// protected by the counter: single use of the session is what stops
// replays, so the caller must delete the session before or as it calls
// FinishAssertion.
func (f *FIDO) FinishAssertion(u User, session, response []byte) (*webauthn.Credential, error) {
	const op = "verifying assertion"
	if err := checkSizes(session, response); err != nil {
		return nil, err
	}
	if err := u.validate(); err != nil {
		return nil, err
	}
	sd, err := f.open(ceremonyAssertion, session)
	if err != nil {
		return nil, err
	}
	parsed, err := protocol.ParseCredentialRequestResponseBytes(response)
	if err != nil {
		return nil, libError("parsing assertion response", err)
	}
	// Checked here as well as by the library so that the refusal is always
	// ErrUserVerification.
	if !parsed.Response.AuthenticatorData.Flags.HasUserVerified() {
		return nil, fmt.Errorf("fido: %s: %w", op, ErrUserVerification)
	}
	cred, err := f.wa.ValidateLogin(u, sd, parsed)
	if err != nil {
		return nil, libError(op, err)
	}
	var stored uint32
	for _, c := range u.Credentials {
		if bytes.Equal(c.ID, cred.ID) {
			stored = c.Authenticator.SignCount
			break
		}
	}
	got := parsed.Response.AuthenticatorData.Counter
	if (got != 0 || stored != 0) && got <= stored {
		return nil, fmt.Errorf("fido: %s: %w: stored %d, presented %d", op, ErrCloned, stored, got)
	}
	cred.Authenticator.SignCount = got
	cred.Authenticator.CloneWarning = false
	return cred, nil
}

// checkSizes refuses oversized sessions and responses before any parsing.
func checkSizes(session, response []byte) error {
	if len(response) > MaxResponseSize {
		return fmt.Errorf("%w: response has %d bytes (max %d)", ErrTooLarge, len(response), MaxResponseSize)
	}
	if len(session) > MaxSessionSize {
		return fmt.Errorf("%w: session has %d bytes (max %d)", ErrTooLarge, len(session), MaxSessionSize)
	}
	return nil
}

// libError wraps an error from the WebAuthn library, adding its debugging
// detail (which names the mismatch, e.g. the origins expected and received)
// to the message.
func libError(op string, err error) error {
	var pe *protocol.Error
	if errors.As(err, &pe) && pe.DevInfo != "" {
		info := strings.Join(strings.Fields(pe.DevInfo), " ")
		if len(info) > 300 {
			info = strings.ToValidUTF8(info[:300], "") + "..."
		}
		return fmt.Errorf("fido: %s: %w (%s)", op, err, info)
	}
	return fmt.Errorf("fido: %s: %w", op, err)
}
