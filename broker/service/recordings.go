package service

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/recording"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// maxCastBytes caps one session's recording; past it the recording ends with
// an explicit truncation marker and the session is ended (fail closed).
const maxCastBytes = 256 << 20

// SessionMeta describes a session about to be recorded.
type SessionMeta struct {
	ID, Request, User, Target, Login, Kind, Command, Term string
	Width, Height                                         int
	Started                                               time.Time
}

// SessionRecording streams one session to disk as asciicast v2 and, on
// Close, seals its SHA-256 into the audit log.
type SessionRecording struct {
	s    *Service
	meta SessionMeta
	file *recording.File
	cast *recording.CastWriter
	once sync.Once
	err  error
}

// OpenRecording creates the recording of a session. An error means the
// session must not start.
func (s *Service) OpenRecording(ctx context.Context, m SessionMeta) (*SessionRecording, error) {
	if s.cfg.Recordings == nil {
		return nil, errors.New("no recording storage configured")
	}
	f, err := s.cfg.Recordings.Create(m.ID)
	if err != nil {
		return nil, fmt.Errorf("creating recording: %w", err)
	}
	w, h := m.Width, m.Height
	if w <= 0 || h <= 0 {
		w, h = 80, 24
	}
	cast, err := recording.NewCastWriter(f, recording.CastHeader{Version: 2, Width: w, Height: h, Timestamp: m.Started.Unix(),
		Command: m.Command, Title: m.Target + " " + m.Kind, Env: map[string]string{"TERM": m.Term},
		Grant: m.Request, User: m.User, Target: m.Target, Session: m.ID}, s.now, maxCastBytes)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("writing recording header: %w", err)
	}
	rec := wire.Recording{ID: m.ID, Request: m.Request, User: m.User, Target: m.Target, Kind: m.Kind, Started: m.Started}
	if err := s.cfg.Store.Update(ctx, func(tx store.Tx) error { return tx.PutRecording(ctx, rec) }); err != nil {
		cast.Close()
		f.Close()
		return nil, err
	}
	return &SessionRecording{s: s, meta: m, file: f, cast: cast}, nil
}

// Output records terminal output.
func (r *SessionRecording) Output(p []byte) error { return r.cast.Output(p) }

// Resize records a terminal resize.
func (r *SessionRecording) Resize(cols, rows int) error { return r.cast.Resize(cols, rows) }

// Close finishes the file and writes recording.closed with its hash.
func (r *SessionRecording) Close() error {
	r.once.Do(func() { r.err = r.close() })
	return r.err
}

func (r *SessionRecording) close() error {
	cerr := r.cast.Close()
	sum, size, ferr := r.file.Close()
	ctx := context.Background()
	if err := errors.Join(cerr, ferr); err != nil {
		_ = r.s.Audit(ctx, audit.Event{Type: audit.TypeRecordingFailed, Actor: r.meta.User, Request: r.meta.Request, Grant: r.meta.Request, Target: r.meta.Target,
			Details: map[string]string{"session": r.meta.ID, "error": err.Error()}})
		return fmt.Errorf("closing recording %s: %w", r.meta.ID, err)
	}
	rec := wire.Recording{ID: r.meta.ID, Request: r.meta.Request, User: r.meta.User, Target: r.meta.Target, Kind: r.meta.Kind,
		Started: r.meta.Started, Ended: r.s.now(), SHA256: sum, Size: size}
	return r.s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		if err := tx.PutRecording(ctx, rec); err != nil {
			return err
		}
		return r.s.record(ctx, tx, audit.Event{Type: audit.TypeRecordingClosed, Actor: r.meta.User, Request: r.meta.Request, Grant: r.meta.Request, Target: r.meta.Target,
			Details: map[string]string{"session": r.meta.ID, "sha256": sum, "size": fmt.Sprint(size)}})
	})
}

// closeInterrupted seals the recordings a stopped broker left open (kill -9,
// power loss): the prefix on disk is kept, hashed and sealed into the audit
// log as interrupted, so no recording stays "live" forever. It runs at start,
// before any session can open a recording.
func (s *Service) closeInterrupted(ctx context.Context) error {
	if s.cfg.Recordings == nil {
		return nil
	}
	var all []wire.Recording
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		all, err = tx.Recordings(ctx, 1000)
		return err
	}); err != nil {
		return fmt.Errorf("listing recordings: %w", err)
	}
	for _, rec := range all {
		if !rec.Ended.IsZero() {
			continue
		}
		base := audit.Event{Actor: rec.User, Request: rec.Request, Grant: rec.Request, Target: rec.Target}
		sum, size, err := s.hashRecording(rec.ID)
		if err != nil {
			s.log.Error("interrupted recording unreadable", "session", rec.ID, "err", err)
			base.Type = audit.TypeRecordingFailed
			base.Details = map[string]string{"session": rec.ID, "stage": "restart", "error": err.Error()}
			rec.Ended = s.now()
		} else {
			base.Type = audit.TypeRecordingClosed
			base.Details = map[string]string{"session": rec.ID, "sha256": sum, "size": fmt.Sprint(size), "interrupted": "the broker stopped before the session ended"}
			rec.Ended, rec.SHA256, rec.Size = s.now(), sum, size
			s.log.Warn("sealed a recording the broker left open", "session", rec.ID, "size", size)
		}
		if err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
			if err := tx.PutRecording(ctx, rec); err != nil {
				return err
			}
			return s.record(ctx, tx, base)
		}); err != nil {
			return fmt.Errorf("sealing recording %s: %w", rec.ID, err)
		}
	}
	return nil
}

// hashRecording returns the hex SHA-256 and size of a stored recording.
func (s *Service) hashRecording(id string) (string, int64, error) {
	f, err := s.cfg.Recordings.Open(id)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, err
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// Recordings lists recordings for an admin, or the caller's own.
func (s *Service) Recordings(ctx context.Context, u store.User) ([]wire.Recording, error) {
	var all []wire.Recording
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		all, err = tx.Recordings(ctx, 1000)
		return err
	})
	out := []wire.Recording{}
	for _, r := range all {
		if u.Role == RoleAdmin || r.User == u.Name {
			out = append(out, r)
		}
	}
	return out, err
}

// OpenCast opens a recording's bytes for an admin or its owner.
func (s *Service) OpenCast(ctx context.Context, u store.User, id string) (io.ReadCloser, error) {
	var rec wire.Recording
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		rec, err = tx.Recording(ctx, id)
		return err
	})
	if err != nil || (u.Role != RoleAdmin && rec.User != u.Name) {
		return nil, errorf(KindNotFound, "no recording %s", id)
	}
	return s.cfg.Recordings.Open(id)
}

// AuditEvents returns a page of the audit log to an admin.
func (s *Service) AuditEvents(ctx context.Context, u store.User, after int64, limit int) ([]audit.Event, error) {
	if u.Role != RoleAdmin {
		return nil, errorf(KindForbidden, "only an admin may read the audit log")
	}
	if limit <= 0 || limit > 1001 {
		limit = 1001
	}
	var evs []audit.Event
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		evs, err = tx.AuditEvents(ctx, after, limit)
		return err
	})
	return evs, err
}

// SessionEvent audits a proxied session's start and end.
func (s *Service) SessionEvent(ctx context.Context, typ string, m SessionMeta, details map[string]string) {
	if details == nil {
		details = map[string]string{}
	}
	details["session"] = m.ID
	details["kind"] = m.Kind
	if m.Command != "" {
		details["command"] = m.Command
	}
	if err := s.Audit(ctx, audit.Event{Type: typ, Actor: m.User, Request: m.Request, Grant: m.Request, Target: m.Target, Details: details}); err != nil {
		s.log.Error("auditing session event", "type", typ, "err", err)
	}
}
