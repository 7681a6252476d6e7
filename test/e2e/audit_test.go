package e2e

import (
	"database/sql"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	_ "modernc.org/sqlite"

	"github.com/pinhole-dev/pinhole/internal/audit"
)

// TestAuditVerifyDetectsStoreEdits edits, drops and reorders audit rows in
// the broker's SQLite file the way someone with disk access would, and checks
// that verification names the first bad event each time.
func TestAuditVerifyDetectsStoreEdits(t *testing.T) {
	e := newEnv(t)
	e.invite("alice", "dba")
	e.invite("bob", "approver")
	e.invite("carol", "approver")
	evs := e.auditEvents()
	if len(evs) < 6 {
		t.Fatalf("only %d events", len(evs))
	}
	if err := audit.Verify(evs); err != nil {
		t.Fatalf("untouched chain: %v", err)
	}
	db, err := sql.Open("sqlite", "file:"+filepath.Join(e.dir, "broker", "pinhole.db")+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	load := func() []audit.Event {
		rows, err := db.Query(`SELECT data FROM audit_events ORDER BY seq`)
		if err != nil {
			t.Fatal(err)
		}
		defer rows.Close()
		var out []audit.Event
		for rows.Next() {
			var b []byte
			rows.Scan(&b)
			var ev audit.Event
			if err := json.Unmarshal(b, &ev); err != nil {
				t.Fatal(err)
			}
			out = append(out, ev)
		}
		return out
	}
	exec := func(q string, args ...any) {
		t.Helper()
		if _, err := db.Exec(q, args...); err != nil {
			t.Fatal(err)
		}
	}
	tests := []struct {
		name    string
		tamper  func()
		undo    func()
		wantSeq int64
	}{
		{"edit/actor", func() {
			ev := evs[2]
			ev.Actor = "mallory"
			b, _ := json.Marshal(ev)
			exec(`UPDATE audit_events SET data = ? WHERE seq = ?`, b, ev.Seq)
		}, func() {
			b, _ := json.Marshal(evs[2])
			exec(`UPDATE audit_events SET data = ? WHERE seq = ?`, b, evs[2].Seq)
		}, evs[2].Seq},
		{"drop/middle", func() { exec(`DELETE FROM audit_events WHERE seq = ?`, evs[3].Seq) }, func() {
			b, _ := json.Marshal(evs[3])
			exec(`INSERT INTO audit_events(seq, hash, data) VALUES (?, ?, ?)`, evs[3].Seq, evs[3].Hash, b)
		}, evs[4].Seq},
		{"reorder/swap", func() {
			a, b := evs[1], evs[2]
			a.Seq, b.Seq = b.Seq, a.Seq
			ja, _ := json.Marshal(a)
			jb, _ := json.Marshal(b)
			exec(`UPDATE audit_events SET data = ? WHERE seq = ?`, jb, evs[1].Seq)
			exec(`UPDATE audit_events SET data = ? WHERE seq = ?`, ja, evs[2].Seq)
		}, func() {
			ja, _ := json.Marshal(evs[1])
			jb, _ := json.Marshal(evs[2])
			exec(`UPDATE audit_events SET data = ? WHERE seq = ?`, ja, evs[1].Seq)
			exec(`UPDATE audit_events SET data = ? WHERE seq = ?`, jb, evs[2].Seq)
		}, evs[1].Seq},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.tamper()
			defer tt.undo()
			err := audit.Verify(load())
			var ve *audit.VerifyError
			if !errors.As(err, &ve) || ve.Seq != tt.wantSeq {
				t.Fatalf("verify after %s: got %v, want failure at seq %d", tt.name, err, tt.wantSeq)
			}
		})
	}
	if err := audit.Verify(load()); err != nil {
		t.Fatalf("restored chain: %v", err)
	}
}

// TestAuditCheckpointCatchesTailCut: once the head is checkpointed (and
// witnessed outside the store), deleting the newest events or re-hashing the
// chain no longer passes verification.
func TestAuditCheckpointCatchesTailCut(t *testing.T) {
	e := newEnv(t)
	e.invite("alice", "dba")
	e.invite("bob", "approver")
	cp, err := e.b.Service().Checkpoint(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	pub := e.b.Service().AuditPublicKey()
	evs := e.auditEvents()
	if err := audit.VerifyCheckpoint(pub, cp, evs); err != nil {
		t.Fatalf("fresh checkpoint: %v", err)
	}
	w, err := os.ReadFile(filepath.Join(e.dir, "witness.jsonl"))
	if err != nil || !strings.Contains(string(w), cp.Hash) {
		t.Fatalf("witness file lacks the checkpoint: %v %q", err, w)
	}
	// A second call with no new events signs nothing new.
	if again, err := e.b.Service().Checkpoint(e.ctx); err != nil || again.Seq != cp.Seq {
		t.Fatalf("idempotent checkpoint: %+v %v", again, err)
	}

	db, err := sql.Open("sqlite", "file:"+filepath.Join(e.dir, "broker", "pinhole.db")+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	if _, err := db.Exec(`DELETE FROM audit_events WHERE seq >= ?`, cp.Seq-1); err != nil {
		t.Fatal(err)
	}
	cut := e.auditEvents()
	if err := audit.Verify(cut); err != nil {
		t.Fatalf("the cut chain is still a valid chain, as expected of a chain alone: %v", err)
	}
	if err := audit.VerifyCheckpoint(pub, cp, cut); !errors.Is(err, audit.ErrCheckpointMissing) {
		t.Fatalf("checkpoint against a cut log: %v, want ErrCheckpointMissing", err)
	}
	// New events on top of the cut log: the broker refuses to sign a head
	// that no longer extends its last checkpoint, so the cut cannot be
	// laundered with a fresh signature.
	e.invite("carol", "approver")
	if got, err := e.b.Service().Checkpoint(e.ctx); err == nil {
		t.Fatalf("the broker signed a checkpoint at seq %d over a truncated chain", got.Seq)
	}
}
