package service

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/access"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/policy"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// LiveGrant is an activated grant as the data plane sees it.
type LiveGrant struct {
	Request    string
	Device     string
	User       string
	Target     string
	TunnelAddr netip.Addr
	Dst        netip.AddrPort
	Ends       time.Time
	WGPublic   wgkey.Public
}

// flowTable maps agent tunnel addresses to live grants (one grant per
// address). An ended grant leaves the table at once, so no new flow is
// authorized for it, but its address stays draining until its peer and flows
// are gone, so no new grant is handed that address in between.
type flowTable struct {
	mu       sync.Mutex
	byAddr   map[netip.Addr]LiveGrant
	draining map[netip.Addr]int
}

func (f *flowTable) init() {
	f.byAddr = make(map[netip.Addr]LiveGrant)
	f.draining = make(map[netip.Addr]int)
}

// inUse reports whether a is held by a live or draining grant.
func (f *flowTable) inUse(a netip.Addr) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	_, live := f.byAddr[a]
	return live || f.draining[a] > 0
}

// drained releases an address that removeRequest left draining.
func (f *flowTable) drained(a netip.Addr) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.draining[a]--; f.draining[a] <= 0 {
		delete(f.draining, a)
	}
}

func (f *flowTable) put(g LiveGrant) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.byAddr[g.TunnelAddr] = g
}

func (f *flowTable) get(a netip.Addr) (LiveGrant, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	g, ok := f.byAddr[a]
	return g, ok
}

func (f *flowTable) byKey(k wgkey.Public) (LiveGrant, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, g := range f.byAddr {
		if g.WGPublic == k {
			return g, true
		}
	}
	return LiveGrant{}, false
}

// removeRequest takes grant id out of the table and marks its address
// draining; the caller calls drained when the peer and flows are gone.
func (f *flowTable) removeRequest(id string) (LiveGrant, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	for a, g := range f.byAddr {
		if g.Request == id {
			delete(f.byAddr, a)
			f.draining[a]++
			return g, true
		}
	}
	return LiveGrant{}, false
}

// Activate binds a granted request to the device's fresh per-grant keys:
// allocates a tunnel address, adds the WireGuard peer and signs the SSH user
// certificate (principal = target login, source-address = tunnel address,
// valid until the grant ends).
func (s *Service) Activate(ctx context.Context, d store.Device, u store.User, id string, in wire.ActivateRequest) (wire.Activation, error) {
	wgPub, err := wgkey.ParsePublic(in.WireGuardPublicKey)
	if err != nil {
		return wire.Activation{}, errorf(KindBadInput, "wireguard_public_key: %v", err)
	}
	gw, _ := s.dataPlane()
	if gw == nil {
		return wire.Activation{}, errorf(KindInternal, "gateway not running")
	}
	if wgPub == gw.PublicKey() {
		return wire.Activation{}, errorf(KindBadInput, "wireguard_public_key is the gateway's own key; make a fresh key for the grant")
	}
	// One activation at a time, from the key check to the peer going in, so
	// two activations racing with one key cannot both pass the check.
	s.activateMu.Lock()
	locked := true
	unlock := func() {
		if locked {
			locked = false
			s.activateMu.Unlock()
		}
	}
	defer unlock()
	if other, ok := s.flows.byKey(wgPub); ok && other.Request != id {
		return wire.Activation{}, errorf(KindBadInput, "wireguard_public_key is already in use by another grant; make a fresh key for each grant")
	}
	now := s.now()
	var out wire.Activation
	var live LiveGrant
	var replaced *wgkey.Public
	err = s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		replaced = nil
		r, err := tx.Request(ctx, id)
		if err != nil || r.Device != d.ID {
			return errorf(KindNotFound, "no request %s for this device", id)
		}
		if !r.Active(now) {
			return errorf(KindConflict, "request %s is not an active grant (state %s)", id, r.State)
		}
		// A second activation of a live grant (the agent restarted and
		// made fresh keys) replaces the first: same tunnel address, new keys;
		// the old peer and its flows are removed after commit.
		prev, err := tx.Activation(ctx, id)
		switch {
		case err == nil && prev.Ended:
			return errorf(KindConflict, "grant %s has ended", id)
		case err == nil:
			old, err := wgkey.ParsePublic(prev.WGPublicKey)
			if err != nil {
				return fmt.Errorf("stored peer key of %s: %w", id, err)
			}
			replaced = &old
		case !errors.Is(err, store.ErrNotFound):
			return err
		}
		tg, ok := s.policy().Target(r.Target)
		if !ok {
			return errorf(KindConflict, "target %s is no longer configured", r.Target)
		}
		addr := prev.TunnelAddr
		if replaced == nil {
			if addr, err = s.allocateAddr(ctx, tx); err != nil {
				return err
			}
		}
		dst, err := destination(tg)
		if err != nil {
			return err
		}
		out = wire.Activation{Request: id, Target: tg.Name, Protocol: string(tg.Protocol), TunnelAddress: addr.String(),
			GatewayPublicKey: gw.PublicKey().String(), GatewayEndpoint: s.gatewayEndpoint(), Destination: dst.String(), ExpiresAt: r.GrantEnds}
		serial := uint64(0)
		if tg.Protocol == policy.ProtocolSSH {
			cert, sn, err := s.userCert(in.SSHPublicKey, r, tg, addr, now)
			if err != nil {
				return err
			}
			serial = sn
			out.Login, out.HostKeyAlias = tg.Login, tg.Name
			out.SSHCertificate = strings.TrimSpace(string(ssh.MarshalAuthorizedKey(cert)))
			out.HostCAKeys = []string{sshca.AuthorizedKey(s.cfg.HostCA.PublicKey())}
			if err := s.record(ctx, tx, audit.Event{Type: audit.TypeCertIssued, Actor: u.Name, Device: d.ID, Request: id, Grant: id, Target: tg.Name,
				Details: map[string]string{"serial": fmt.Sprint(sn), "principal": tg.Login, "key_id": cert.KeyId, "source_address": addr.String() + "/32",
					"valid_before": r.GrantEnds.Format(time.RFC3339)}}); err != nil {
				return err
			}
		}
		if err := tx.PutActivation(ctx, store.Activation{Request: id, Device: d.ID, TunnelAddr: addr, WGPublicKey: wgPub.String(), Destination: dst, CertSerial: serial, CreatedAt: now}); err != nil {
			return err
		}
		live = LiveGrant{Request: id, Device: d.ID, User: u.Name, Target: tg.Name, TunnelAddr: addr, Dst: dst, Ends: r.GrantEnds, WGPublic: wgPub}
		return s.record(ctx, tx, audit.Event{Type: audit.TypeGrantActivated, Actor: u.Name, Device: d.ID, Request: id, Grant: id, Target: tg.Name,
			Details: activationDetails(addr, dst, wgPub, replaced)})
	})
	if err != nil {
		return wire.Activation{}, err
	}
	s.planeMu.Lock()
	if replaced != nil {
		if err := gw.RemovePeer(*replaced); err != nil {
			s.log.Warn("removing replaced peer", "request", id, "err", err)
		}
	}
	s.flows.put(live)
	err = gw.AddPeer(wgPub, live.TunnelAddr)
	s.planeMu.Unlock()
	unlock()
	if err != nil {
		s.log.Error("adding peer failed; revoking grant", "request", id, "err", err)
		s.endGrant(context.WithoutCancel(ctx), id, "gateway error", "broker", true)
		return wire.Activation{}, fmt.Errorf("adding gateway peer: %w", err)
	}
	// The grant may have ended between commit and the peer going in; its
	// cut then ran before the peer existed, so cut again.
	if err := s.CheckGrant(ctx, id); err != nil {
		var r access.Request
		if verr := s.cfg.Store.View(ctx, func(tx store.Tx) error { r, err = tx.Request(ctx, id); return err }); verr == nil {
			s.cutDataPlane(id, r)
		}
		return wire.Activation{}, errorf(KindConflict, "grant %s ended during activation", id)
	}
	s.log.Info("grant activated", "request", id, "target", live.Target, "tunnel_address", live.TunnelAddr, "ends", live.Ends)
	return out, nil
}

func activationDetails(addr netip.Addr, dst netip.AddrPort, key wgkey.Public, replaced *wgkey.Public) map[string]string {
	d := map[string]string{"tunnel_address": addr.String(), "destination": dst.String(), "wireguard_key": key.String()}
	if replaced != nil {
		d["replaces_key"] = replaced.String()
	}
	return d
}

// auditRequestClosed records a request that ended without ever being granted
// (expired while pending, or cancelled).
const auditRequestClosed = "request.closed"

func endReason(r access.Request, def string) string {
	if r.EndReason != "" {
		return r.EndReason
	}
	return def
}

func splitPort(hostport string) (string, uint16, error) {
	h, p, err := net.SplitHostPort(hostport)
	if err != nil {
		return "", 0, err
	}
	n, err := strconv.ParseUint(p, 10, 16)
	if err != nil || n == 0 {
		return "", 0, fmt.Errorf("port %q is not 1-65535", p)
	}
	return h, uint16(n), nil
}

func destination(tg policy.Target) (netip.AddrPort, error) {
	_, port, err := splitPort(tg.Address)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("target %s address: %w", tg.Name, err)
	}
	return netip.AddrPortFrom(tg.TunnelIP, port), nil
}

func (s *Service) userCert(line string, r access.Request, tg policy.Target, addr netip.Addr, now time.Time) (*ssh.Certificate, uint64, error) {
	if len(line) > 8<<10 {
		return nil, 0, errorf(KindBadInput, "ssh_public_key is too long")
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		return nil, 0, errorf(KindBadInput, "ssh_public_key: %v", err)
	}
	if _, isCert := pub.(*ssh.Certificate); isCert {
		return nil, 0, errorf(KindBadInput, "ssh_public_key must be a plain key, not a certificate")
	}
	var b [8]byte
	if _, err := io.ReadFull(s.rand, b[:]); err != nil {
		return nil, 0, fmt.Errorf("generating serial: %w", err)
	}
	serial := binary.BigEndian.Uint64(b[:]) >> 1
	cert, err := sshca.IssueUser(s.rand, s.cfg.ClientCA, sshca.UserCert{
		Key: pub, KeyID: fmt.Sprintf("pinhole grant=%s user=%s target=%s", r.ID, r.Requester, tg.Name), Serial: serial,
		Principals: []string{tg.Login}, SourceAddresses: []netip.Prefix{netip.PrefixFrom(addr, addr.BitLen())},
		ValidAfter: now.Add(-time.Minute), ValidBefore: r.GrantEnds, PermitPTY: true,
	})
	if err != nil {
		return nil, 0, fmt.Errorf("signing user certificate: %w", err)
	}
	return cert, serial, nil
}

// allocateAddr picks the lowest free tunnel address (the first two are
// reserved: network and gateway).
func (s *Service) allocateAddr(ctx context.Context, tx store.Tx) (netip.Addr, error) {
	used, err := tx.LiveTunnelAddrs(ctx)
	if err != nil {
		return netip.Addr{}, err
	}
	taken := make(map[netip.Addr]bool, len(used))
	for _, a := range used {
		taken[a] = true
	}
	p := s.cfg.TunnelPrefix.Masked()
	a := p.Addr().Next().Next()
	for ; p.Contains(a); a = a.Next() {
		if !taken[a] && !s.flows.inUse(a) {
			return a, nil
		}
	}
	return netip.Addr{}, errorf(KindConflict, "no free tunnel address in %s", p)
}

// AuthorizeFlow decides a new connection from the tunnel: it is allowed only
// when src is the tunnel address of an active grant, dst is exactly that
// grant's destination and the grant's target is still configured as it was
// when the grant was issued. Every decision is audited. An allowed flow
// comes with its grant and its target's config.
func (s *Service) AuthorizeFlow(ctx context.Context, src netip.AddrPort, dst netip.AddrPort) (LiveGrant, policy.Target, error) {
	g, ok := s.flows.get(src.Addr())
	now := s.now()
	var why string
	var tg policy.Target
	switch {
	case !ok:
		why = "no active grant for this tunnel address"
	case !now.Before(g.Ends):
		why = "grant has ended"
	case g.Dst != dst:
		why = "destination not granted (grant allows " + g.Dst.String() + ")"
	default:
		tg, why = s.currentTarget(g.Target, g.Dst)
	}
	e := audit.Event{Type: audit.TypeFlowAllowed, Src: src.String(), Details: map[string]string{"destination": dst.String()}}
	if ok {
		e.Actor, e.Device, e.Request, e.Grant, e.Target = g.User, g.Device, g.Request, g.Request, g.Target
	}
	if why != "" {
		e.Type = audit.TypeFlowDenied
		e.Details["reason"] = why
	}
	if err := s.Audit(ctx, e); err != nil {
		return LiveGrant{}, policy.Target{}, fmt.Errorf("auditing flow: %w", err)
	}
	if why != "" {
		return LiveGrant{}, policy.Target{}, errorf(KindForbidden, "flow %s -> %s refused: %s", src, dst, why)
	}
	return g, tg, nil
}

// CheckGrant reports whether a grant is still live.
func (s *Service) CheckGrant(ctx context.Context, id string) error {
	var r access.Request
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		r, err = tx.Request(ctx, id)
		return err
	})
	if err != nil {
		return err
	}
	if !r.Active(s.now()) {
		return errorf(KindConflict, "grant %s is %s", id, r.State)
	}
	return nil
}

// Revoke ends a grant (or cancels a pending request). The requester and
// admins may revoke.
func (s *Service) Revoke(ctx context.Context, actor store.User, id, reason string) (wire.Request, error) {
	if len(reason) > maxReasonBytes {
		return wire.Request{}, errorf(KindBadInput, "reason is too long")
	}
	var r access.Request
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		r, err = tx.Request(ctx, id)
		return err
	})
	if err != nil || (r.Requester != actor.Name && actor.Role != RoleAdmin) {
		return wire.Request{}, errorf(KindNotFound, "no request %s", id)
	}
	full := "revoked by " + actor.Name
	if reason != "" {
		if err := access.CheckReason(reason); err != nil {
			return wire.Request{}, errorf(KindBadInput, "%v", err)
		}
		full += ": " + reason
		if len(full) > access.MaxReasonLen {
			return wire.Request{}, errorf(KindBadInput, "reason is %d bytes; at most %d fit after %q",
				len(reason), access.MaxReasonLen-len(full)+len(reason), "revoked by "+actor.Name+": ")
		}
	}
	r, err = s.endGrant(ctx, id, full, actor.Name, true)
	if err != nil {
		return wire.Request{}, err
	}
	return WireRequest(r), nil
}

// endGrant ends request id (revoke when revoke is set, else expiry if due)
// in one transaction, then cuts its sessions and removes its peer.
func (s *Service) endGrant(ctx context.Context, id, reason, actor string, revoke bool) (access.Request, error) {
	r, changed, err := s.closeRequest(ctx, id, reason, actor, revoke)
	if err != nil {
		return access.Request{}, err
	}
	if changed {
		s.finishEnd(id, r)
	}
	return r, nil
}

// closeRequest commits the end of request id (revoke when revoke is set,
// else expiry if due) with its audit event; changed reports whether it ended
// now. The caller cuts the data plane with finishEnd when changed.
func (s *Service) closeRequest(ctx context.Context, id, reason, actor string, revoke bool) (access.Request, bool, error) {
	now := s.now()
	var r access.Request
	var changed bool
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		var err error
		r, err = tx.Request(ctx, id)
		if err != nil {
			return err
		}
		wasGranted := r.State == access.StateGranted
		if revoke {
			if err := r.Revoke(reason, now); err != nil {
				return accessErr(err)
			}
			changed = true
		} else {
			changed = r.Expire(now)
		}
		if !changed {
			return nil
		}
		if err := tx.UpdateRequest(ctx, r); err != nil {
			return err
		}
		if err := tx.EndActivation(ctx, id); err != nil {
			return err
		}
		typ, evType := audit.TypeGrantEnded, wire.EventGrantEnded
		if !wasGranted {
			typ, evType = auditRequestClosed, wire.EventRequestClosed
		}
		if err := s.pushEvent(ctx, tx, r.Device, wire.Event{Type: evType, Request: id, Reason: endReason(r, string(r.State))}); err != nil {
			return err
		}
		return s.record(ctx, tx, audit.Event{Type: typ, Actor: actor, Request: id, Grant: id, Target: r.Target, Device: r.Device,
			Details: map[string]string{"state": string(r.State), "reason": endReason(r, string(r.State))}})
	})
	if err != nil {
		return access.Request{}, false, err
	}
	return r, changed, nil
}

// finishEnd cuts the data plane of a grant closeRequest ended, then tells
// its agent (after the cut, so the agent's teardown cannot overtake the
// sessions' one-line reason).
func (s *Service) finishEnd(id string, r access.Request) {
	s.cutDataPlane(id, r)
	s.hub.notify(r.Device)
}

// cutDataPlane ends a grant's data plane. First the grant leaves the flow
// table, so no new flow is authorized for it from this instant; then its
// proxied sessions are told the one-line reason (bounded wait, see
// SessionCutter); then its flows are closed and its peer removed.
func (s *Service) cutDataPlane(id string, r access.Request) {
	gw, cut := s.dataPlane()
	s.planeMu.Lock()
	g, ok := s.flows.removeRequest(id)
	s.planeMu.Unlock()
	msg := fmt.Sprintf("grant %s for %s %s; session closed", id, r.Target, endReason(r, "ended"))
	if cut != nil {
		// Returns once the told sessions' connections are gone (bounded),
		// so the reset below cannot cut off their one-line reason.
		cut.EndGrant(id, msg)
	}
	if ok {
		s.planeMu.Lock()
		if gw != nil {
			if err := gw.RemovePeer(g.WGPublic); err != nil {
				s.log.Error("removing peer failed", "request", id, "err", err)
			}
			gw.CloseFlows(g.TunnelAddr)
		}
		s.flows.drained(g.TunnelAddr)
		s.planeMu.Unlock()
	}
	s.log.Info("grant ended", "request", id, "reason", r.EndReason, "state", r.State)
}

func (s *Service) poke() {
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// Run ends pending requests and grants when their time comes, until ctx is
// done. It wakes at the earliest due time, so a grant ends within
// milliseconds of its expiry. It returns once the cuts it started are done.
func (s *Service) Run(ctx context.Context) error {
	for {
		next, err := s.expireDue(ctx)
		if err != nil && ctx.Err() == nil {
			s.log.Error("expiring grants", "err", err)
			next = s.now().Add(time.Second)
		}
		wait := time.Until(next)
		if next.IsZero() || wait > time.Minute {
			wait = time.Minute
		}
		if wait < 0 {
			wait = 0
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			s.bg.closeAndWait()
			return nil
		case <-s.wake:
		case <-t.C:
		}
		t.Stop()
	}
}

// expireDue ends every open request that is due and returns the next due time.
func (s *Service) expireDue(ctx context.Context) (time.Time, error) {
	var open []access.Request
	if err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		open, err = tx.OpenRequests(ctx)
		return err
	}); err != nil {
		return time.Time{}, err
	}
	now := s.now()
	var next time.Time
	for _, r := range open {
		due := r.PendingUntil
		if r.State == access.StateGranted {
			due = r.GrantEnds
		}
		if !now.Before(due) {
			ended, changed, err := s.closeRequest(ctx, r.ID, "expired", "broker", false)
			if err != nil {
				return time.Time{}, err
			}
			if changed {
				// Each grant's cut runs on its own, so one grant's goodbye
				// to its sessions never delays another grant's cut.
				id := r.ID
				s.bg.start(func() { s.finishEnd(id, ended) })
			}
			continue
		}
		if next.IsZero() || due.Before(next) {
			next = due
		}
	}
	return next, nil
}

// Restore runs at start-up: it ends everything that fell due while the broker
// was down (never resurrecting it) and re-adds the peers of grants still active.
func (s *Service) Restore(ctx context.Context) error {
	if err := s.closeInterrupted(ctx); err != nil {
		return err
	}
	if _, err := s.expireDue(ctx); err != nil {
		return fmt.Errorf("expiring overdue grants: %w", err)
	}
	gw, _ := s.dataPlane()
	var open []access.Request
	var acts []store.Activation
	var users []string
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		open, err = tx.OpenRequests(ctx)
		if err != nil {
			return err
		}
		for _, r := range open {
			if r.State != access.StateGranted {
				continue
			}
			a, err := tx.Activation(ctx, r.ID)
			if errors.Is(err, store.ErrNotFound) {
				continue
			}
			if err != nil {
				return err
			}
			if !a.Ended {
				acts = append(acts, a)
				users = append(users, r.Requester)
			}
		}
		return nil
	})
	if err != nil {
		return err
	}
	byID := map[string]access.Request{}
	for _, r := range open {
		byID[r.ID] = r
	}
	for i, a := range acts {
		r := byID[a.Request]
		pub, err := wgkey.ParsePublic(a.WGPublicKey)
		if err != nil {
			return fmt.Errorf("stored peer key of %s: %w", a.Request, err)
		}
		// A grant is for a target as configured when it was issued: one whose
		// target is gone or now points elsewhere ends rather than comes back.
		if _, why := s.currentTarget(r.Target, a.Destination); why != "" {
			s.log.Warn("not restoring grant", "request", a.Request, "reason", why)
			if _, err := s.endGrant(ctx, a.Request, why+" after a broker restart", "broker", true); err != nil {
				return fmt.Errorf("revoking grant %s: %w", a.Request, err)
			}
			continue
		}
		if gw != nil {
			if err := gw.AddPeer(pub, a.TunnelAddr); err != nil {
				// One bad peer must not keep the broker down: end that grant
				// (its user asks again) and restore the others.
				s.log.Error("cannot restore peer; revoking its grant", "request", a.Request, "err", err)
				if _, err := s.endGrant(ctx, a.Request, "its tunnel could not be restored after a broker restart", "broker", true); err != nil {
					return fmt.Errorf("revoking unrestorable grant %s: %w", a.Request, err)
				}
				continue
			}
		}
		s.flows.put(LiveGrant{Request: a.Request, Device: a.Device, User: users[i], Target: r.Target, TunnelAddr: a.TunnelAddr, Dst: a.Destination, Ends: r.GrantEnds, WGPublic: pub})
		s.log.Info("restored active grant", "request", a.Request, "ends", r.GrantEnds)
	}
	return nil
}

// currentTarget returns target as configured now, or why a grant issued
// for it with destination dst no longer matches the config.
func (s *Service) currentTarget(target string, dst netip.AddrPort) (policy.Target, string) {
	tg, ok := s.policy().Target(target)
	if !ok {
		return tg, "target " + target + " is no longer configured"
	}
	if d, err := destination(tg); err != nil || d != dst {
		return tg, "target " + target + " has changed since the grant was issued"
	}
	return tg, ""
}
