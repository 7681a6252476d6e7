package service

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/access"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/policy"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// maxReasonBytes bounds the reason of a request.
const maxReasonBytes = 500

// maxPendingPerUser is how many requests one user may have waiting for
// approval at once. Each request sends a grant link to every approver; the
// cap keeps one user (or a stolen device) from flooding approvers with links
// until they approve without reading (approval fatigue).
const maxPendingPerUser = 5

// notifyTimeout bounds the delivery of one grant link by one notifier.
const notifyTimeout = 15 * time.Second

// CreateRequest evaluates the rules for the calling device and user and, when
// they allow it, stores a pending request and sends grant links to approvers.
func (s *Service) CreateRequest(ctx context.Context, d store.Device, u store.User, in wire.CreateRequest) (wire.Request, error) {
	if d.State != store.DeviceActive {
		return wire.Request{}, errorf(KindForbidden, "device is %s; confirm it first", d.State)
	}
	if err := policy.CheckName(in.Target); err != nil {
		return wire.Request{}, errorf(KindBadInput, "target: %v", err)
	}
	ttl, err := time.ParseDuration(in.TTL)
	if err != nil || ttl <= 0 {
		return wire.Request{}, errorf(KindBadInput, "ttl %.40q: want a positive duration such as 45m", in.TTL)
	}
	if len(in.Reason) > maxReasonBytes {
		return wire.Request{}, errorf(KindBadInput, "reason is %d bytes; at most %d", len(in.Reason), maxReasonBytes)
	}
	id, err := s.newID("r-")
	if err != nil {
		return wire.Request{}, err
	}
	now := s.now()
	cfg := s.policy()
	var req access.Request
	var notices []ApprovalNotice
	// refused is set when the rules say no: the transaction then commits
	// the request.refused event (and nothing else) and the caller gets it.
	var refused *Error
	err = s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		refused = nil
		// In the transaction that creates the request, so that racing
		// creations cannot both pass it.
		if why, err := pendingLimit(ctx, tx, u.Name, now); err != nil || why != "" {
			if err == nil {
				refused, err = s.refuse(ctx, tx, u, d, in, KindConflict, why)
			}
			return err
		}
		rep, err := latestPosture(ctx, tx, d.ID)
		if err != nil {
			return err
		}
		var facts *policy.PostureFacts
		if rep != nil {
			facts = &policy.PostureFacts{CollectedAt: rep.CollectedAt, DiskEncrypted: rep.DiskEncrypted, FirewallActive: rep.FirewallActive}
		}
		dec := policy.Evaluate(cfg, policy.Input{Roles: []string{u.Role}, Target: in.Target, TTL: ttl, Reason: in.Reason, Posture: facts, Now: now})
		if !dec.Allow {
			refused, err = s.refuse(ctx, tx, u, d, in, KindPolicy, "request refused: "+dec.Reason)
			return err
		}
		approvers, err := s.eligibleApprovers(ctx, tx, dec.ApproverRoles, u.Name)
		if err != nil {
			return err
		}
		if len(approvers) < dec.Approvals {
			refused, err = s.refuse(ctx, tx, u, d, in, KindPolicy, fmt.Sprintf("request refused: rule %s needs %d approval(s) but only %d approver(s) with a security key exist", dec.Rule, dec.Approvals, len(approvers)))
			return err
		}
		req, err = access.NewRequest(access.NewRequestParams{ID: id, Requester: u.Name, Device: d.ID, Target: in.Target, Reason: in.Reason,
			TTL: ttl, PendingFor: dec.PendingFor, RequiredApprovals: dec.Approvals, ApproverRoles: dec.ApproverRoles}, now)
		if err != nil {
			return &Error{Kind: KindBadInput, Msg: err.Error(), Err: err}
		}
		if err := tx.CreateRequest(ctx, req); err != nil {
			return err
		}
		for _, a := range approvers {
			token, hash, err := s.secret()
			if err != nil {
				return err
			}
			if err := tx.PutToken(ctx, store.Token{Hash: hash, Kind: store.TokenGrant, User: a.Name, Request: id, CreatedAt: now, ExpiresAt: req.PendingUntil}); err != nil {
				return err
			}
			notices = append(notices, ApprovalNotice{Approver: a.Name, Request: id, Requester: u.Name, Target: in.Target, Reason: in.Reason,
				TTL: ttl.String(), URL: s.link("grant", token), ExpiresAt: req.PendingUntil})
		}
		return s.record(ctx, tx, audit.Event{Type: audit.TypeRequestCreated, Actor: u.Name, Device: d.ID, Target: in.Target, Request: id,
			Details: map[string]string{"reason": in.Reason, "ttl": ttl.String(), "rule": dec.Rule, "approvals": fmt.Sprint(dec.Approvals)}})
	})
	if err != nil {
		return wire.Request{}, err
	}
	if refused != nil {
		return wire.Request{}, refused
	}
	s.poke()
	s.notify(ctx, notices)
	return WireRequest(req), nil
}

// pendingLimit says why a new request of user is refused when user already
// has maxPendingPerUser requests waiting for approval ("" when it is not).
// Call it in the transaction that creates the request. A pending request
// whose wait is over no longer counts, even before the expiry loop has ended
// it.
func pendingLimit(ctx context.Context, tx store.Tx, user string, now time.Time) (string, error) {
	open, err := tx.OpenRequests(ctx)
	if err != nil {
		return "", fmt.Errorf("counting pending requests of %s: %w", user, err)
	}
	var waiting []string
	for _, r := range open {
		if r.Requester == user && r.State == access.StatePending && now.Before(r.PendingUntil) {
			waiting = append(waiting, r.ID)
		}
	}
	if len(waiting) >= maxPendingPerUser {
		return fmt.Sprintf("%s already has %d requests waiting for approval (%s); cancel one with pinhole revoke ID or wait until one is decided or expires",
			user, len(waiting), strings.Join(waiting, ", ")), nil
	}
	return "", nil
}

// refuse audits a refused request in tx and returns the refusal for the
// caller; err is set only when the audit event could not be written.
func (s *Service) refuse(ctx context.Context, tx store.Tx, u store.User, d store.Device, in wire.CreateRequest, kind Kind, msg string) (refusal *Error, err error) {
	if err := s.record(ctx, tx, audit.Event{Type: audit.TypeRequestRefused, Actor: u.Name, Device: d.ID, Target: in.Target,
		Details: map[string]string{"reason": msg, "ttl": in.TTL}}); err != nil {
		return nil, err
	}
	return &Error{Kind: kind, Msg: msg}, nil
}

func (s *Service) eligibleApprovers(ctx context.Context, tx store.Tx, roles []string, requester string) ([]store.User, error) {
	var out []store.User
	for _, role := range roles {
		us, err := tx.UsersWithRole(ctx, role)
		if err != nil {
			return nil, err
		}
		for _, u := range us {
			if u.Disabled || u.Name == requester {
				continue
			}
			creds, err := tx.Credentials(ctx, u.Name)
			if err != nil {
				return nil, err
			}
			if len(creds) > 0 {
				out = append(out, u)
			}
		}
	}
	return out, nil
}

// SplitNotifier is a Notifier whose delivery has a quick part that keeps
// the link (an owner-only outbox file) and a slow part that waits on another
// system (a webhook). The Service calls the quick part inside the API call
// that created the request, so every link is kept before that call returns,
// and the slow part on background goroutines that Run waits for on exit, so
// a slow receiver never holds up `pinhole request`. A Notifier that is not a
// SplitNotifier is called inside the API call as a whole.
type SplitNotifier interface {
	Notifier
	// Split returns the quick and the slow part; either may be nil.
	Split() (quick, slow Notifier)
}

// notify sends the grant links of a stored request: the quick part of the
// notifier now, the slow part in the background.
func (s *Service) notify(ctx context.Context, notices []ApprovalNotice) {
	for _, n := range notices {
		s.log.Info("grant link issued", "request", n.Request, "approver", n.Approver, "target", n.Target)
	}
	if s.cfg.Notifier == nil {
		return
	}
	quick, slow := s.cfg.Notifier, Notifier(nil)
	if sn, ok := s.cfg.Notifier.(SplitNotifier); ok {
		quick, slow = sn.Split()
	}
	// The request is stored: delivering its links must not depend on the
	// requester's connection staying open.
	ctx = context.WithoutCancel(ctx)
	if quick != nil {
		for _, n := range notices {
			s.deliver(ctx, quick, n)
		}
	}
	if slow != nil {
		for _, n := range notices {
			// One goroutine per link: a receiver that never answers
			// holds up shutdown by one timeout, not one per approver.
			s.bg.start(func() { s.deliver(ctx, slow, n) })
		}
	}
}

// deliver hands n to one notifier and logs a failure.
func (s *Service) deliver(ctx context.Context, to Notifier, n ApprovalNotice) {
	ctx, cancel := context.WithTimeout(ctx, notifyTimeout)
	defer cancel()
	if err := to.NotifyApprover(ctx, n); err != nil {
		s.log.Error("notifying approver failed", "request", n.Request, "approver", n.Approver, "err", err)
	}
}

// Request returns a request visible to the calling user (their own, or any for an admin).
func (s *Service) Request(ctx context.Context, u store.User, id string) (wire.Request, error) {
	var r access.Request
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		r, err = tx.Request(ctx, id)
		return err
	})
	if err != nil || (r.Requester != u.Name && u.Role != RoleAdmin) {
		return wire.Request{}, errorf(KindNotFound, "no request %s", id)
	}
	return WireRequest(r), nil
}

// WireRequest converts a request to its wire form.
func WireRequest(r access.Request) wire.Request {
	w := wire.Request{ID: r.ID, Requester: r.Requester, Device: r.Device, Target: r.Target, Reason: r.Reason, TTL: r.TTL.String(),
		State: string(r.State), CreatedAt: r.CreatedAt, PendingUntil: r.PendingUntil, RequiredApprovals: r.RequiredApprovals,
		GrantedAt: r.GrantedAt, GrantEnds: r.GrantEnds, EndedAt: r.EndedAt, EndReason: r.EndReason, Approvals: []wire.Approval{}}
	for _, a := range r.Approvals {
		w.Approvals = append(w.Approvals, wire.Approval{Approver: a.Approver, At: a.At})
	}
	return w
}

// GrantView is exactly what an approver's page shows; its Hash is what the
// WebAuthn challenge commits to.
type GrantView struct {
	Request   string   `json:"request"`
	Approver  string   `json:"approver"`
	Requester string   `json:"requester"`
	Device    string   `json:"device"`
	Target    string   `json:"target"`
	Address   string   `json:"address"`
	Protocol  string   `json:"protocol"`
	Login     string   `json:"login"`
	Reason    string   `json:"reason"`
	Duration  string   `json:"duration"`
	Posture   []string `json:"posture"`
	// PostureAt is when the shown report was collected. It is displayed but
	// not committed to: the agent reports every minute, and a fresher report
	// with the same facts must not void an approval in progress.
	PostureAt    time.Time `json:"-"`
	PendingUntil time.Time `json:"pending_until"`
	State        string    `json:"state"`
	Approvals    []string  `json:"approvals"`
	Required     int       `json:"required"`
}

// Hash is the hex SHA-256 of the view's JSON encoding.
func (v GrantView) Hash() string {
	b, _ := json.Marshal(v)
	sum := sha256.Sum256(b)
	return hex.EncodeToString(sum[:])
}

func (s *Service) grantView(ctx context.Context, tx store.Tx, token string) (store.Token, access.Request, GrantView, error) {
	t, err := s.checkToken(ctx, tx, token, store.TokenGrant)
	if err != nil {
		return store.Token{}, access.Request{}, GrantView{}, err
	}
	r, err := tx.Request(ctx, t.Request)
	if err != nil {
		return store.Token{}, access.Request{}, GrantView{}, err
	}
	v := GrantView{Request: r.ID, Approver: t.User, Requester: r.Requester, Device: r.Device, Target: r.Target, Reason: r.Reason,
		Duration: shortDuration(r.TTL), PendingUntil: r.PendingUntil, State: string(r.State), Required: r.RequiredApprovals, Approvals: []string{}}
	if tg, ok := s.policy().Target(r.Target); ok {
		v.Address, v.Protocol, v.Login = tg.Address, string(tg.Protocol), tg.Login
	}
	for _, a := range r.Approvals {
		v.Approvals = append(v.Approvals, a.Approver)
	}
	rep, err := latestPosture(ctx, tx, r.Device)
	if err != nil {
		return store.Token{}, access.Request{}, GrantView{}, err
	}
	if rep == nil {
		v.Posture = []string{"no posture report"}
	} else {
		v.Posture = []string{
			"host: " + rep.Hostname, "os: " + rep.OS, "kernel: " + rep.Kernel,
			fmt.Sprintf("disk encryption: %v", yesNo(rep.DiskEncrypted)), fmt.Sprintf("firewall: %v", yesNo(rep.FirewallActive)),
			"screen lock: " + rep.ScreenLock,
		}
		v.PostureAt = rep.CollectedAt
	}
	return t, r, v, nil
}

func yesNo(b bool) string {
	if b {
		return "yes"
	}
	return "no"
}

// GrantLinkView returns what a grant link's page shows.
func (s *Service) GrantLinkView(ctx context.Context, token string) (GrantView, error) {
	var v GrantView
	err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		_, _, v, err = s.grantView(ctx, tx, token)
		return err
	})
	return v, err
}

// Decision is an approver's answer.
type Decision string

// Decisions.
const (
	Approve Decision = "approve"
	Deny    Decision = "deny"
)

// BeginDecision starts the assertion for approving or denying. viewHash must
// be the hash of the view the page showed; a changed request is refused.
func (s *Service) BeginDecision(ctx context.Context, token string, d Decision, viewHash string) ([]byte, error) {
	if d != Approve && d != Deny {
		return nil, errorf(KindBadInput, "decision must be approve or deny")
	}
	var opts []byte
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		t, r, v, err := s.grantView(ctx, tx, token)
		if err != nil {
			return err
		}
		if v.Hash() != viewHash {
			return errorf(KindConflict, "the request changed since the page was loaded; reload it")
		}
		if err := s.precheckApprover(ctx, tx, t, r); err != nil {
			return err
		}
		opts, err = s.beginCommitted(ctx, tx, t.User, string(d), viewHash, string(d)+":"+t.Hash)
		return err
	})
	return opts, err
}

func (s *Service) precheckApprover(ctx context.Context, tx store.Tx, t store.Token, r access.Request) error {
	if t.User == r.Requester {
		return errorf(KindForbidden, "you cannot approve your own request")
	}
	if r.State != access.StatePending {
		return errorf(KindConflict, "request %s is %s", r.ID, r.State)
	}
	return nil
}

// FinishDecision verifies the approver's assertion against the committed
// view and records the approval or denial; the link is used up either way.
func (s *Service) FinishDecision(ctx context.Context, token string, d Decision, response []byte) (wire.Request, error) {
	if d != Approve && d != Deny {
		return wire.Request{}, errorf(KindBadInput, "decision must be approve or deny")
	}
	var out access.Request
	var granted bool
	var rejected error
	err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		t, r, v, err := s.grantView(ctx, tx, token)
		if err != nil {
			return err
		}
		cer, err := s.takeCeremony(ctx, tx, string(d)+":"+t.Hash)
		if err != nil {
			return err
		}
		if err := checkCommitment(string(d), v.Hash(), cer); err != nil {
			return err
		}
		u, err := s.assert(ctx, tx, t.User, cer, response)
		if err != nil {
			rejected = err
			return s.record(ctx, tx, audit.Event{Type: audit.TypeApprovalRejected, Actor: t.User, Request: r.ID, Target: r.Target,
				Details: map[string]string{"reason": err.Error()}})
		}
		if err := tx.UseToken(ctx, t.Hash, s.now()); err != nil {
			return err
		}
		roles := []string{u.Role}
		now := s.now()
		if d == Deny {
			if err := r.Deny(access.Approver{Name: u.Name, Roles: roles}, now); err != nil {
				return accessErr(err)
			}
			if err := tx.UpdateRequest(ctx, r); err != nil {
				return err
			}
			if err := s.pushEvent(ctx, tx, r.Device, wire.Event{Type: wire.EventRequestClosed, Request: r.ID, Reason: "denied by " + u.Name}); err != nil {
				return err
			}
			out = r
			return s.record(ctx, tx, audit.Event{Type: audit.TypeRequestDenied, Actor: u.Name, Request: r.ID, Target: r.Target, Device: r.Device})
		}
		granted, err = r.Approve(access.Approver{Name: u.Name, Roles: roles}, now)
		if err != nil {
			return accessErr(err)
		}
		if err := tx.UpdateRequest(ctx, r); err != nil {
			return err
		}
		if err := s.record(ctx, tx, audit.Event{Type: audit.TypeApprovalRecorded, Actor: u.Name, Request: r.ID, Target: r.Target, Device: r.Device,
			Details: map[string]string{"view": v.Hash(), "approvals": fmt.Sprintf("%d/%d", len(r.Approvals), r.RequiredApprovals)}}); err != nil {
			return err
		}
		out = r
		if !granted {
			return nil
		}
		if err := s.pushEvent(ctx, tx, r.Device, wire.Event{Type: wire.EventGrantIssued, Request: r.ID}); err != nil {
			return err
		}
		return s.record(ctx, tx, audit.Event{Type: audit.TypeGrantIssued, Actor: r.Requester, Request: r.ID, Grant: r.ID, Target: r.Target, Device: r.Device,
			Details: map[string]string{"ends": r.GrantEnds.Format(time.RFC3339Nano), "approvers": approverList(r)}})
	})
	if err != nil {
		return wire.Request{}, err
	}
	if rejected != nil {
		return wire.Request{}, rejected
	}
	s.hub.notify(out.Device)
	if granted {
		s.poke()
	}
	return WireRequest(out), nil
}

func approverList(r access.Request) string {
	s := ""
	for i, a := range r.Approvals {
		if i > 0 {
			s += ","
		}
		s += a.Approver
	}
	return s
}

func accessErr(err error) error {
	switch {
	case errors.Is(err, access.ErrSelfApproval), errors.Is(err, access.ErrNotApprover):
		return &Error{Kind: KindForbidden, Msg: err.Error(), Err: err}
	case errors.Is(err, access.ErrPendingExpired):
		return &Error{Kind: KindGone, Msg: err.Error(), Err: err}
	default:
		return &Error{Kind: KindConflict, Msg: err.Error(), Err: err}
	}
}

// shortDuration prints d the way people write it: 45m, 1h30m, 20s.
func shortDuration(d time.Duration) string {
	s := d.String()
	if strings.HasSuffix(s, "m0s") {
		s = strings.TrimSuffix(s, "0s")
	}
	if strings.HasSuffix(s, "h0m") {
		s = strings.TrimSuffix(s, "0m")
	}
	return s
}
