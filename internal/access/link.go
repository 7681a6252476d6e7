package access

import (
	"errors"
	"fmt"
	"time"
)

// Grant-link errors.
var (
	// ErrLinkUsed means the link was already used.
	ErrLinkUsed = errors.New("access: grant link already used")
	// ErrLinkExpired means the link's time ran out.
	ErrLinkExpired = errors.New("access: grant link expired")
	// ErrLinkMismatch means the link belongs to another request or
	// approver.
	ErrLinkMismatch = errors.New("access: grant link is for another request or approver")
)

// Link is a per-approver grant link: single-use, bound to one request and
// one approver, valid until ExpiresAt. The secret token that names a link
// is kept (hashed) by the store, not here.
type Link struct {
	// RequestID is the request the link may act on.
	RequestID string `json:"request_id"`
	// Approver is the only user who may use the link.
	Approver string `json:"approver"`
	// ExpiresAt is when the link stops working; zero means already
	// expired.
	ExpiresAt time.Time `json:"expires_at"`
	// UsedAt is when the link was used; zero means unused.
	UsedAt time.Time `json:"used_at,omitzero"`
}

// Check reports whether the link may be used at now by approver on
// requestID. In order it returns ErrLinkMismatch (wrong or empty request or
// approver), ErrLinkUsed, then ErrLinkExpired (at or after ExpiresAt).
func (l Link) Check(requestID, approver string, now time.Time) error {
	if l.RequestID == "" || l.Approver == "" || requestID != l.RequestID || approver != l.Approver {
		return ErrLinkMismatch
	}
	if !l.UsedAt.IsZero() {
		return fmt.Errorf("%w: at %s", ErrLinkUsed, l.UsedAt.UTC().Format(time.RFC3339))
	}
	if !now.Before(l.ExpiresAt) {
		return fmt.Errorf("%w: at %s", ErrLinkExpired, l.ExpiresAt.UTC().Format(time.RFC3339))
	}
	return nil
}

// Use checks the link like Check and, when it may be used, marks it used
// at now.
func (l *Link) Use(requestID, approver string, now time.Time) error {
	if err := l.Check(requestID, approver, now); err != nil {
		return err
	}
	l.UsedAt = now
	return nil
}
