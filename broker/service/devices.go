package service

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/fido"
	"github.com/pinhole-dev/pinhole/internal/posture"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

const (
	fidoTimeout     = 5 * time.Minute
	deviceLinkTTL   = 15 * time.Minute
	postureNonceTTL = 2 * time.Minute
)

// commit makes a WebAuthn challenge that commits to view (a hash of exactly
// what the page shows) and a fresh nonce. The returned commitment is stored
// with the ceremony so finish can re-derive and compare the challenge.
func (s *Service) commit(purpose, view string) (challenge []byte, commitment string, err error) {
	nonce := make([]byte, 32)
	if _, err := io.ReadFull(s.rand, nonce); err != nil {
		return nil, "", fmt.Errorf("generating challenge: %w", err)
	}
	return challengeFor(purpose, view, nonce), view + " " + hex.EncodeToString(nonce), nil
}

func challengeFor(purpose, view string, nonce []byte) []byte {
	h := sha256.New()
	h.Write([]byte("pinhole-" + purpose + "-v1\x00"))
	h.Write([]byte(view))
	h.Write([]byte{0})
	h.Write(nonce)
	return h.Sum(nil)
}

// checkCommitment verifies that the ceremony's challenge commits to view.
func checkCommitment(purpose, view string, c store.Ceremony) error {
	stored, nonceHex, ok := strings.Cut(c.ViewHash, " ")
	nonce, err := hex.DecodeString(nonceHex)
	if !ok || err != nil {
		return errorf(KindInternal, "corrupt ceremony record")
	}
	if stored != view {
		return errorf(KindConflict, "what you approved is no longer what the broker has; reload the page")
	}
	got, err := fido.SessionChallenge(c.Data)
	if err != nil {
		return fmt.Errorf("reading ceremony challenge: %w", err)
	}
	if !bytes.Equal(got, challengeFor(purpose, view, nonce)) {
		return errorf(KindConflict, "security-key challenge does not match the content shown")
	}
	return nil
}

// beginCommitted starts an assertion by user whose challenge commits to view
// (see commit) and stores its ceremony under ceremonyID. It returns the
// options for the browser.
func (s *Service) beginCommitted(ctx context.Context, tx store.Tx, user, purpose, view, ceremonyID string) ([]byte, error) {
	_, fu, err := fidoUser(ctx, tx, user)
	if err != nil {
		return nil, err
	}
	if len(fu.Credentials) == 0 {
		return nil, errorf(KindConflict, "user %s has no security key yet; register one from the invite link first", user)
	}
	ch, commitment, err := s.commit(purpose, view)
	if err != nil {
		return nil, err
	}
	opts, sess, err := s.cfg.FIDO.BeginAssertion(fu, ch)
	if err != nil {
		return nil, fmt.Errorf("starting assertion: %w", err)
	}
	if err := tx.PutCeremony(ctx, store.Ceremony{ID: ceremonyID, Data: sess, ViewHash: commitment, ExpiresAt: s.now().Add(fidoTimeout)}); err != nil {
		return nil, err
	}
	return opts, nil
}

// finishCommitted takes the ceremony beginCommitted stored under
// ceremonyID, checks that its challenge commits to view, and verifies user's
// assertion against it.
func (s *Service) finishCommitted(ctx context.Context, tx store.Tx, user, purpose, view, ceremonyID string, response []byte) error {
	cer, err := s.takeCeremony(ctx, tx, ceremonyID)
	if err != nil {
		return err
	}
	if err := checkCommitment(purpose, view, cer); err != nil {
		return err
	}
	_, err = s.assert(ctx, tx, user, cer, response)
	return err
}

// Enroll registers the calling device key as pending for user and returns
// the link the user confirms it with.
func (s *Service) Enroll(ctx context.Context, pub ed25519.PublicKey, user, hostname string) (wire.EnrollResponse, error) {
	if err := CheckUserName(user); err != nil {
		return wire.EnrollResponse{}, err
	}
	if hostname == "" || len(hostname) > 253 || strings.IndexFunc(hostname, func(r rune) bool {
		return r == utf8.RuneError || !unicode.IsPrint(r) || unicode.Is(unicode.Cf, r)
	}) >= 0 {
		return wire.EnrollResponse{}, errorf(KindBadInput, "hostname must be 1-253 bytes of printable text")
	}
	token, hash, err := s.secret()
	if err != nil {
		return wire.EnrollResponse{}, err
	}
	now := s.now()
	exp := now.Add(deviceLinkTTL)
	var out wire.EnrollResponse
	err = s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		u, err := tx.User(ctx, user)
		if errors.Is(err, store.ErrNotFound) {
			return errorf(KindNotFound, "no user %s", user)
		}
		if err != nil {
			return err
		}
		if u.Disabled {
			return errorf(KindForbidden, "user %s is disabled", user)
		}
		d, err := tx.DeviceByKey(ctx, pub)
		switch {
		case errors.Is(err, store.ErrNotFound):
			id, err := s.newID("d-")
			if err != nil {
				return err
			}
			d = store.Device{ID: id, User: user, Hostname: hostname, PublicKey: pub, State: store.DevicePending, CreatedAt: now}
			if err := tx.CreateDevice(ctx, d); err != nil {
				return err
			}
		case err != nil:
			return err
		case d.State != store.DevicePending:
			return errorf(KindConflict, "this device is already %s", d.State)
		case d.User != user:
			return errorf(KindConflict, "this device is pending enrollment for another user")
		}
		if err := tx.PutToken(ctx, store.Token{Hash: hash, Kind: store.TokenDevice, User: user, Device: d.ID, CreatedAt: now, ExpiresAt: exp}); err != nil {
			return err
		}
		out = wire.EnrollResponse{DeviceID: d.ID, ConfirmURL: s.link("enroll", token), ExpiresAt: exp}
		return s.record(ctx, tx, audit.Event{Type: audit.TypeDeviceEnrolled, Actor: user, Device: d.ID,
			Details: map[string]string{"hostname": hostname, "fingerprint": devicekey.Fingerprint(pub)}})
	})
	return out, err
}

// DeviceView is what the confirmation page shows.
type DeviceView struct {
	User, DeviceID, Hostname, Fingerprint string
	Created                               time.Time
}

func (v DeviceView) hash() string { return hashFields(v.User, v.DeviceID, v.Hostname, v.Fingerprint) }

// hashFields is the hex SHA-256 of fields joined by NUL bytes (no field of a
// page view holds one), the content hash a confirmation page commits to.
func hashFields(fields ...string) string {
	sum := sha256.Sum256([]byte(strings.Join(fields, "\x00")))
	return hex.EncodeToString(sum[:])
}

func (s *Service) deviceView(ctx context.Context, tx store.Tx, token string) (store.Token, DeviceView, error) {
	t, err := s.checkToken(ctx, tx, token, store.TokenDevice)
	if err != nil {
		return store.Token{}, DeviceView{}, err
	}
	d, err := tx.Device(ctx, t.Device)
	if err != nil {
		return store.Token{}, DeviceView{}, err
	}
	return t, DeviceView{User: d.User, DeviceID: d.ID, Hostname: d.Hostname, Fingerprint: devicekey.Fingerprint(d.PublicKey), Created: d.CreatedAt}, nil
}

// DeviceConfirmInfo returns what a device-confirmation link shows.
func (s *Service) DeviceConfirmInfo(ctx context.Context, token string) (DeviceView, error) {
	var v DeviceView
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		_, v, err = s.deviceView(ctx, tx, token)
		return err
	})
	return v, err
}

// BeginDeviceConfirm starts the assertion that binds the device to its user.
func (s *Service) BeginDeviceConfirm(ctx context.Context, token string) ([]byte, error) {
	var opts []byte
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		t, v, err := s.deviceView(ctx, tx, token)
		if err != nil {
			return err
		}
		opts, err = s.beginCommitted(ctx, tx, t.User, "device", v.hash(), "device:"+t.Hash)
		return err
	})
	return opts, err
}

// FinishDeviceConfirm verifies the user's assertion and activates the device.
func (s *Service) FinishDeviceConfirm(ctx context.Context, token string, response []byte) error {
	var device string
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		t, v, err := s.deviceView(ctx, tx, token)
		if err != nil {
			return err
		}
		if err := s.finishCommitted(ctx, tx, t.User, "device", v.hash(), "device:"+t.Hash, response); err != nil {
			return err
		}
		if err := tx.UseToken(ctx, t.Hash, s.now()); err != nil {
			return err
		}
		d, err := tx.Device(ctx, t.Device)
		if err != nil {
			return err
		}
		if d.State != store.DevicePending {
			return errorf(KindConflict, "device is %s", d.State)
		}
		d.State, d.ConfirmedAt = store.DeviceActive, s.now()
		if err := tx.UpdateDevice(ctx, d); err != nil {
			return err
		}
		device = d.ID
		if err := s.pushEvent(ctx, tx, d.ID, wire.Event{Type: wire.EventDeviceConfirmed}); err != nil {
			return err
		}
		return s.record(ctx, tx, audit.Event{Type: audit.TypeDeviceConfirmed, Actor: t.User, Device: d.ID})
	})
	if err == nil {
		s.hub.notify(device)
	}
	return err
}

// AuthenticateDevice maps a TLS-proven device key to its device and user.
// Pending devices are returned too; callers decide what they may do.
func (s *Service) AuthenticateDevice(ctx context.Context, pub ed25519.PublicKey) (store.Device, store.User, error) {
	var d store.Device
	var u store.User
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		d, err = tx.DeviceByKey(ctx, pub)
		if errors.Is(err, store.ErrNotFound) {
			return errorf(KindUnauthenticated, "this device is not enrolled")
		}
		if err != nil {
			return err
		}
		u, err = tx.User(ctx, d.User)
		return err
	})
	if err != nil {
		return store.Device{}, store.User{}, err
	}
	if d.State == store.DeviceDisabled || u.Disabled {
		return store.Device{}, store.User{}, errorf(KindForbidden, "device or user is disabled")
	}
	return d, u, nil
}

// PostureNonce issues a single-use nonce for the device's next report.
func (s *Service) PostureNonce(ctx context.Context, d store.Device) (wire.PostureNonce, error) {
	nonce, _, err := s.secret()
	if err != nil {
		return wire.PostureNonce{}, err
	}
	exp := s.now().Add(postureNonceTTL)
	err = s.cfg.Store.Update(ctx, func(tx store.Tx) error { return tx.PutNonce(ctx, d.ID, nonce, exp) })
	return wire.PostureNonce{Nonce: nonce, ExpiresAt: exp}, err
}

// SubmitPosture verifies a signed report (device key, freshness, single-use
// nonce, newer than the last) and keeps it.
func (s *Service) SubmitPosture(ctx context.Context, d store.Device, sub wire.PostureSubmit) (wire.PostureResult, error) {
	if d.State != store.DeviceActive {
		return wire.PostureResult{}, errorf(KindForbidden, "device is %s; confirm it first", d.State)
	}
	now := s.now()
	var rep posture.Report
	var reject error
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		var err error
		rep, err = posture.Verify(ed25519.PublicKey(d.PublicKey), posture.Signed{Report: sub.Report, Signature: sub.Signature}, posture.VerifyOptions{Now: now})
		if err == nil && rep.Device != d.ID {
			err = fmt.Errorf("report names device %q, not this device", rep.Device)
		}
		if err == nil {
			if terr := tx.TakeNonce(ctx, d.ID, rep.Nonce, now); terr != nil {
				err = fmt.Errorf("report nonce: %w", terr)
			}
		}
		if err == nil {
			if prev, perr := tx.Posture(ctx, d.ID); perr == nil && !rep.CollectedAt.After(prev.CollectedAt) {
				err = errors.New("report is not newer than the last accepted one")
			}
		}
		if err != nil {
			reject = err
			return s.record(ctx, tx, audit.Event{Type: audit.TypePostureRejected, Actor: d.User, Device: d.ID, Details: map[string]string{"reason": err.Error()}})
		}
		if err := tx.PutPosture(ctx, store.Posture{Device: d.ID, CollectedAt: rep.CollectedAt, ReceivedAt: now, Report: sub.Report, Signature: sub.Signature}); err != nil {
			return err
		}
		return s.record(ctx, tx, audit.Event{Type: audit.TypePostureAccepted, Actor: d.User, Device: d.ID, Details: map[string]string{
			"os": rep.OS, "kernel": rep.Kernel, "disk_encrypted": fmt.Sprint(rep.DiskEncrypted), "firewall": fmt.Sprint(rep.FirewallActive)}})
	})
	if err != nil {
		return wire.PostureResult{}, err
	}
	if reject != nil {
		return wire.PostureResult{}, &Error{Kind: KindBadInput, Msg: "posture report refused: " + reject.Error(), Err: reject}
	}
	return wire.PostureResult{Accepted: true, CollectedAt: rep.CollectedAt}, nil
}

// latestPosture returns the stored report of a device, or nil.
func latestPosture(ctx context.Context, tx store.Tx, device string) (*posture.Report, error) {
	p, err := tx.Posture(ctx, device)
	if errors.Is(err, store.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var r posture.Report
	if err := json.Unmarshal(p.Report, &r); err != nil {
		return nil, fmt.Errorf("decoding stored posture: %w", err)
	}
	return &r, nil
}
