package service

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"

	"github.com/go-webauthn/webauthn/webauthn"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/fido"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// RoleAdmin is the built-in role that may invite users and read the audit log.
const RoleAdmin = "admin"

var nameRE = regexp.MustCompile(`^[a-z][a-z0-9._-]{0,62}$`)

// UserNameRule says in words what CheckUserName accepts.
const UserNameRule = "use 1-63 lower-case letters, digits, '.', '_' or '-', starting with a letter"

// CheckUserName reports whether name may be a user's name.
func CheckUserName(name string) error {
	if !nameRE.MatchString(name) {
		return errorf(KindBadInput, "user name %q: %s", name, UserNameRule)
	}
	return nil
}

// Bootstrap creates the first admin and returns their invite link. It
// refuses once any admin exists.
func (s *Service) Bootstrap(ctx context.Context, name string) (wire.Invite, error) {
	var admins []store.User
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		admins, err = tx.UsersWithRole(ctx, RoleAdmin)
		return err
	}); err != nil {
		return wire.Invite{}, err
	}
	if len(admins) == 1 && admins[0].Name == name {
		return s.reinviteUnregistered(ctx, name)
	}
	if len(admins) > 0 {
		return wire.Invite{}, errorf(KindConflict, "an admin already exists (%s); admins invite people with: pinhole admin user add NAME --role ROLE", admins[0].Name)
	}
	return s.invite(ctx, "bootstrap", name, RoleAdmin)
}

// reinviteUnregistered issues a new invite to the first admin when their
// first one was lost before they registered a key; once they have a key,
// bootstrap is closed for good.
func (s *Service) reinviteUnregistered(ctx context.Context, name string) (wire.Invite, error) {
	token, hash, err := s.secret()
	if err != nil {
		return wire.Invite{}, err
	}
	now := s.now()
	exp := now.Add(s.cfg.InviteTTL)
	err = s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		creds, err := tx.Credentials(ctx, name)
		if err != nil {
			return err
		}
		if len(creds) > 0 {
			return errorf(KindConflict, "admin %s already registered a security key; admins invite people with: pinhole admin user add NAME --role ROLE", name)
		}
		if err := tx.PutToken(ctx, store.Token{Hash: hash, Kind: store.TokenInvite, User: name, CreatedAt: now, ExpiresAt: exp}); err != nil {
			return err
		}
		return s.record(ctx, tx, audit.Event{Type: audit.TypeUserInvited, Actor: "bootstrap", Details: map[string]string{"user": name, "role": RoleAdmin, "reissued": "true"}})
	})
	if err != nil {
		return wire.Invite{}, err
	}
	return wire.Invite{User: name, URL: s.link("invite", token), ExpiresAt: exp}, nil
}

// InviteUser creates a user with a role and an invite link at once, for
// callers that already hold the broker (in-process tools and tests). Admins
// on the API go through RequestInvite, which waits for their security key.
func (s *Service) InviteUser(ctx context.Context, actor store.User, name, role string) (wire.Invite, error) {
	if actor.Role != RoleAdmin {
		return wire.Invite{}, errorf(KindForbidden, "only an admin may invite users")
	}
	return s.invite(ctx, actor.Name, name, role)
}

func (s *Service) invite(ctx context.Context, actor, name, role string) (wire.Invite, error) {
	if err := s.checkInvitee(name, role); err != nil {
		return wire.Invite{}, err
	}
	var out wire.Invite
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		var err error
		out, err = s.inviteTx(ctx, tx, actor, name, role, nil)
		return err
	})
	return out, err
}

// checkInvitee checks a new user's name and role.
func (s *Service) checkInvitee(name, role string) error {
	if err := CheckUserName(name); err != nil {
		return err
	}
	if role != RoleAdmin {
		known := false
		for _, r := range s.policy().Roles {
			known = known || r.Name == role
		}
		if !known {
			return errorf(KindBadInput, "role %q is not defined in the config", role)
		}
	}
	return nil
}

// inviteTx creates user name with role and their invite link in tx, and
// audits it with extra details.
func (s *Service) inviteTx(ctx context.Context, tx store.Tx, actor, name, role string, extra map[string]string) (wire.Invite, error) {
	handle := make([]byte, 32)
	if _, err := io.ReadFull(s.rand, handle); err != nil {
		return wire.Invite{}, fmt.Errorf("generating user handle: %w", err)
	}
	token, hash, err := s.secret()
	if err != nil {
		return wire.Invite{}, err
	}
	now := s.now()
	exp := now.Add(s.cfg.InviteTTL)
	if err := tx.CreateUser(ctx, store.User{Name: name, Role: role, WebAuthnID: handle, CreatedAt: now}); err != nil {
		if errors.Is(err, store.ErrConflict) {
			return wire.Invite{}, errorf(KindConflict, "user %s already exists", name)
		}
		return wire.Invite{}, err
	}
	if err := tx.PutToken(ctx, store.Token{Hash: hash, Kind: store.TokenInvite, User: name, CreatedAt: now, ExpiresAt: exp}); err != nil {
		return wire.Invite{}, err
	}
	details := map[string]string{"user": name, "role": role}
	for k, v := range extra {
		details[k] = v
	}
	if err := s.record(ctx, tx, audit.Event{Type: audit.TypeUserInvited, Actor: actor, Details: details}); err != nil {
		return wire.Invite{}, err
	}
	return wire.Invite{User: name, URL: s.link("invite", token), ExpiresAt: exp}, nil
}

// fidoUser loads a user and their credentials in the shape the FIDO layer wants.
func fidoUser(ctx context.Context, tx store.Tx, name string) (store.User, fido.User, error) {
	u, err := tx.User(ctx, name)
	if err != nil {
		return store.User{}, fido.User{}, err
	}
	creds, err := tx.Credentials(ctx, name)
	if err != nil {
		return store.User{}, fido.User{}, err
	}
	fu := fido.User{ID: u.WebAuthnID, Name: u.Name, DisplayName: u.Name}
	for _, c := range creds {
		var wc webauthn.Credential
		if err := json.Unmarshal(c.Data, &wc); err != nil {
			return store.User{}, fido.User{}, fmt.Errorf("decoding credential of %s: %w", name, err)
		}
		fu.Credentials = append(fu.Credentials, wc)
	}
	return u, fu, nil
}

// checkToken loads an unused, unexpired token of kind.
func (s *Service) checkToken(ctx context.Context, tx store.Tx, token, kind string) (store.Token, error) {
	if len(token) < 40 || len(token) > 64 {
		return store.Token{}, errorf(KindNotFound, "unknown link")
	}
	t, err := tx.Token(ctx, HashToken(token))
	if errors.Is(err, store.ErrNotFound) || (err == nil && t.Kind != kind) {
		return store.Token{}, errorf(KindNotFound, "unknown link")
	}
	if err != nil {
		return store.Token{}, err
	}
	if !t.UsedAt.IsZero() {
		return store.Token{}, errorf(KindConflict, "this link was already used")
	}
	if !s.now().Before(t.ExpiresAt) {
		return store.Token{}, errorf(KindGone, "this link has expired")
	}
	return t, nil
}

// InviteInfo says who an invite link is for.
func (s *Service) InviteInfo(ctx context.Context, token string) (store.User, error) {
	var u store.User
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		t, err := s.checkToken(ctx, tx, token, store.TokenInvite)
		if err != nil {
			return err
		}
		u, err = tx.User(ctx, t.User)
		return err
	})
	return u, err
}

// BeginRegistration starts registering a security key through an invite.
func (s *Service) BeginRegistration(ctx context.Context, token string) ([]byte, error) {
	var opts []byte
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		t, err := s.checkToken(ctx, tx, token, store.TokenInvite)
		if err != nil {
			return err
		}
		_, fu, err := fidoUser(ctx, tx, t.User)
		if err != nil {
			return err
		}
		o, sess, err := s.cfg.FIDO.BeginRegistration(fu)
		if err != nil {
			return fmt.Errorf("starting registration: %w", err)
		}
		opts = o
		return tx.PutCeremony(ctx, store.Ceremony{ID: "register:" + t.Hash, Data: sess, ExpiresAt: s.now().Add(fidoTimeout)})
	})
	return opts, err
}

// FinishRegistration verifies the attestation and stores the credential; the
// invite link is used up.
func (s *Service) FinishRegistration(ctx context.Context, token string, response []byte) error {
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		t, err := s.checkToken(ctx, tx, token, store.TokenInvite)
		if err != nil {
			return err
		}
		cer, err := s.takeCeremony(ctx, tx, "register:"+t.Hash)
		if err != nil {
			return err
		}
		u, fu, err := fidoUser(ctx, tx, t.User)
		if err != nil {
			return err
		}
		cred, err := s.cfg.FIDO.FinishRegistration(fu, cer.Data, response)
		if err != nil {
			return &Error{Kind: KindBadInput, Msg: "security key registration failed: " + err.Error(), Err: err}
		}
		data, err := json.Marshal(cred)
		if err != nil {
			return fmt.Errorf("encoding credential: %w", err)
		}
		if err := tx.AddCredential(ctx, store.Credential{ID: cred.ID, User: u.Name, Data: data, CreatedAt: s.now()}); err != nil {
			return err
		}
		if err := tx.UseToken(ctx, t.Hash, s.now()); err != nil {
			return err
		}
		return s.record(ctx, tx, audit.Event{Type: audit.TypeCredentialRegistered, Actor: u.Name,
			Details: map[string]string{"credential": fmt.Sprintf("%x", cred.ID)}})
	})
	return err
}

func (s *Service) takeCeremony(ctx context.Context, tx store.Tx, id string) (store.Ceremony, error) {
	c, err := tx.TakeCeremony(ctx, id)
	if errors.Is(err, store.ErrNotFound) {
		return store.Ceremony{}, errorf(KindConflict, "no security-key ceremony in progress for this link; reload the page")
	}
	if err != nil {
		return store.Ceremony{}, err
	}
	if !s.now().Before(c.ExpiresAt) {
		return store.Ceremony{}, errorf(KindGone, "the security-key prompt timed out; reload the page")
	}
	return c, nil
}

// assert verifies an assertion of user against a ceremony and stores the
// updated sign count. It returns the user.
func (s *Service) assert(ctx context.Context, tx store.Tx, user string, cer store.Ceremony, response []byte) (store.User, error) {
	u, fu, err := fidoUser(ctx, tx, user)
	if err != nil {
		return store.User{}, err
	}
	if u.Disabled {
		return store.User{}, errorf(KindForbidden, "user %s is disabled", u.Name)
	}
	cred, err := s.cfg.FIDO.FinishAssertion(fu, cer.Data, response)
	if err != nil {
		return store.User{}, &Error{Kind: KindForbidden, Msg: "security key check failed: " + err.Error(), Err: err}
	}
	data, err := json.Marshal(cred)
	if err != nil {
		return store.User{}, fmt.Errorf("encoding credential: %w", err)
	}
	if err := tx.UpdateCredential(ctx, store.Credential{ID: cred.ID, User: u.Name, Data: data}); err != nil {
		return store.User{}, err
	}
	return u, nil
}
