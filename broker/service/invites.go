package service

import (
	"context"
	"errors"
	"time"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// inviteConfirmTTL bounds how long an admin has to confirm an invite.
const inviteConfirmTTL = 15 * time.Minute

// RequestInvite is an admin, acting from device d, asking to invite name
// with role. Nothing is created yet: the admin confirms with their security
// key on the returned link, whose page then shows the invite link. So a
// stolen device key alone cannot add people (who could then approve the
// thief's own requests).
func (s *Service) RequestInvite(ctx context.Context, actor store.User, d store.Device, name, role string) (wire.Invite, error) {
	if actor.Role != RoleAdmin {
		return wire.Invite{}, errorf(KindForbidden, "only an admin may invite users")
	}
	if err := s.checkInvitee(name, role); err != nil {
		return wire.Invite{}, err
	}
	token, hash, err := s.secret()
	if err != nil {
		return wire.Invite{}, err
	}
	now := s.now()
	exp := now.Add(inviteConfirmTTL)
	err = s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		switch _, err := tx.User(ctx, name); {
		case err == nil:
			return errorf(KindConflict, "user %s already exists", name)
		case !errors.Is(err, store.ErrNotFound):
			return err
		}
		if err := tx.PutToken(ctx, store.Token{Hash: hash, Kind: store.TokenInviteConfirm, User: name, Role: role, Device: d.ID, CreatedAt: now, ExpiresAt: exp}); err != nil {
			return err
		}
		return s.record(ctx, tx, audit.Event{Type: audit.TypeInviteRequested, Actor: actor.Name, Device: d.ID,
			Details: map[string]string{"user": name, "role": role}})
	})
	if err != nil {
		return wire.Invite{}, err
	}
	return wire.Invite{User: name, ConfirmURL: s.link("admin/invite", token), ExpiresAt: exp}, nil
}

// InviteView is what an invite-confirmation page shows.
type InviteView struct {
	Admin, Device, Hostname, User, Role string
}

func (v InviteView) hash() string { return hashFields(v.Admin, v.Device, v.Hostname, v.User, v.Role) }

// inviteView loads an invite-confirmation link; the admin is the owner of
// the device the invite was asked from, and must still be an admin.
func (s *Service) inviteView(ctx context.Context, tx store.Tx, token string) (store.Token, InviteView, error) {
	t, err := s.checkToken(ctx, tx, token, store.TokenInviteConfirm)
	if err != nil {
		return store.Token{}, InviteView{}, err
	}
	d, err := tx.Device(ctx, t.Device)
	if err != nil {
		return store.Token{}, InviteView{}, err
	}
	u, err := tx.User(ctx, d.User)
	if err != nil {
		return store.Token{}, InviteView{}, err
	}
	if u.Role != RoleAdmin || u.Disabled || d.State != store.DeviceActive {
		return store.Token{}, InviteView{}, errorf(KindForbidden, "%s can no longer invite users from device %s", u.Name, d.ID)
	}
	return t, InviteView{Admin: u.Name, Device: d.ID, Hostname: d.Hostname, User: t.User, Role: t.Role}, nil
}

// ConfirmInviteInfo returns what an invite-confirmation link shows.
func (s *Service) ConfirmInviteInfo(ctx context.Context, token string) (InviteView, error) {
	var v InviteView
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		_, v, err = s.inviteView(ctx, tx, token)
		return err
	})
	return v, err
}

// BeginInviteConfirm starts the admin's assertion; its challenge commits to
// exactly what the page shows.
func (s *Service) BeginInviteConfirm(ctx context.Context, token string) ([]byte, error) {
	var opts []byte
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		t, v, err := s.inviteView(ctx, tx, token)
		if err != nil {
			return err
		}
		opts, err = s.beginCommitted(ctx, tx, v.Admin, "invite", v.hash(), "invite-confirm:"+t.Hash)
		return err
	})
	return opts, err
}

// FinishInviteConfirm verifies the admin's assertion, uses the link up and
// creates the user with their invite link, in one transaction.
func (s *Service) FinishInviteConfirm(ctx context.Context, token string, response []byte) (wire.Invite, error) {
	var out wire.Invite
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		t, v, err := s.inviteView(ctx, tx, token)
		if err != nil {
			return err
		}
		if err := s.finishCommitted(ctx, tx, v.Admin, "invite", v.hash(), "invite-confirm:"+t.Hash, response); err != nil {
			return err
		}
		if err := tx.UseToken(ctx, t.Hash, s.now()); err != nil {
			return err
		}
		if err := s.checkInvitee(v.User, v.Role); err != nil {
			return err
		}
		out, err = s.inviteTx(ctx, tx, v.Admin, v.User, v.Role, map[string]string{"device": v.Device, "confirmed_with": "security key"})
		return err
	})
	return out, err
}
