package service

import (
	"errors"
	"fmt"

	"github.com/pinhole-dev/pinhole/internal/store"
)

// Kind classifies a service error for the transport layers; broker/api turns
// it into an HTTP status in one place.
type Kind int

// Error kinds.
const (
	KindInternal        Kind = iota // a bug or an I/O failure
	KindBadInput                    // the caller sent something malformed
	KindUnauthenticated             // no or unknown identity
	KindForbidden                   // identity known, action not allowed
	KindNotFound                    // no such thing (or not visible to the caller)
	KindConflict                    // state does not allow it (already used, not pending)
	KindPolicy                      // the rules refuse it; Msg says why
	KindGone                        // expired link or ceremony
)

// Error is a classified service error with a message safe to show the caller.
type Error struct {
	Kind Kind
	Msg  string
	Err  error
}

func (e *Error) Error() string {
	if e.Err != nil && e.Msg == "" {
		return e.Err.Error()
	}
	return e.Msg
}

func (e *Error) Unwrap() error { return e.Err }

func errorf(k Kind, format string, args ...any) error {
	return &Error{Kind: k, Msg: fmt.Sprintf(format, args...)}
}

// KindOf returns the kind of err (KindInternal when unclassified; store
// sentinels map to NotFound and Conflict).
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	switch {
	case errors.Is(err, store.ErrNotFound):
		return KindNotFound
	case errors.Is(err, store.ErrConflict):
		return KindConflict
	}
	return KindInternal
}
