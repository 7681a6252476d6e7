// Package posture defines the device posture report that the agent collects
// and the broker checks, and how a report is signed with the device's Ed25519
// key and verified: signature, size bound, strict schema, freshness and the
// broker's nonce. It uses only the standard library so that the agent and the
// broker share exactly one definition of the wire format.
//
// A signed report carries the exact JSON bytes that were signed; the verifier
// checks the signature over those bytes before it decodes anything, so no
// canonicalisation is involved and nothing unsigned is ever trusted.
package posture

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/pinhole-dev/pinhole/internal/access"
)

// MaxReportSize is the largest encoded report, in bytes, that Sign produces
// and Verify accepts.
const MaxReportSize = 16 << 10

// MaxFieldLen is the largest length, in bytes, of any string field of a
// Report.
const MaxFieldLen = 1024

// Screen lock states reported in Report.ScreenLock.
const (
	ScreenLockOn      = "on"
	ScreenLockOff     = "off"
	ScreenLockUnknown = "unknown"
)

// Default verification bounds, used when the VerifyOptions field is zero.
const (
	DefaultMaxAge  = 10 * time.Minute
	DefaultMaxSkew = time.Minute
)

// Errors returned by Verify (wrapped, so use errors.Is). Every other failure
// (malformed JSON, missing field, bad key) is an error that wraps none of
// these.
var (
	ErrTooLarge     = errors.New("posture: report too large")
	ErrBadSignature = errors.New("posture: bad signature")
	ErrStale        = errors.New("posture: report is stale")
	ErrFuture       = errors.New("posture: report is dated in the future")
	ErrNonce        = errors.New("posture: nonce mismatch")
)

// Report is the posture of one device at one moment. A collector reports
// what it could not determine as false or "unknown", never as true.
type Report struct {
	// Device identifies the enrolled device that produced the report.
	Device string `json:"device"`
	// Hostname is the device's host name ("unknown" if it could not be read).
	Hostname string `json:"hostname"`
	// OS is a human-readable operating system name and version.
	OS string `json:"os"`
	// Kernel is the running kernel release.
	Kernel string `json:"kernel"`
	// DiskEncrypted reports that the root filesystem is on an encrypted
	// block device.
	DiskEncrypted bool `json:"disk_encrypted"`
	// FirewallActive reports positive evidence of a host packet filter with
	// rules.
	FirewallActive bool `json:"firewall_active"`
	// ScreenLock is ScreenLockOn, ScreenLockOff or ScreenLockUnknown.
	ScreenLock string `json:"screen_lock"`
	// AgentVersion is the version of the agent that collected the report.
	AgentVersion string `json:"agent_version"`
	// CollectedAt is when the report was collected, by the device's clock.
	CollectedAt time.Time `json:"collected_at"`
	// Nonce echoes the broker's nonce when the report answers a request,
	// and is empty otherwise.
	Nonce string `json:"nonce,omitempty"`
}

// Signed is a report together with the device's signature over it.
type Signed struct {
	// Report is the exact JSON encoding of the Report that was signed.
	Report []byte `json:"report"`
	// Signature is the Ed25519 signature over Report.
	Signature []byte `json:"signature"`
}

// Sign encodes r and signs the encoding with priv. It refuses a report that
// Verify would refuse for its content (missing or invalid fields, too large).
func Sign(priv ed25519.PrivateKey, r Report) (Signed, error) {
	if len(priv) != ed25519.PrivateKeySize {
		return Signed{}, fmt.Errorf("posture: signing: private key has %d bytes, want %d", len(priv), ed25519.PrivateKeySize)
	}
	if err := r.validate(); err != nil {
		return Signed{}, fmt.Errorf("posture: signing: %w", err)
	}
	b, err := json.Marshal(r)
	if err != nil {
		return Signed{}, fmt.Errorf("posture: encoding report: %w", err)
	}
	if len(b) > MaxReportSize {
		return Signed{}, fmt.Errorf("%w: %d bytes (max %d)", ErrTooLarge, len(b), MaxReportSize)
	}
	return Signed{Report: b, Signature: ed25519.Sign(priv, b)}, nil
}

// VerifyOptions bounds what Verify accepts. The zero value is usable.
type VerifyOptions struct {
	// Now is the verifier's current time; zero means time.Now().
	Now time.Time
	// MaxAge is how old a report may be; zero means DefaultMaxAge.
	MaxAge time.Duration
	// MaxSkew is how far in the future a report may be dated (clock skew);
	// zero means DefaultMaxSkew.
	MaxSkew time.Duration
	// Nonce, if non-empty, must equal the report's nonce exactly. When it is
	// empty the report's nonce is not checked: such a report can be replayed
	// until it is MaxAge old, so callers answering a challenge must set it.
	Nonce string
}

// Verify checks s against the device public key pub and returns the report.
// In order it checks the size bound (ErrTooLarge), the signature
// (ErrBadSignature), the schema (strict: unknown fields, trailing data,
// missing or invalid fields are refused), the nonce (ErrNonce), and the
// report's age (ErrStale when older than MaxAge, ErrFuture when dated more
// than MaxSkew ahead).
func Verify(pub ed25519.PublicKey, s Signed, o VerifyOptions) (Report, error) {
	if len(s.Report) > MaxReportSize {
		return Report{}, fmt.Errorf("%w: %d bytes (max %d)", ErrTooLarge, len(s.Report), MaxReportSize)
	}
	if len(pub) != ed25519.PublicKeySize {
		return Report{}, fmt.Errorf("posture: verifying: public key has %d bytes, want %d", len(pub), ed25519.PublicKeySize)
	}
	if len(s.Signature) != ed25519.SignatureSize || !ed25519.Verify(pub, s.Report, s.Signature) {
		return Report{}, ErrBadSignature
	}
	r, err := decodeStrict(s.Report)
	if err != nil {
		return Report{}, fmt.Errorf("posture: decoding report: %w", err)
	}
	if o.Nonce != "" && r.Nonce != o.Nonce {
		return Report{}, ErrNonce
	}
	now := o.Now
	if now.IsZero() {
		now = time.Now()
	}
	maxAge := o.MaxAge
	if maxAge <= 0 {
		maxAge = DefaultMaxAge
	}
	maxSkew := o.MaxSkew
	if maxSkew <= 0 {
		maxSkew = DefaultMaxSkew
	}
	if ahead := r.CollectedAt.Sub(now); ahead > maxSkew {
		return Report{}, fmt.Errorf("%w: collected %s ahead of the verifier's clock (max skew %s)", ErrFuture, ahead.Round(time.Second), maxSkew)
	}
	if age := now.Sub(r.CollectedAt); age > maxAge {
		return Report{}, fmt.Errorf("%w: collected %s ago (max age %s)", ErrStale, age.Round(time.Second), maxAge)
	}
	return r, nil
}

// wireReport mirrors Report with pointer fields so that decodeStrict can tell
// a missing field from a zero one.
type wireReport struct {
	Device         *string    `json:"device"`
	Hostname       *string    `json:"hostname"`
	OS             *string    `json:"os"`
	Kernel         *string    `json:"kernel"`
	DiskEncrypted  *bool      `json:"disk_encrypted"`
	FirewallActive *bool      `json:"firewall_active"`
	ScreenLock     *string    `json:"screen_lock"`
	AgentVersion   *string    `json:"agent_version"`
	CollectedAt    *time.Time `json:"collected_at"`
	Nonce          *string    `json:"nonce"`
}

// decodeStrict decodes exactly one JSON object with only known fields, all
// required ones present, and nothing after it.
func decodeStrict(b []byte) (Report, error) {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	var w wireReport
	if err := dec.Decode(&w); err != nil {
		return Report{}, err
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Report{}, errors.New("trailing data after report")
	}
	required := []struct {
		name    string
		present bool
	}{
		{"device", w.Device != nil},
		{"hostname", w.Hostname != nil},
		{"os", w.OS != nil},
		{"kernel", w.Kernel != nil},
		{"disk_encrypted", w.DiskEncrypted != nil},
		{"firewall_active", w.FirewallActive != nil},
		{"screen_lock", w.ScreenLock != nil},
		{"agent_version", w.AgentVersion != nil},
		{"collected_at", w.CollectedAt != nil},
	}
	for _, f := range required {
		if !f.present {
			return Report{}, fmt.Errorf("missing field %q", f.name)
		}
	}
	r := Report{
		Device:         *w.Device,
		Hostname:       *w.Hostname,
		OS:             *w.OS,
		Kernel:         *w.Kernel,
		DiskEncrypted:  *w.DiskEncrypted,
		FirewallActive: *w.FirewallActive,
		ScreenLock:     *w.ScreenLock,
		AgentVersion:   *w.AgentVersion,
		CollectedAt:    *w.CollectedAt,
	}
	if w.Nonce != nil {
		r.Nonce = *w.Nonce
	}
	if err := r.validate(); err != nil {
		return Report{}, err
	}
	return r, nil
}

// validate checks the content rules shared by Sign and Verify.
func (r Report) validate() error {
	fields := []struct{ name, value string }{
		{"device", r.Device},
		{"hostname", r.Hostname},
		{"os", r.OS},
		{"kernel", r.Kernel},
		{"screen_lock", r.ScreenLock},
		{"agent_version", r.AgentVersion},
		{"nonce", r.Nonce},
	}
	for _, f := range fields {
		if f.value == "" && f.name != "nonce" {
			return fmt.Errorf("field %q is empty", f.name)
		}
		if len(f.value) > MaxFieldLen {
			return fmt.Errorf("field %q is %d bytes long (max %d)", f.name, len(f.value), MaxFieldLen)
		}
		if !utf8.ValidString(f.value) {
			return fmt.Errorf("field %q is not valid UTF-8", f.name)
		}
		if i := strings.IndexFunc(f.value, Hidden); i >= 0 {
			r, _ := utf8.DecodeRuneInString(f.value[i:])
			return fmt.Errorf("field %q holds %U, a control or invisible formatting character", f.name, r)
		}
	}
	switch r.ScreenLock {
	case ScreenLockOn, ScreenLockOff, ScreenLockUnknown:
	default:
		return fmt.Errorf("field \"screen_lock\" is %q, want %q, %q or %q", r.ScreenLock, ScreenLockOn, ScreenLockOff, ScreenLockUnknown)
	}
	if r.CollectedAt.IsZero() {
		return errors.New("field \"collected_at\" is zero")
	}
	return nil
}

// Hidden reports runes a report's text fields must not hold, because an
// approver's page would not show them as they are: control characters,
// format characters (bidi overrides, zero-width joiners), line and paragraph
// separators, and blank fillers.
func Hidden(r rune) bool { return unicode.IsControl(r) || access.Invisible(r) }
