package fido

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"

	"github.com/go-webauthn/webauthn/protocol"
	"github.com/go-webauthn/webauthn/webauthn"
)

// Ceremony names recorded in a session, so that a registration session
// cannot finish an assertion or the reverse.
const (
	ceremonyRegistration = "registration"
	ceremonyAssertion    = "assertion"
)

// sessionVersion is the version of the session encoding.
const sessionVersion = 1

// sealedSession is the JSON form of the opaque session bytes.
type sealedSession struct {
	Version  int                  `json:"v"`
	Ceremony string               `json:"ceremony"`
	RPID     string               `json:"rp_id"`
	Expires  int64                `json:"expires"` // unix milliseconds, by Config.Now
	Data     webauthn.SessionData `json:"data"`
}

// seal encodes the browser options and the session.
func (f *FIDO) seal(ceremony string, options any, sd *webauthn.SessionData) (opts, session []byte, err error) {
	opts, err = json.Marshal(options)
	if err != nil {
		return nil, nil, fmt.Errorf("fido: encoding %s options: %w", ceremony, err)
	}
	session, err = json.Marshal(sealedSession{
		Version:  sessionVersion,
		Ceremony: ceremony,
		RPID:     f.rpID,
		Expires:  f.now().Add(f.timeout).UnixMilli(),
		Data:     *sd,
	})
	if err != nil {
		return nil, nil, fmt.Errorf("fido: encoding %s session: %w", ceremony, err)
	}
	return opts, session, nil
}

// decodeSession decodes session bytes without judging their content.
func decodeSession(session []byte) (sealedSession, error) {
	if len(session) > MaxSessionSize {
		return sealedSession{}, fmt.Errorf("%w: session has %d bytes (max %d)", ErrTooLarge, len(session), MaxSessionSize)
	}
	var s sealedSession
	dec := json.NewDecoder(bytes.NewReader(session))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&s); err != nil {
		return sealedSession{}, fmt.Errorf("%w: %v", ErrSession, err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return sealedSession{}, fmt.Errorf("%w: trailing data", ErrSession)
	}
	if s.Version != sessionVersion {
		return sealedSession{}, fmt.Errorf("%w: version %d, want %d", ErrSession, s.Version, sessionVersion)
	}
	return s, nil
}

// open decodes a session for ceremony and checks that it belongs to this
// relying party, requires user verification and has not expired.
func (f *FIDO) open(ceremony string, session []byte) (webauthn.SessionData, error) {
	s, err := decodeSession(session)
	if err != nil {
		return webauthn.SessionData{}, err
	}
	switch {
	case s.Ceremony != ceremony:
		return webauthn.SessionData{}, fmt.Errorf("%w: %s session used to finish %s", ErrSession, s.Ceremony, ceremony)
	case s.RPID != f.rpID || s.Data.RelyingPartyID != f.rpID:
		return webauthn.SessionData{}, fmt.Errorf("%w: session belongs to another relying party", ErrSession)
	case s.Data.UserVerification != protocol.VerificationRequired:
		return webauthn.SessionData{}, fmt.Errorf("%w: session does not require user verification", ErrSession)
	case len(s.Data.UserID) == 0:
		return webauthn.SessionData{}, fmt.Errorf("%w: session names no user", ErrSession)
	case f.now().UnixMilli() > s.Expires:
		return webauthn.SessionData{}, ErrExpired
	}
	return s.Data, nil
}

// SessionChallenge returns the raw challenge recorded in a session, so that
// a caller can re-check what an assertion committed to before acting on it.
func SessionChallenge(session []byte) ([]byte, error) {
	s, err := decodeSession(session)
	if err != nil {
		return nil, err
	}
	c, err := base64.RawURLEncoding.DecodeString(s.Data.Challenge)
	if err != nil || len(c) == 0 {
		return nil, fmt.Errorf("%w: bad challenge", ErrSession)
	}
	return c, nil
}
