package audit

import (
	"crypto/ed25519"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Checkpoint errors, for callers that branch on them (errors.Is).
var (
	// ErrCheckpointSignature means the checkpoint's signature or key ID
	// does not verify under the given public key.
	ErrCheckpointSignature = errors.New("audit: checkpoint signature does not verify")
	// ErrCheckpointMissing means the events do not contain the
	// checkpointed seq: they were cut off before it, or start after it.
	ErrCheckpointMissing = errors.New("audit: checkpointed event is missing")
	// ErrCheckpointMismatch means the event at the checkpointed seq has a
	// different hash than the one that was signed.
	ErrCheckpointMismatch = errors.New("audit: checkpointed event has a different hash")
)

// Checkpoint is a signed statement that the chain's event Seq had hash Hash
// at Time. Handed to an outside witness, it proves later that no event up
// to Seq was dropped or altered.
type Checkpoint struct {
	// Seq is the seq of the checkpointed event.
	Seq int64 `json:"seq"`
	// Hash is that event's Hash.
	Hash string `json:"hash"`
	// Time is when the checkpoint was signed.
	Time time.Time `json:"time"`
	// KeyID names the signing key: see KeyID.
	KeyID string `json:"key_id"`
	// Signature is the Ed25519 signature over Message().
	Signature []byte `json:"signature"`
}

// KeyID returns the identifier of a checkpoint public key: the first 16
// hex digits of the SHA-256 of the raw 32-byte key. It returns "" for a key
// of the wrong length.
func KeyID(pub ed25519.PublicKey) string {
	if len(pub) != ed25519.PublicKeySize {
		return ""
	}
	sum := sha256.Sum256(pub)
	return hex.EncodeToString(sum[:8])
}

// Message returns the bytes a checkpoint's signature covers. This is a
// stored format: the line "pinhole-audit-checkpoint-v1" followed by the
// lines "seq:<decimal>", "hash:<hex>", "time:<UTC RFC 3339 with
// nanoseconds>" and "key_id:<id>", each ending in "\n".
func (cp Checkpoint) Message() []byte {
	b := make([]byte, 0, 160)
	b = append(b, "pinhole-audit-checkpoint-v1\nseq:"...)
	b = strconv.AppendInt(b, cp.Seq, 10)
	b = append(b, "\nhash:"...)
	b = append(b, cp.Hash...)
	b = append(b, "\ntime:"...)
	b = cp.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, "\nkey_id:"...)
	b = append(b, cp.KeyID...)
	return append(b, '\n')
}

// SignCheckpoint signs a checkpoint for last, the newest event of a sealed
// chain, at time now. priv must be a valid Ed25519 private key: like
// ed25519.Sign, it panics on a key of the wrong length (keys are validated
// when they are loaded).
func SignCheckpoint(priv ed25519.PrivateKey, last Event, now time.Time) Checkpoint {
	pub, _ := priv.Public().(ed25519.PublicKey)
	cp := Checkpoint{
		Seq:   last.Seq,
		Hash:  last.Hash,
		Time:  now.UTC().Round(0),
		KeyID: KeyID(pub),
	}
	cp.Signature = ed25519.Sign(priv, cp.Message())
	return cp
}

// VerifyCheckpoint checks that cp was signed by pub and that events contain
// the event cp.Seq with hash cp.Hash. It does not check the chain itself:
// run Verify on the same events first. Together they prove that no event up
// to cp.Seq was edited, dropped or reordered. Errors wrap
// ErrCheckpointSignature, ErrCheckpointMissing or ErrCheckpointMismatch.
func VerifyCheckpoint(pub ed25519.PublicKey, cp Checkpoint, events []Event) error {
	if len(pub) != ed25519.PublicKeySize {
		return fmt.Errorf("%w: public key is %d bytes, want %d", ErrCheckpointSignature, len(pub), ed25519.PublicKeySize)
	}
	if cp.KeyID != KeyID(pub) {
		return fmt.Errorf("%w: checkpoint key id %q is not that of the given key (%s)", ErrCheckpointSignature, cp.KeyID, KeyID(pub))
	}
	if len(cp.Signature) != ed25519.SignatureSize || !ed25519.Verify(pub, cp.Message(), cp.Signature) {
		return fmt.Errorf("%w: checkpoint at seq %d", ErrCheckpointSignature, cp.Seq)
	}
	e, ok := findSeq(events, cp.Seq)
	if !ok {
		return fmt.Errorf("%w: seq %d is not among the events", ErrCheckpointMissing, cp.Seq)
	}
	if subtle.ConstantTimeCompare([]byte(e.Hash), []byte(cp.Hash)) != 1 {
		return fmt.Errorf("%w: seq %d", ErrCheckpointMismatch, cp.Seq)
	}
	return nil
}

// findSeq finds the event with the given seq, directly when the events are
// contiguous and by scanning otherwise.
func findSeq(events []Event, seq int64) (Event, bool) {
	if len(events) == 0 {
		return Event{}, false
	}
	if i := seq - events[0].Seq; i >= 0 && i < int64(len(events)) && events[i].Seq == seq {
		return events[i], true
	}
	for _, e := range events {
		if e.Seq == seq {
			return e, true
		}
	}
	return Event{}, false
}
