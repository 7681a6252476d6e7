// Package audit defines pinhole's tamper-evident audit log: event types, the
// canonical encoding every event is hashed over, the SHA-256 hash chain that
// links each event to the one before it, Ed25519-signed checkpoints, and
// Verify, which detects any edited, dropped, reordered or inserted event.
//
// The package is part of the domain core: it performs no I/O of its own and
// imports only the standard library. Readers and writers are passed in.
//
// A chain starts at GenesisHash. Each event's PrevHash is the Hash of the
// event with the previous Seq, and its Hash is the lower-case hex SHA-256 of
// Canonical(event). Seal computes both; Verify recomputes them.
//
// A chain alone cannot reveal that its newest events were cut off. Signed
// checkpoints (SignCheckpoint) handed to an outside witness close that gap:
// VerifyCheckpoint proves that the events still contain the checkpointed
// event with the checkpointed hash.
package audit

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"strings"
	"time"
	"unicode/utf8"
)

// GenesisHash is the PrevHash of the first event (Seq 1) of every chain.
const GenesisHash = "0000000000000000000000000000000000000000000000000000000000000000"

// Event types. The set is open: new types may be added, and Verify does not
// interpret Type.
const (
	TypeUserInvited          = "user.invited"
	TypeInviteRequested      = "invite.requested"
	TypeCredentialRegistered = "credential.registered"
	TypeDeviceEnrolled       = "device.enrolled"
	TypeDeviceConfirmed      = "device.confirmed"
	TypePostureAccepted      = "posture.accepted"
	TypePostureRejected      = "posture.rejected"
	TypeRequestCreated       = "request.created"
	TypeRequestRefused       = "request.refused"
	TypeApprovalRecorded     = "approval.recorded"
	TypeApprovalRejected     = "approval.rejected"
	TypeRequestDenied        = "request.denied"
	TypeGrantIssued          = "grant.issued"
	TypeGrantActivated       = "grant.activated"
	TypeGrantEnded           = "grant.ended"
	TypeCertIssued           = "cert.issued"
	TypeFlowAllowed          = "flow.allowed"
	TypeFlowDenied           = "flow.denied"
	TypeSessionStarted       = "session.started"
	TypeSessionEnded         = "session.ended"
	TypeRecordingClosed      = "recording.closed"
	TypeRecordingFailed      = "recording.failed"
	TypeLinkRejected         = "link.rejected"
	TypeBrokerStarted        = "broker.started"
)

// Event is one audit record. Every field except Hash is covered by Hash
// (see Canonical). Empty string fields mean "not applicable"; a nil and an
// empty Details encode the same way.
type Event struct {
	// Seq numbers events from 1 without gaps.
	Seq int64 `json:"seq"`
	// Time is when the event happened; it is hashed at nanosecond
	// precision in UTC, so the time zone it is stored in does not matter.
	Time time.Time `json:"time"`
	// Type is one of the Type… constants.
	Type string `json:"type"`
	// Actor is the person (or "system") who caused the event.
	Actor string `json:"actor,omitempty"`
	// Device is the device ID involved, if any.
	Device string `json:"device,omitempty"`
	// Src is the source address (client IP, tunnel address) if any.
	Src string `json:"src,omitempty"`
	// Target is the policy target name, if any.
	Target string `json:"target,omitempty"`
	// Request is the access request ID, if any.
	Request string `json:"request,omitempty"`
	// Grant is the grant ID, if any.
	Grant string `json:"grant,omitempty"`
	// Details holds further type-specific facts. Values are never secrets.
	Details map[string]string `json:"details,omitempty"`
	// PrevHash is the Hash of the event with Seq-1, or GenesisHash.
	PrevHash string `json:"prev_hash"`
	// Hash is the lower-case hex SHA-256 of Canonical(e).
	Hash string `json:"hash"`
}

// Seal returns e with PrevHash set to prevHash and Hash set to the lower-case
// hex SHA-256 of Canonical of the result. Every string of e, Details keys and
// values included, is first made valid UTF-8 (each run of bytes that are not
// UTF-8 becomes one U+FFFD), so the sealed event survives any text encoding, JSON
// included, unchanged: a client that puts stray bytes in an SSH command or
// a certificate key ID cannot make a stored chain fail verification. It never
// modifies e.Details; it copies the map when it has to repair an entry.
func Seal(prevHash string, e Event) Event {
	e = validText(e)
	e.PrevHash = prevHash
	e.Hash = hashOf(e)
	return e
}

// validText returns e with every string made valid UTF-8.
func validText(e Event) Event {
	for _, f := range []*string{&e.Type, &e.Actor, &e.Device, &e.Src, &e.Target, &e.Request, &e.Grant} {
		*f = strings.ToValidUTF8(*f, "\uFFFD")
	}
	for k, v := range e.Details {
		if utf8.ValidString(k) && utf8.ValidString(v) {
			continue
		}
		d := make(map[string]string, len(e.Details))
		for k, v := range e.Details {
			d[strings.ToValidUTF8(k, "\uFFFD")] = strings.ToValidUTF8(v, "\uFFFD")
		}
		e.Details = d
		break
	}
	return e
}

func hashOf(e Event) string {
	sum := sha256.Sum256(Canonical(e))
	return hex.EncodeToString(sum[:])
}

// VerifyError reports the first event of a chain that fails verification.
type VerifyError struct {
	// Seq is the Seq field of the offending event as stored.
	Seq int64
	// Reason says what is wrong with it.
	Reason string
}

// Error implements error: "audit: event seq N: reason".
func (e *VerifyError) Error() string {
	return fmt.Sprintf("audit: event seq %d: %s", e.Seq, e.Reason)
}

// Verify checks that events form an unbroken hash chain:
//
//   - every Seq is positive and each event's Seq is the previous one's + 1;
//   - an event with Seq 1 links to GenesisHash;
//   - every other event's PrevHash equals the previous event's Hash;
//   - every Hash is 64 lower-case hex digits and equals the recomputed hash.
//
// A slice that starts after Seq 1 (an excerpt) is accepted with its first
// PrevHash taken as given; only a signed checkpoint can vouch for it.
// Verify returns nil for an empty slice, and otherwise a *VerifyError naming
// the first bad event. This detects any edit, drop, reorder or insertion,
// but not the removal of the newest events: use VerifyCheckpoint for that.
func Verify(events []Event) error {
	for i := range events {
		e := &events[i]
		if e.Seq < 1 {
			return &VerifyError{Seq: e.Seq, Reason: "seq must be positive"}
		}
		if i == 0 {
			if e.Seq == 1 && e.PrevHash != GenesisHash {
				return &VerifyError{Seq: e.Seq, Reason: "first event does not link to the genesis hash"}
			}
			if !isHash(e.PrevHash) {
				return &VerifyError{Seq: e.Seq, Reason: "prev_hash is not 64 lower-case hex digits"}
			}
		} else {
			prev := &events[i-1]
			if e.Seq != prev.Seq+1 {
				return &VerifyError{Seq: e.Seq, Reason: fmt.Sprintf("out of sequence: want seq %d after seq %d", prev.Seq+1, prev.Seq)}
			}
			if e.PrevHash != prev.Hash {
				return &VerifyError{Seq: e.Seq, Reason: fmt.Sprintf("prev_hash does not match the hash of seq %d", prev.Seq)}
			}
		}
		if !isHash(e.Hash) {
			return &VerifyError{Seq: e.Seq, Reason: "hash is not 64 lower-case hex digits"}
		}
		if hashOf(*e) != e.Hash {
			return &VerifyError{Seq: e.Seq, Reason: "hash does not match the event's contents"}
		}
	}
	return nil
}

// isHash reports whether s is 64 lower-case hex digits.
func isHash(s string) bool {
	if len(s) != sha256.Size*2 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if (c < '0' || c > '9') && (c < 'a' || c > 'f') {
			return false
		}
	}
	return true
}
