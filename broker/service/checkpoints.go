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
		cp, err = tx.LatestCheckpoint(ctx)
		if err != nil && !errors.Is(err, store.ErrNotFound) {
			return err
		}
		if err == nil && cp.Seq >= head.Seq {
			return nil
		}
		cp = audit.SignCheckpoint(s.cfg.AuditKey, head, s.now())
		fresh = true
		return tx.PutCheckpoint(ctx, cp)
	})
	if err != nil {
		return audit.Checkpoint{}, err
	}
	if fresh && s.cfg.Witness != nil {
		if err := s.cfg.Witness.Witness(ctx, cp); err != nil {
			return cp, fmt.Errorf("handing checkpoint %d to the witness: %w", cp.Seq, err)
		}
	}
	return cp, nil
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
