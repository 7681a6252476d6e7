package sqlstore

import (
	"bytes"
	"context"
	"io/fs"
	"log/slog"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pinhole-dev/pinhole/internal/access"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/store/storetest"
)

func openTemp(t *testing.T, path string, log *slog.Logger) *Store {
	t.Helper()
	s, err := Open(t.Context(), path, log)
	if err != nil {
		t.Fatalf("Open(%s): %v", path, err)
	}
	return s
}

func TestConformance(t *testing.T) {
	t.Parallel()
	storetest.Run(t, func(t *testing.T) store.Store {
		s := openTemp(t, filepath.Join(t.TempDir(), "pinhole.db"), nil)
		t.Cleanup(func() {
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
		})
		return s
	})
}

type migration struct {
	Version int
	Name    string
}

func appliedMigrations(t *testing.T, s *Store) []migration {
	t.Helper()
	rows, err := s.db.QueryContext(t.Context(), `SELECT version, name FROM schema_migrations ORDER BY version`)
	if err != nil {
		t.Fatalf("reading schema_migrations: %v", err)
	}
	defer rows.Close()
	var out []migration
	for rows.Next() {
		var m migration
		if err := rows.Scan(&m.Version, &m.Name); err != nil {
			t.Fatalf("reading schema_migrations: %v", err)
		}
		out = append(out, m)
	}
	if err := rows.Err(); err != nil {
		t.Fatalf("reading schema_migrations: %v", err)
	}
	return out
}

func TestMigrationsAppliedOnce(t *testing.T) {
	t.Parallel()
	names, err := fs.Glob(migrations, "migrations/*.sql")
	if err != nil || len(names) == 0 {
		t.Fatalf("embedded migrations: %v, %d files", err, len(names))
	}
	var want []migration
	for i, n := range names {
		base := strings.TrimPrefix(n, "migrations/")
		want = append(want, migration{Version: i + 1, Name: base})
	}

	path := filepath.Join(t.TempDir(), "pinhole.db")
	var logs bytes.Buffer
	log := slog.New(slog.NewTextHandler(&logs, nil))

	s := openTemp(t, path, log)
	if d := cmp.Diff(want, appliedMigrations(t, s)); d != "" {
		t.Errorf("after first open (-want +got):\n%s", d)
	}
	if got := strings.Count(logs.String(), "applied migration"); got != len(names) {
		t.Errorf("first open logged %d applied migrations, want %d:\n%s", got, len(names), logs.String())
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	for i := range 2 {
		logs.Reset()
		s = openTemp(t, path, log)
		if d := cmp.Diff(want, appliedMigrations(t, s)); d != "" {
			t.Errorf("reopen %d (-want +got):\n%s", i+1, d)
		}
		if strings.Contains(logs.String(), "applied migration") {
			t.Errorf("reopen %d applied migrations again:\n%s", i+1, logs.String())
		}
		if err := s.Close(); err != nil {
			t.Fatalf("Close: %v", err)
		}
	}
}

func TestPragmas(t *testing.T) {
	t.Parallel()
	s := openTemp(t, filepath.Join(t.TempDir(), "pinhole.db"), nil)
	defer s.Close()
	tests := []struct {
		pragma string
		want   string
	}{
		{"journal_mode", "wal"},
		{"synchronous", "2"}, // FULL
		{"foreign_keys", "1"},
	}
	for _, tc := range tests {
		var got string
		if err := s.db.QueryRowContext(t.Context(), "PRAGMA "+tc.pragma).Scan(&got); err != nil {
			t.Fatalf("PRAGMA %s: %v", tc.pragma, err)
		}
		if got != tc.want {
			t.Errorf("PRAGMA %s = %q, want %q", tc.pragma, got, tc.want)
		}
	}
}

func TestDataSurvivesReopen(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "pinhole.db")
	t0 := storetest.T0
	u := store.User{Name: "ada", Role: "admin", WebAuthnID: bytes.Repeat([]byte{7}, 32), CreatedAt: t0}
	r := access.Request{
		ID: "r1", Requester: "alice", Device: "dev-1", Target: "db-prod", Reason: "INC-1",
		TTL: time.Hour, CreatedAt: t0, PendingUntil: t0.Add(time.Hour), RequiredApprovals: 1,
		ApproverRoles: []string{"admin"}, State: access.StatePending,
	}
	var sealed []audit.Event

	s := openTemp(t, path, nil)
	err := s.Update(t.Context(), func(tx store.Tx) error {
		ctx := t.Context()
		if err := tx.CreateUser(ctx, u); err != nil {
			return err
		}
		if err := tx.CreateRequest(ctx, r); err != nil {
			return err
		}
		for i := range 3 {
			e, err := tx.AppendAudit(ctx, audit.Event{Time: t0.Add(time.Duration(i)), Type: audit.TypeUserInvited, Actor: "bootstrap"})
			if err != nil {
				return err
			}
			sealed = append(sealed, e)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Update: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}

	s = openTemp(t, path, nil)
	defer s.Close()
	err = s.Update(t.Context(), func(tx store.Tx) error {
		ctx := t.Context()
		gotU, err := tx.User(ctx, "ada")
		if err != nil {
			return err
		}
		if d := cmp.Diff(u, gotU); d != "" {
			t.Errorf("user after reopen (-want +got):\n%s", d)
		}
		gotR, err := tx.Request(ctx, "r1")
		if err != nil {
			return err
		}
		if d := cmp.Diff(r, gotR); d != "" {
			t.Errorf("request after reopen (-want +got):\n%s", d)
		}
		// The chain continues where it stopped.
		e, err := tx.AppendAudit(ctx, audit.Event{Time: t0.Add(time.Second), Type: audit.TypeBrokerStarted, Actor: "system"})
		if err != nil {
			return err
		}
		sealed = append(sealed, e)
		got, err := tx.AuditEvents(ctx, 0, 100)
		if err != nil {
			return err
		}
		if d := cmp.Diff(sealed, got); d != "" {
			t.Errorf("audit events after reopen (-want +got):\n%s", d)
		}
		if err := audit.Verify(got); err != nil {
			t.Errorf("Verify after reopen: %v", err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Update after reopen: %v", err)
	}
}

func TestOpenFails(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "missing-dir", "pinhole.db")
	s, err := Open(context.Background(), path, nil)
	if err == nil {
		s.Close()
		t.Fatalf("Open(%s) succeeded, want an error", path)
	}
}
