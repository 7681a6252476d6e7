package sshca

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"net/netip"
	"strings"
	"time"
	"unicode"

	"golang.org/x/crypto/ssh"
)

// Limits enforced when issuing and checking certificates.
const (
	// MaxUserLifetime is the longest validity window of a user certificate.
	MaxUserLifetime = 24 * time.Hour
	// MaxHostLifetime is the longest validity window of a host certificate.
	MaxHostLifetime = 366 * 24 * time.Hour
	// ClockSkew is how far CheckUserCert lets the clock disagree with a
	// certificate's validity window.
	ClockSkew = 30 * time.Second

	maxKeyIDLen       = 256
	maxPrincipals     = 64
	maxPrincipalLen   = 256
	maxSourcePrefixes = 64
)

// Names of OpenSSH critical options and extensions used here.
const (
	OptionSourceAddress         = "source-address"
	ExtensionPermitPTY          = "permit-pty"
	ExtensionPermitPortForward  = "permit-port-forwarding"
	ExtensionPermitAgentForward = "permit-agent-forwarding"
)

// ErrRejected is wrapped by every error CheckUserCert returns for a
// certificate that must not be accepted.
var ErrRejected = errors.New("sshca: certificate rejected")

// UserCert describes a user certificate to issue.
type UserCert struct {
	// Key is the public key to certify; it must not itself be a certificate.
	Key ssh.PublicKey
	// KeyID names the certificate in sshd's logs (e.g. "grant=g-123 user=alice"); required.
	KeyID string
	// Serial is the certificate serial number, usable in a KRL.
	Serial uint64
	// Principals are the logins the certificate is valid for; at least one.
	Principals []string
	// SourceAddresses, when not empty, becomes the source-address critical
	// option: the certificate is accepted only from these networks.
	SourceAddresses []netip.Prefix
	// ValidAfter and ValidBefore bound the certificate's life; ValidBefore
	// must be after ValidAfter and at most MaxUserLifetime later.
	ValidAfter, ValidBefore time.Time
	// PermitPTY, PermitPortForwarding and PermitAgentForwarding grant the
	// matching extensions. Nothing else is ever granted.
	PermitPTY, PermitPortForwarding, PermitAgentForwarding bool
}

// HostCert describes a host certificate to issue.
type HostCert struct {
	// Key is the host's public key; it must not itself be a certificate.
	Key ssh.PublicKey
	// KeyID names the certificate; required.
	KeyID string
	// Serial is the certificate serial number.
	Serial uint64
	// Principals are the host names and addresses users dial; at least one.
	Principals []string
	// ValidAfter and ValidBefore bound the certificate's life; ValidBefore
	// must be after ValidAfter and at most MaxHostLifetime later.
	ValidAfter, ValidBefore time.Time
}

// IssueUser validates c and returns a user certificate for it signed by ca.
// Only the extensions c asks for are granted, and the only critical option
// ever set is source-address (when c.SourceAddresses is not empty). The nonce
// is drawn from rand (crypto/rand when nil).
func IssueUser(rand io.Reader, ca ssh.Signer, c UserCert) (*ssh.Certificate, error) {
	if err := validateCommon(ca, c.Key, c.KeyID, c.Principals, c.ValidAfter, c.ValidBefore, MaxUserLifetime); err != nil {
		return nil, fmt.Errorf("sshca: issuing user certificate: %w", err)
	}
	perms := ssh.Permissions{Extensions: map[string]string{}}
	if len(c.SourceAddresses) > 0 {
		if len(c.SourceAddresses) > maxSourcePrefixes {
			return nil, fmt.Errorf("sshca: issuing user certificate: more than %d source addresses", maxSourcePrefixes)
		}
		parts := make([]string, 0, len(c.SourceAddresses))
		for _, p := range c.SourceAddresses {
			if !p.IsValid() {
				return nil, errors.New("sshca: issuing user certificate: invalid source address prefix")
			}
			parts = append(parts, p.Masked().String())
		}
		perms.CriticalOptions = map[string]string{OptionSourceAddress: strings.Join(parts, ",")}
	}
	if c.PermitPTY {
		perms.Extensions[ExtensionPermitPTY] = ""
	}
	if c.PermitPortForwarding {
		perms.Extensions[ExtensionPermitPortForward] = ""
	}
	if c.PermitAgentForwarding {
		perms.Extensions[ExtensionPermitAgentForward] = ""
	}
	cert := &ssh.Certificate{
		Key:             c.Key,
		Serial:          c.Serial,
		CertType:        ssh.UserCert,
		KeyId:           c.KeyID,
		ValidPrincipals: append([]string(nil), c.Principals...),
		ValidAfter:      uint64(c.ValidAfter.Unix()),
		ValidBefore:     uint64(c.ValidBefore.Unix()),
		Permissions:     perms,
	}
	if err := sign(rand, cert, ca); err != nil {
		return nil, fmt.Errorf("sshca: signing user certificate: %w", err)
	}
	return cert, nil
}

// IssueHost validates c and returns a host certificate for it signed by ca,
// with no critical options and no extensions.
func IssueHost(rand io.Reader, ca ssh.Signer, c HostCert) (*ssh.Certificate, error) {
	if err := validateCommon(ca, c.Key, c.KeyID, c.Principals, c.ValidAfter, c.ValidBefore, MaxHostLifetime); err != nil {
		return nil, fmt.Errorf("sshca: issuing host certificate: %w", err)
	}
	cert := &ssh.Certificate{
		Key:             c.Key,
		Serial:          c.Serial,
		CertType:        ssh.HostCert,
		KeyId:           c.KeyID,
		ValidPrincipals: append([]string(nil), c.Principals...),
		ValidAfter:      uint64(c.ValidAfter.Unix()),
		ValidBefore:     uint64(c.ValidBefore.Unix()),
	}
	if err := sign(rand, cert, ca); err != nil {
		return nil, fmt.Errorf("sshca: signing host certificate: %w", err)
	}
	return cert, nil
}

func sign(r io.Reader, cert *ssh.Certificate, ca ssh.Signer) error {
	if r == nil {
		r = defaultRand()
	}
	return cert.SignCert(r, ca)
}

func validateCommon(ca ssh.Signer, key ssh.PublicKey, keyID string, principals []string, after, before time.Time, maxLife time.Duration) error {
	if ca == nil {
		return errors.New("no CA signer")
	}
	if _, ok := ca.PublicKey().(*ssh.Certificate); ok {
		return errors.New("CA signer must be a plain key, not a certificate")
	}
	if key == nil {
		return errors.New("no public key to certify")
	}
	if _, ok := key.(*ssh.Certificate); ok {
		return errors.New("cannot certify a certificate")
	}
	if err := checkText("key id", keyID, maxKeyIDLen); err != nil {
		return err
	}
	if len(principals) == 0 {
		return errors.New("at least one principal is required")
	}
	if len(principals) > maxPrincipals {
		return fmt.Errorf("more than %d principals", maxPrincipals)
	}
	for _, p := range principals {
		if err := checkText("principal", p, maxPrincipalLen); err != nil {
			return err
		}
		if strings.ContainsAny(p, ", \t") {
			return fmt.Errorf("principal %q contains a comma or blank", p)
		}
	}
	if after.IsZero() || before.IsZero() {
		return errors.New("validity window needs both ValidAfter and ValidBefore")
	}
	if after.Unix() < 0 {
		return errors.New("ValidAfter is before 1970")
	}
	if !before.After(after) {
		return fmt.Errorf("ValidBefore %s is not after ValidAfter %s", before.UTC().Format(time.RFC3339), after.UTC().Format(time.RFC3339))
	}
	if before.Sub(after) > maxLife {
		return fmt.Errorf("lifetime %s exceeds the maximum of %s", before.Sub(after), maxLife)
	}
	return nil
}

func checkText(what, s string, maxLen int) error {
	if s == "" {
		return fmt.Errorf("%s is empty", what)
	}
	if len(s) > maxLen {
		return fmt.Errorf("%s longer than %d bytes", what, maxLen)
	}
	for _, r := range s {
		if unicode.IsControl(r) || r == '\uFFFD' {
			return fmt.Errorf("%s contains a control character or invalid UTF-8", what)
		}
	}
	return nil
}

// SourceAddresses returns the networks of cert's source-address critical
// option, or nil when the option is absent. A malformed option is an error.
func SourceAddresses(cert *ssh.Certificate) ([]netip.Prefix, error) {
	v, ok := cert.CriticalOptions[OptionSourceAddress]
	if !ok {
		return nil, nil
	}
	parts := strings.Split(v, ",")
	if len(parts) > maxSourcePrefixes {
		return nil, fmt.Errorf("source-address lists more than %d networks", maxSourcePrefixes)
	}
	out := make([]netip.Prefix, 0, len(parts))
	for _, s := range parts {
		s = strings.TrimSpace(s)
		if p, err := netip.ParsePrefix(s); err == nil {
			out = append(out, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("source-address %q is neither an address nor a CIDR prefix", s)
		}
		out = append(out, netip.PrefixFrom(a, a.BitLen()))
	}
	if len(out) == 0 {
		return nil, errors.New("source-address is empty")
	}
	return out, nil
}

// CheckUserCert checks cert the way sshd would before letting principal log
// in at time now: it must be a user certificate signed by one of cas, valid
// at now give or take ClockSkew, list principal among a non-empty set of
// principals, and carry no critical option other than a well-formed
// source-address. Whether the source address matches the peer is the
// caller's business (see SourceAddresses). Every rejection wraps ErrRejected.
func CheckUserCert(cas []ssh.PublicKey, cert *ssh.Certificate, principal string, now time.Time) error {
	if cert == nil {
		return fmt.Errorf("%w: no certificate", ErrRejected)
	}
	if cert.CertType != ssh.UserCert {
		return fmt.Errorf("%w: certificate type %d is not a user certificate", ErrRejected, cert.CertType)
	}
	if cert.SignatureKey == nil {
		return fmt.Errorf("%w: certificate has no signature key", ErrRejected)
	}
	sigKey := cert.SignatureKey.Marshal()
	trusted := false
	for _, ca := range cas {
		if ca != nil && bytes.Equal(ca.Marshal(), sigKey) {
			trusted = true
			break
		}
	}
	if !trusted {
		return fmt.Errorf("%w: certificate signed by an unknown authority %s", ErrRejected, ssh.FingerprintSHA256(cert.SignatureKey))
	}
	if len(cert.ValidPrincipals) == 0 {
		// x/crypto would treat this as "any principal"; OpenSSH and we do not.
		return fmt.Errorf("%w: certificate lists no principals", ErrRejected)
	}
	if principal == "" {
		return fmt.Errorf("%w: empty principal", ErrRejected)
	}
	for opt := range cert.CriticalOptions {
		if opt != OptionSourceAddress {
			return fmt.Errorf("%w: unsupported critical option %q", ErrRejected, opt)
		}
	}
	if _, err := SourceAddresses(cert); err != nil {
		return fmt.Errorf("%w: %w", ErrRejected, err)
	}
	if cert.ValidAfter > math.MaxInt64 {
		return fmt.Errorf("%w: certificate is not yet valid", ErrRejected)
	}
	validAfter := time.Unix(int64(cert.ValidAfter), 0)
	if now.Add(ClockSkew).Before(validAfter) {
		return fmt.Errorf("%w: certificate is not yet valid (valid after %s)", ErrRejected, validAfter.UTC().Format(time.RFC3339))
	}
	if cert.ValidBefore != ssh.CertTimeInfinity {
		if cert.ValidBefore > math.MaxInt64 {
			return fmt.Errorf("%w: certificate has an invalid expiry", ErrRejected)
		}
		validBefore := time.Unix(int64(cert.ValidBefore), 0)
		if !now.Add(-ClockSkew).Before(validBefore) {
			return fmt.Errorf("%w: certificate expired at %s", ErrRejected, validBefore.UTC().Format(time.RFC3339))
		}
	}
	// The skewed window was checked above; CertChecker has no notion of skew,
	// so give it a clock inside the certificate's own window and let it check
	// the principal and, above all, the CA signature.
	checkAt := now
	if checkAt.Before(validAfter) {
		checkAt = validAfter
	}
	if cert.ValidBefore != ssh.CertTimeInfinity {
		if last := time.Unix(int64(cert.ValidBefore)-1, 0); checkAt.After(last) {
			checkAt = last
		}
	}
	checker := ssh.CertChecker{
		SupportedCriticalOptions: []string{OptionSourceAddress},
		Clock:                    func() time.Time { return checkAt },
	}
	if err := checker.CheckCert(principal, cert); err != nil {
		return fmt.Errorf("%w: %w", ErrRejected, err)
	}
	return nil
}
