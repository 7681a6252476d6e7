// Package access holds pinhole's access requests, approvals and grants as a
// pure state machine. Nothing here performs I/O or reads the clock: every
// transition takes the current time as an argument, and the caller persists
// the result together with its audit event.
//
// A request starts pending. Enough distinct approvals before PendingUntil
// turn it into a grant (StateGranted) that is active from GrantedAt until
// GrantEnds. A pending request can instead be denied, cancelled (Revoke) or
// expire unapproved (Expire). A grant ends (StateEnded) when it expires or
// is revoked. Denied, expired, ended and cancelled are final.
//
// Time windows are half-open: a request may be approved while now is
// before PendingUntil, and a grant is active while now is before GrantEnds.
// Every refusal leaves the request unchanged.
package access

import (
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// State is the lifecycle state of a Request.
type State string

// States of a request. Only StatePending and StateGranted can change.
const (
	// StatePending waits for approvals.
	StatePending State = "pending"
	// StateGranted has its approvals; the grant is active until GrantEnds.
	StateGranted State = "granted"
	// StateDenied was refused by an approver.
	StateDenied State = "denied"
	// StateExpired was never approved in time.
	StateExpired State = "expired"
	// StateEnded was a grant that is over: it expired or was revoked.
	StateEnded State = "ended"
	// StateCancelled was withdrawn while pending.
	StateCancelled State = "cancelled"
)

// Valid reports whether s is one of the defined states.
func (s State) Valid() bool {
	switch s {
	case StatePending, StateGranted, StateDenied, StateExpired, StateEnded, StateCancelled:
		return true
	}
	return false
}

// Final reports whether no transition leaves s.
func (s State) Final() bool {
	return s.Valid() && s != StatePending && s != StateGranted
}

// Limits on request fields.
const (
	// MaxReasonLen is the longest reason, in bytes.
	MaxReasonLen = 500
	// MaxIDLen is the longest ID, requester, device, target or role name,
	// in bytes.
	MaxIDLen = 256
	// MaxApprovals is the most approvals a request may require.
	MaxApprovals = 16
	// MaxApproverRoles is the most approver roles a request may name.
	MaxApproverRoles = 64
)

// End reasons set by the state machine itself.
const (
	// EndReasonExpired ends a grant whose time ran out.
	EndReasonExpired = "expired"
	// EndReasonPendingExpired ends a request nobody approved in time.
	EndReasonPendingExpired = "not approved in time"
)

// Errors returned by transitions; callers branch on them with errors.Is.
var (
	// ErrInvalid means a request or argument failed validation.
	ErrInvalid = errors.New("access: invalid request")
	// ErrSelfApproval means the requester tried to approve or deny their
	// own request.
	ErrSelfApproval = errors.New("access: requester cannot approve their own request")
	// ErrNotApprover means the approver holds none of the approver roles.
	ErrNotApprover = errors.New("access: not an approver for this request")
	// ErrNotPending means the request no longer awaits a decision.
	ErrNotPending = errors.New("access: request is not pending")
	// ErrPendingExpired means the request's approval window has closed.
	ErrPendingExpired = errors.New("access: request expired before approval")
	// ErrAlreadyApproved means this approver already approved.
	ErrAlreadyApproved = errors.New("access: already approved by this approver")
	// ErrNotActive means there is no live request or grant to act on.
	ErrNotActive = errors.New("access: request is neither pending nor an active grant")
)

// Approval records one approver's consent.
type Approval struct {
	// Approver is the approving user's name.
	Approver string `json:"approver"`
	// At is when the approval was recorded.
	At time.Time `json:"at"`
}

// Request is an access request and, once approved, its grant.
type Request struct {
	// ID identifies the request (and its grant).
	ID string `json:"id"`
	// Requester is the user who asked.
	Requester string `json:"requester"`
	// Device is the device the grant is bound to.
	Device string `json:"device"`
	// Target is the policy target name.
	Target string `json:"target"`
	// Reason is the requester's justification, shown to approvers.
	Reason string `json:"reason"`
	// TTL is how long the grant lasts once approved.
	TTL time.Duration `json:"ttl"`
	// CreatedAt is when the request was made.
	CreatedAt time.Time `json:"created_at"`
	// PendingUntil is when an unapproved request expires.
	PendingUntil time.Time `json:"pending_until"`
	// RequiredApprovals is how many distinct approvers must approve.
	RequiredApprovals int `json:"required_approvals"`
	// ApproverRoles lists the roles whose members may approve.
	ApproverRoles []string `json:"approver_roles"`
	// Approvals are the approvals so far, in order.
	Approvals []Approval `json:"approvals,omitempty"`
	// State is the lifecycle state.
	State State `json:"state"`
	// GrantedAt is when the last required approval arrived (zero until
	// granted).
	GrantedAt time.Time `json:"granted_at,omitzero"`
	// GrantEnds is GrantedAt+TTL (zero until granted).
	GrantEnds time.Time `json:"grant_ends,omitzero"`
	// EndedAt is when the request reached a final state (zero before).
	EndedAt time.Time `json:"ended_at,omitzero"`
	// EndReason says why it ended (empty before).
	EndReason string `json:"end_reason,omitempty"`
}

// NewRequestParams are the inputs of NewRequest, usually taken from a
// policy decision and the requester's input.
type NewRequestParams struct {
	ID, Requester, Device, Target, Reason string
	// TTL is the grant's lifetime once approved; must be positive.
	TTL time.Duration
	// PendingFor is how long the request waits for approval; must be
	// positive.
	PendingFor time.Duration
	// RequiredApprovals is at least 1 and at most MaxApprovals.
	RequiredApprovals int
	// ApproverRoles is not empty.
	ApproverRoles []string
}

// NewRequest validates p and returns a pending request created at now.
// Errors wrap ErrInvalid and name the field.
func NewRequest(p NewRequestParams, now time.Time) (Request, error) {
	for _, f := range []struct{ name, v string }{
		{"id", p.ID}, {"requester", p.Requester}, {"device", p.Device}, {"target", p.Target},
	} {
		if err := checkName(f.name, f.v); err != nil {
			return Request{}, err
		}
	}
	if err := CheckReason(p.Reason); err != nil {
		return Request{}, err
	}
	if p.TTL <= 0 {
		return Request{}, fmt.Errorf("%w: ttl must be positive, got %s", ErrInvalid, p.TTL)
	}
	if p.PendingFor <= 0 {
		return Request{}, fmt.Errorf("%w: pending_for must be positive, got %s", ErrInvalid, p.PendingFor)
	}
	if p.RequiredApprovals < 1 || p.RequiredApprovals > MaxApprovals {
		return Request{}, fmt.Errorf("%w: required approvals must be 1 to %d, got %d", ErrInvalid, MaxApprovals, p.RequiredApprovals)
	}
	if len(p.ApproverRoles) == 0 {
		return Request{}, fmt.Errorf("%w: approver roles must not be empty", ErrInvalid)
	}
	if len(p.ApproverRoles) > MaxApproverRoles {
		return Request{}, fmt.Errorf("%w: more than %d approver roles", ErrInvalid, MaxApproverRoles)
	}
	for _, r := range p.ApproverRoles {
		if err := checkName("approver role", r); err != nil {
			return Request{}, err
		}
	}
	return Request{
		ID:                p.ID,
		Requester:         p.Requester,
		Device:            p.Device,
		Target:            p.Target,
		Reason:            p.Reason,
		TTL:               p.TTL,
		CreatedAt:         now,
		PendingUntil:      now.Add(p.PendingFor),
		RequiredApprovals: p.RequiredApprovals,
		ApproverRoles:     slices.Clone(p.ApproverRoles),
		State:             StatePending,
	}, nil
}

func checkName(field, v string) error {
	switch {
	case v == "":
		return fmt.Errorf("%w: %s must not be empty", ErrInvalid, field)
	case len(v) > MaxIDLen:
		return fmt.Errorf("%w: %s is longer than %d bytes", ErrInvalid, field, MaxIDLen)
	case !utf8.ValidString(v):
		return fmt.Errorf("%w: %s is not valid UTF-8", ErrInvalid, field)
	case strings.IndexFunc(v, func(r rune) bool { return unicode.IsControl(r) || unicode.IsSpace(r) }) >= 0:
		return fmt.Errorf("%w: %s must not contain spaces or control characters", ErrInvalid, field)
	}
	return nil
}

// CheckReason validates a free-text reason (a request's justification or
// a revocation reason): not blank, at most MaxReasonLen bytes of UTF-8,
// and no control characters other than tab. Errors wrap ErrInvalid.
func CheckReason(reason string) error {
	switch {
	case strings.TrimSpace(reason) == "":
		return fmt.Errorf("%w: reason must not be empty", ErrInvalid)
	case len(reason) > MaxReasonLen:
		return fmt.Errorf("%w: reason is %d bytes, longer than %d", ErrInvalid, len(reason), MaxReasonLen)
	case !utf8.ValidString(reason):
		return fmt.Errorf("%w: reason is not valid UTF-8", ErrInvalid)
	case strings.IndexFunc(reason, func(r rune) bool { return r != '\t' && unicode.IsControl(r) }) >= 0:
		return fmt.Errorf("%w: reason must not contain control characters", ErrInvalid)
	case strings.IndexFunc(reason, Invisible) >= 0:
		// Format characters (bidi overrides, zero-width joiners) can make an
		// approver read something other than what is stored.
		return fmt.Errorf("%w: reason must not contain invisible formatting characters", ErrInvalid)
	}
	return nil
}

// Invisible reports runes that render as nothing or as a line break inside
// one line: format characters (bidi overrides, zero-width joiners), line
// and paragraph separators, and blank fillers. Text an approver reads must
// not hold them.
func Invisible(r rune) bool {
	switch r {
	case 0x034F, 0x115F, 0x1160, 0x3164, 0xFFA0, 0x2800:
		return true
	}
	return unicode.In(r, unicode.Cf, unicode.Zl, unicode.Zp)
}

// Approver is a user acting on a request, with the roles they hold.
type Approver struct {
	Name  string
	Roles []string
}

// mayDecide checks the rules shared by Approve and Deny.
func (r *Request) mayDecide(a Approver, now time.Time) error {
	if r.State != StatePending {
		return fmt.Errorf("%w: request %s is %s", ErrNotPending, r.ID, r.State)
	}
	if !now.Before(r.PendingUntil) {
		return fmt.Errorf("%w: request %s waited for approval until %s", ErrPendingExpired, r.ID, r.PendingUntil.UTC().Format(time.RFC3339))
	}
	if a.Name == "" {
		return fmt.Errorf("%w: approver has no name", ErrNotApprover)
	}
	if a.Name == r.Requester {
		return fmt.Errorf("%w: %s requested %s", ErrSelfApproval, a.Name, r.ID)
	}
	if !slices.ContainsFunc(a.Roles, func(role string) bool { return slices.Contains(r.ApproverRoles, role) }) {
		return fmt.Errorf("%w: %s holds none of the roles %s", ErrNotApprover, a.Name, strings.Join(r.ApproverRoles, ", "))
	}
	return nil
}

// Approve records a's approval at now. It refuses (leaving r unchanged) a
// request that is not pending (ErrNotPending) or whose approval window has
// closed (ErrPendingExpired), the requester (ErrSelfApproval), an approver
// without one of r.ApproverRoles (ErrNotApprover) and a second approval by
// the same approver (ErrAlreadyApproved). The approval that brings the
// count to RequiredApprovals grants the request: State becomes
// StateGranted, GrantedAt now and GrantEnds now+TTL, and granted is true.
func (r *Request) Approve(a Approver, now time.Time) (granted bool, err error) {
	if err := r.mayDecide(a, now); err != nil {
		return false, err
	}
	if slices.ContainsFunc(r.Approvals, func(x Approval) bool { return x.Approver == a.Name }) {
		return false, fmt.Errorf("%w: %s on %s", ErrAlreadyApproved, a.Name, r.ID)
	}
	r.Approvals = append(r.Approvals, Approval{Approver: a.Name, At: now})
	if len(r.Approvals) < r.RequiredApprovals {
		return false, nil
	}
	r.State = StateGranted
	r.GrantedAt = now
	r.GrantEnds = now.Add(r.TTL)
	return true, nil
}

// Deny refuses the request on a's behalf at now: State becomes StateDenied,
// EndedAt now and EndReason "denied by NAME". It refuses what Approve
// refuses, except that an approver who already approved may still deny
// while the request is pending. A requester withdraws with Revoke instead.
func (r *Request) Deny(a Approver, now time.Time) error {
	if err := r.mayDecide(a, now); err != nil {
		return err
	}
	r.State = StateDenied
	r.EndedAt = now
	r.EndReason = "denied by " + a.Name
	return nil
}

// Expire applies the passage of time at now and reports whether r changed:
// a pending request at or past PendingUntil becomes StateExpired (EndReason
// EndReasonPendingExpired), and a grant at or past GrantEnds becomes
// StateEnded (EndReason EndReasonExpired). EndedAt is set to the deadline
// that passed, not to now, so a late sweep records the true end.
func (r *Request) Expire(now time.Time) (changed bool) {
	switch {
	case r.State == StatePending && !now.Before(r.PendingUntil):
		r.State = StateExpired
		r.EndedAt = r.PendingUntil
		r.EndReason = EndReasonPendingExpired
		return true
	case r.State == StateGranted && !now.Before(r.GrantEnds):
		r.State = StateEnded
		r.EndedAt = r.GrantEnds
		r.EndReason = EndReasonExpired
		return true
	}
	return false
}

// Revoke ends an active grant (StateEnded) or cancels a pending request
// (StateCancelled) at now, recording reason, which must pass CheckReason.
// A grant already past GrantEnds or a request past PendingUntil is not
// revoked: call Expire. Anything else returns ErrNotActive.
func (r *Request) Revoke(reason string, now time.Time) error {
	if err := CheckReason(reason); err != nil {
		return fmt.Errorf("revoking %s: %w", r.ID, err)
	}
	switch {
	case r.State == StateGranted && now.Before(r.GrantEnds):
		r.State = StateEnded
	case r.State == StatePending && now.Before(r.PendingUntil):
		r.State = StateCancelled
	case r.State == StatePending:
		return fmt.Errorf("%w: request %s waited for approval until %s", ErrPendingExpired, r.ID, r.PendingUntil.UTC().Format(time.RFC3339))
	default:
		return fmt.Errorf("%w: request %s is %s", ErrNotActive, r.ID, r.effectiveState(now))
	}
	r.EndedAt = now
	r.EndReason = reason
	return nil
}

func (r *Request) effectiveState(now time.Time) State {
	if r.State == StateGranted && !now.Before(r.GrantEnds) {
		return StateEnded
	}
	return r.State
}

// Active reports whether r is a grant in force at now: granted and now
// before GrantEnds.
func (r Request) Active(now time.Time) bool {
	return r.State == StateGranted && now.Before(r.GrantEnds)
}
