package service

import (
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"time"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/store"
)

// Checkpoint signs the audit chain's head when it moved since the last
// checkpoint, stores the checkpoint and hands it to the witness. It returns
// the newest checkpoint either way.
func (s *Service) Checkpoint(ctx context.Context) (audit.Checkpoint, error) {
	if s.cfg.AuditKey == nil {
		return audit.Checkpoint{}, errorf(KindNotFound, "this broker signs no audit checkpoints")
	}
	var cp audit.Checkpoint
	var fresh bool
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		head, err := tx.AuditHead(ctx)
		if errors.Is(err, store.ErrNotFound) {
			return errorf(KindNotFound, "the audit log is empty")
		}
		if err != nil {
			return err
		}
		prev, err := tx.LatestCheckpoint(ctx)
		switch {
		case errors.Is(err, store.ErrNotFound):
		case err != nil:
			return err
		default:
			// Sign only a chain that still extends what was signed before:
			// never launder a rewritten or truncated log with a fresh signature.
			if err := s.extendsCheckpoint(ctx, tx, prev); err != nil {
				s.log.Error("AUDIT LOG TAMPERED: refusing to sign a new checkpoint", "checkpoint_seq", prev.Seq, "err", err)
				return fmt.Errorf("audit chain does not extend checkpoint %d: %w", prev.Seq, err)
			}
			if prev.Seq >= head.Seq {
				cp = prev
				return nil
			}
		}
		cp = audit.SignCheckpoint(s.cfg.AuditKey, head, s.now())
		fresh = true
		return tx.PutCheckpoint(ctx, cp)
	})
	if err != nil {
		return audit.Checkpoint{}, err
	}
	_ = fresh
	// Hand the newest checkpoint to the witness unless it already has it,
	// so a witness that was unreachable catches up at the next tick.
	if s.cfg.Witness != nil && cp.Seq > s.witnessed.Load() {
		if err := s.cfg.Witness.Witness(ctx, cp); err != nil {
			return cp, fmt.Errorf("handing checkpoint %d to the witness: %w", cp.Seq, err)
		}
		s.witnessed.Store(cp.Seq)
	}
	return cp, nil
}

// extendsCheckpoint checks that the stored chain still holds the event prev
// signed, and that every later event chains onto it.
func (s *Service) extendsCheckpoint(ctx context.Context, tx store.Tx, prev audit.Checkpoint) error {
	at, err := tx.AuditEvents(ctx, prev.Seq-1, 1)
	if err != nil {
		return err
	}
	if len(at) != 1 || at[0].Seq != prev.Seq || at[0].Hash != prev.Hash {
		return errors.New("the checkpointed event is gone or changed")
	}
	last := at[0]
	for {
		evs, err := tx.AuditEvents(ctx, last.Seq, 1000)
		if err != nil {
			return err
		}
		if len(evs) == 0 {
			return nil
		}
		if err := audit.Verify(append([]audit.Event{last}, evs...)); err != nil {
			return err
		}
		last = evs[len(evs)-1]
	}
}

// AuditPublicKey is the key that verifies checkpoints (nil without one).
func (s *Service) AuditPublicKey() ed25519.PublicKey {
	if s.cfg.AuditKey == nil {
		return nil
	}
	return s.cfg.AuditKey.Public().(ed25519.PublicKey)
}

// LatestCheckpoint returns the newest stored checkpoint to an admin.
func (s *Service) LatestCheckpoint(ctx context.Context, u store.User) (audit.Checkpoint, error) {
	if u.Role != RoleAdmin {
		return audit.Checkpoint{}, errorf(KindForbidden, "only an admin may read the audit log")
	}
	var cp audit.Checkpoint
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		cp, err = tx.LatestCheckpoint(ctx)
		return err
	})
	return cp, err
}

// RunCheckpoints checkpoints the chain head every CheckpointEvery until ctx
// is done, and once more on the way out.
func (s *Service) RunCheckpoints(ctx context.Context) error {
	if s.cfg.AuditKey == nil {
		return nil
	}
	t := time.NewTicker(s.cfg.CheckpointEvery)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			if _, err := s.Checkpoint(context.WithoutCancel(ctx)); err != nil && KindOf(err) != KindNotFound {
				s.log.Error("final audit checkpoint", "err", err)
			}
			return nil
		case <-t.C:
			if _, err := s.Checkpoint(ctx); err != nil && KindOf(err) != KindNotFound {
				s.log.Error("audit checkpoint", "err", err)
			}
		}
	}
}
