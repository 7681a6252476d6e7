package access

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var t0 = time.Date(2026, 3, 14, 9, 0, 0, 0, time.UTC)

func at(d time.Duration) time.Time { return t0.Add(d) }

func params() NewRequestParams {
	return NewRequestParams{
		ID: "req-1", Requester: "alice", Device: "dev-1", Target: "db-prod", Reason: "INC-4821 vacuum",
		TTL: 45 * time.Minute, PendingFor: 15 * time.Minute, RequiredApprovals: 2, ApproverRoles: []string{"approver", "lead"},
	}
}

var (
	bob   = Approver{Name: "bob", Roles: []string{"approver"}}
	carol = Approver{Name: "carol", Roles: []string{"dba", "lead"}}
	dave  = Approver{Name: "dave", Roles: []string{"dba"}}
	alice = Approver{Name: "alice", Roles: []string{"approver"}}
)

func TestNewRequest(t *testing.T) {
	t.Parallel()
	got, err := NewRequest(params(), t0)
	if err != nil {
		t.Fatal(err)
	}
	want := Request{
		ID: "req-1", Requester: "alice", Device: "dev-1", Target: "db-prod", Reason: "INC-4821 vacuum",
		TTL: 45 * time.Minute, CreatedAt: t0, PendingUntil: at(15 * time.Minute), RequiredApprovals: 2,
		ApproverRoles: []string{"approver", "lead"}, State: StatePending,
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("NewRequest (-want +got):\n%s", diff)
	}

	bad := []struct {
		name   string
		mutate func(*NewRequestParams)
		want   string
	}{
		{"empty id", func(p *NewRequestParams) { p.ID = "" }, "id must not be empty"},
		{"empty requester", func(p *NewRequestParams) { p.Requester = "" }, "requester must not be empty"},
		{"empty device", func(p *NewRequestParams) { p.Device = "" }, "device must not be empty"},
		{"empty target", func(p *NewRequestParams) { p.Target = "" }, "target must not be empty"},
		{"long id", func(p *NewRequestParams) { p.ID = strings.Repeat("x", MaxIDLen+1) }, "id is longer than 256"},
		{"target with newline", func(p *NewRequestParams) { p.Target = "db\nprod" }, "target must not contain"},
		{"invalid utf8 requester", func(p *NewRequestParams) { p.Requester = "\xff" }, "requester is not valid UTF-8"},
		{"empty reason", func(p *NewRequestParams) { p.Reason = "" }, "reason must not be empty"},
		{"blank reason", func(p *NewRequestParams) { p.Reason = " \t " }, "reason must not be empty"},
		{"long reason", func(p *NewRequestParams) { p.Reason = strings.Repeat("r", 501) }, "reason is 501 bytes"},
		{"reason with escape", func(p *NewRequestParams) { p.Reason = "ok\x1b[2J" }, "control characters"},
		{"reason with a bidi override", func(p *NewRequestParams) { p.Reason = "INC-1 \u202egnp.exe" }, "invisible formatting"},
		{"reason with a hangul filler", func(p *NewRequestParams) { p.Reason = "INC-1 \u3164" }, "invisible formatting"},
		{"reason with a line separator", func(p *NewRequestParams) { p.Reason = "INC-1\u2028rm" }, "invisible formatting"},
		{"reason bad utf8", func(p *NewRequestParams) { p.Reason = "ok\xc3" }, "not valid UTF-8"},
		{"zero ttl", func(p *NewRequestParams) { p.TTL = 0 }, "ttl must be positive"},
		{"negative ttl", func(p *NewRequestParams) { p.TTL = -time.Minute }, "ttl must be positive"},
		{"zero pending", func(p *NewRequestParams) { p.PendingFor = 0 }, "pending_for must be positive"},
		{"zero approvals", func(p *NewRequestParams) { p.RequiredApprovals = 0 }, "required approvals must be 1 to 16"},
		{"too many approvals", func(p *NewRequestParams) { p.RequiredApprovals = 17 }, "required approvals"},
		{"no approver roles", func(p *NewRequestParams) { p.ApproverRoles = nil }, "approver roles must not be empty"},
		{"empty approver role", func(p *NewRequestParams) { p.ApproverRoles = []string{""} }, "approver role must not be empty"},
		{"too many approver roles", func(p *NewRequestParams) { p.ApproverRoles = make([]string, 65) }, "more than 64"},
	}
	for _, tt := range bad {
		t.Run("deny/"+tt.name, func(t *testing.T) {
			t.Parallel()
			p := params()
			tt.mutate(&p)
			_, err := NewRequest(p, t0)
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("NewRequest = %v, want ErrInvalid containing %q", err, tt.want)
			}
		})
	}
	t.Run("ok/reason of exactly 500 bytes with tab", func(t *testing.T) {
		t.Parallel()
		p := params()
		p.Reason = "a\t" + strings.Repeat("é", 249)
		if _, err := NewRequest(p, t0); err != nil {
			t.Errorf("NewRequest = %v", err)
		}
	})
	t.Run("ok/approver roles are copied", func(t *testing.T) {
		t.Parallel()
		p := params()
		r, _ := NewRequest(p, t0)
		p.ApproverRoles[0] = "changed"
		if r.ApproverRoles[0] != "approver" {
			t.Error("NewRequest aliases ApproverRoles")
		}
	})
}

// step is one action on a request at a time offset from t0.
type step struct {
	op     string // approve, deny, expire, revoke
	who    Approver
	reason string
	at     time.Duration
	// results
	wantErr     error
	wantGranted bool // approve
	wantChanged bool // expire
}

func TestStateMachine(t *testing.T) {
	t.Parallel()
	one := func(p *NewRequestParams) { p.RequiredApprovals = 1 }
	tests := []struct {
		name   string
		params func(*NewRequestParams)
		steps  []step
		want   func(r *Request) // fields expected to differ from a fresh request
	}{
		{
			name:   "ok/one approval grants",
			params: one,
			steps:  []step{{op: "approve", who: bob, at: time.Minute, wantGranted: true}},
			want: func(r *Request) {
				r.State, r.GrantedAt, r.GrantEnds = StateGranted, at(time.Minute), at(46*time.Minute)
				r.Approvals = []Approval{{"bob", at(time.Minute)}}
			},
		},
		{
			name: "ok/two distinct approvals grant",
			steps: []step{
				{op: "approve", who: bob, at: time.Minute},
				{op: "approve", who: carol, at: 2 * time.Minute, wantGranted: true},
			},
			want: func(r *Request) {
				r.State, r.GrantedAt, r.GrantEnds = StateGranted, at(2*time.Minute), at(47*time.Minute)
				r.Approvals = []Approval{{"bob", at(time.Minute)}, {"carol", at(2 * time.Minute)}}
			},
		},
		{
			name: "deny/same approver twice does not grant",
			steps: []step{
				{op: "approve", who: bob, at: time.Minute},
				{op: "approve", who: bob, at: 2 * time.Minute, wantErr: ErrAlreadyApproved},
			},
			want: func(r *Request) { r.Approvals = []Approval{{"bob", at(time.Minute)}} },
		},
		{
			name:   "deny/self approval",
			params: one,
			steps:  []step{{op: "approve", who: alice, at: time.Minute, wantErr: ErrSelfApproval}},
		},
		{
			name:   "deny/self deny",
			params: one,
			steps:  []step{{op: "deny", who: alice, at: time.Minute, wantErr: ErrSelfApproval}},
		},
		{
			name:   "deny/approver without approver role",
			params: one,
			steps:  []step{{op: "approve", who: dave, at: time.Minute, wantErr: ErrNotApprover}},
		},
		{
			name:   "deny/approver without name",
			params: one,
			steps:  []step{{op: "approve", who: Approver{Roles: []string{"approver"}}, at: time.Minute, wantErr: ErrNotApprover}},
		},
		{
			name:   "deny/non-approver cannot deny",
			params: one,
			steps:  []step{{op: "deny", who: dave, at: time.Minute, wantErr: ErrNotApprover}},
		},
		{
			name:   "deny/approval at PendingUntil",
			params: one,
			steps:  []step{{op: "approve", who: bob, at: 15 * time.Minute, wantErr: ErrPendingExpired}},
		},
		{
			name:   "ok/approval just before PendingUntil",
			params: one,
			steps:  []step{{op: "approve", who: bob, at: 15*time.Minute - time.Nanosecond, wantGranted: true}},
			want: func(r *Request) {
				ts := at(15*time.Minute - time.Nanosecond)
				r.State, r.GrantedAt, r.GrantEnds = StateGranted, ts, ts.Add(45*time.Minute)
				r.Approvals = []Approval{{"bob", ts}}
			},
		},
		{
			name:   "deny/deny after PendingUntil",
			params: one,
			steps:  []step{{op: "deny", who: bob, at: time.Hour, wantErr: ErrPendingExpired}},
		},
		{
			name:   "deny/approve after grant",
			params: one,
			steps: []step{
				{op: "approve", who: bob, at: time.Minute, wantGranted: true},
				{op: "approve", who: carol, at: 2 * time.Minute, wantErr: ErrNotPending},
			},
			want: func(r *Request) {
				r.State, r.GrantedAt, r.GrantEnds = StateGranted, at(time.Minute), at(46*time.Minute)
				r.Approvals = []Approval{{"bob", at(time.Minute)}}
			},
		},
		{
			name: "ok/deny after one of two approvals",
			steps: []step{
				{op: "approve", who: bob, at: time.Minute},
				{op: "deny", who: bob, at: 2 * time.Minute},
				{op: "approve", who: carol, at: 3 * time.Minute, wantErr: ErrNotPending},
			},
			want: func(r *Request) {
				r.State, r.EndedAt, r.EndReason = StateDenied, at(2*time.Minute), "denied by bob"
				r.Approvals = []Approval{{"bob", at(time.Minute)}}
			},
		},
		{
			name:  "deny/deny twice",
			steps: []step{{op: "deny", who: bob, at: time.Minute}, {op: "deny", who: carol, at: time.Minute, wantErr: ErrNotPending}},
			want:  func(r *Request) { r.State, r.EndedAt, r.EndReason = StateDenied, at(time.Minute), "denied by bob" },
		},
		{
			name: "ok/pending expires",
			steps: []step{
				{op: "expire", at: 15*time.Minute - time.Nanosecond},
				{op: "expire", at: time.Hour, wantChanged: true},
				{op: "expire", at: 2 * time.Hour},
				{op: "approve", who: bob, at: 2 * time.Hour, wantErr: ErrNotPending},
				{op: "revoke", reason: "too late", at: 2 * time.Hour, wantErr: ErrNotActive},
			},
			want: func(r *Request) {
				r.State, r.EndedAt, r.EndReason = StateExpired, at(15*time.Minute), EndReasonPendingExpired
			},
		},
		{
			name:   "ok/grant expires at GrantEnds",
			params: one,
			steps: []step{
				{op: "approve", who: bob, at: 0, wantGranted: true},
				{op: "expire", at: 45*time.Minute - time.Nanosecond},
				{op: "expire", at: 45 * time.Minute, wantChanged: true},
				{op: "revoke", reason: "cleanup", at: 50 * time.Minute, wantErr: ErrNotActive},
			},
			want: func(r *Request) {
				r.State, r.GrantedAt, r.GrantEnds = StateEnded, t0, at(45*time.Minute)
				r.Approvals = []Approval{{"bob", t0}}
				r.EndedAt, r.EndReason = at(45*time.Minute), EndReasonExpired
			},
		},
		{
			name:   "ok/late sweep records true end",
			params: one,
			steps: []step{
				{op: "approve", who: bob, at: 0, wantGranted: true},
				{op: "expire", at: 10 * time.Hour, wantChanged: true},
			},
			want: func(r *Request) {
				r.State, r.GrantedAt, r.GrantEnds = StateEnded, t0, at(45*time.Minute)
				r.Approvals = []Approval{{"bob", t0}}
				r.EndedAt, r.EndReason = at(45*time.Minute), EndReasonExpired
			},
		},
		{
			name:   "ok/revoke active grant",
			params: one,
			steps: []step{
				{op: "approve", who: bob, at: 0, wantGranted: true},
				{op: "revoke", reason: "device disabled", at: 10 * time.Minute},
				{op: "revoke", reason: "again", at: 11 * time.Minute, wantErr: ErrNotActive},
				{op: "expire", at: time.Hour},
			},
			want: func(r *Request) {
				r.State, r.GrantedAt, r.GrantEnds = StateEnded, t0, at(45*time.Minute)
				r.Approvals = []Approval{{"bob", t0}}
				r.EndedAt, r.EndReason = at(10*time.Minute), "device disabled"
			},
		},
		{
			name:   "deny/revoke granted past GrantEnds (expire instead)",
			params: one,
			steps: []step{
				{op: "approve", who: bob, at: 0, wantGranted: true},
				{op: "revoke", reason: "late", at: 45 * time.Minute, wantErr: ErrNotActive},
			},
			want: func(r *Request) {
				r.State, r.GrantedAt, r.GrantEnds = StateGranted, t0, at(45*time.Minute)
				r.Approvals = []Approval{{"bob", t0}}
			},
		},
		{
			name:  "ok/cancel pending",
			steps: []step{{op: "revoke", reason: "no longer needed", at: time.Minute}, {op: "approve", who: bob, at: 2 * time.Minute, wantErr: ErrNotPending}},
			want: func(r *Request) {
				r.State, r.EndedAt, r.EndReason = StateCancelled, at(time.Minute), "no longer needed"
			},
		},
		{
			name:  "deny/cancel pending past window",
			steps: []step{{op: "revoke", reason: "x", at: 15 * time.Minute, wantErr: ErrPendingExpired}},
		},
		{
			name:  "deny/revoke without reason",
			steps: []step{{op: "revoke", reason: " ", at: time.Minute, wantErr: ErrInvalid}},
		},
		{
			name:  "deny/revoke denied",
			steps: []step{{op: "deny", who: carol, at: time.Minute}, {op: "revoke", reason: "x", at: time.Minute, wantErr: ErrNotActive}},
			want:  func(r *Request) { r.State, r.EndedAt, r.EndReason = StateDenied, at(time.Minute), "denied by carol" },
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			p := params()
			if tt.params != nil {
				tt.params(&p)
			}
			r, err := NewRequest(p, t0)
			if err != nil {
				t.Fatal(err)
			}
			want := r
			want.ApproverRoles = append([]string(nil), r.ApproverRoles...)
			if tt.want != nil {
				tt.want(&want)
			}
			for i, s := range tt.steps {
				before := r
				before.Approvals = append([]Approval(nil), r.Approvals...)
				now := at(s.at)
				var err error
				switch s.op {
				case "approve":
					var granted bool
					granted, err = r.Approve(s.who, now)
					if granted != s.wantGranted {
						t.Errorf("step %d: Approve granted = %v, want %v", i, granted, s.wantGranted)
					}
				case "deny":
					err = r.Deny(s.who, now)
				case "expire":
					if changed := r.Expire(now); changed != s.wantChanged {
						t.Errorf("step %d: Expire changed = %v, want %v", i, changed, s.wantChanged)
					}
				case "revoke":
					err = r.Revoke(s.reason, now)
				default:
					t.Fatalf("unknown op %q", s.op)
				}
				if !errors.Is(err, s.wantErr) || (err == nil) != (s.wantErr == nil) {
					t.Fatalf("step %d (%s): err = %v, want %v", i, s.op, err, s.wantErr)
				}
				if err != nil {
					if diff := cmp.Diff(before, r); diff != "" {
						t.Errorf("step %d: refused %s changed the request (-before +after):\n%s", i, s.op, diff)
					}
				}
			}
			if diff := cmp.Diff(want, r); diff != "" {
				t.Errorf("final request (-want +got):\n%s", diff)
			}
		})
	}
}

func TestActive(t *testing.T) {
	t.Parallel()
	p := params()
	p.RequiredApprovals = 1
	r, err := NewRequest(p, t0)
	if err != nil {
		t.Fatal(err)
	}
	if r.Active(t0) {
		t.Error("pending request is active")
	}
	if _, err := r.Approve(bob, at(time.Minute)); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		at   time.Duration
		want bool
	}{
		{time.Minute, true},
		{46*time.Minute - time.Nanosecond, true},
		{46 * time.Minute, false},
		{time.Hour, false},
	}
	for _, tt := range tests {
		if got := r.Active(at(tt.at)); got != tt.want {
			t.Errorf("Active(t0+%s) = %v, want %v", tt.at, got, tt.want)
		}
	}
	if err := r.Revoke("done", at(2*time.Minute)); err != nil {
		t.Fatal(err)
	}
	if r.Active(at(3 * time.Minute)) {
		t.Error("revoked grant is active")
	}
}

func TestState(t *testing.T) {
	t.Parallel()
	tests := []struct {
		s            State
		valid, final bool
	}{
		{StatePending, true, false}, {StateGranted, true, false}, {StateDenied, true, true},
		{StateExpired, true, true}, {StateEnded, true, true}, {StateCancelled, true, true},
		{"", false, false}, {"bogus", false, false},
	}
	for _, tt := range tests {
		if tt.s.Valid() != tt.valid || tt.s.Final() != tt.final {
			t.Errorf("%q: Valid=%v Final=%v, want %v %v", tt.s, tt.s.Valid(), tt.s.Final(), tt.valid, tt.final)
		}
	}
}

func TestLink(t *testing.T) {
	t.Parallel()
	fresh := Link{RequestID: "req-1", Approver: "bob", ExpiresAt: at(time.Hour)}
	used := fresh
	used.UsedAt = at(time.Minute)
	tests := []struct {
		name      string
		link      Link
		req, appr string
		at        time.Duration
		want      error
	}{
		{"ok/fresh", fresh, "req-1", "bob", time.Minute, nil},
		{"ok/just before expiry", fresh, "req-1", "bob", time.Hour - time.Nanosecond, nil},
		{"deny/expired at ExpiresAt", fresh, "req-1", "bob", time.Hour, ErrLinkExpired},
		{"deny/zero expiry", Link{RequestID: "req-1", Approver: "bob"}, "req-1", "bob", 0, ErrLinkExpired},
		{"deny/used", used, "req-1", "bob", 2 * time.Minute, ErrLinkUsed},
		{"deny/used and expired says used", used, "req-1", "bob", 2 * time.Hour, ErrLinkUsed},
		{"deny/other request", fresh, "req-2", "bob", time.Minute, ErrLinkMismatch},
		{"deny/other approver", fresh, "req-1", "carol", time.Minute, ErrLinkMismatch},
		{"deny/other approver on used link", used, "req-1", "carol", time.Minute, ErrLinkMismatch},
		{"deny/empty link", Link{ExpiresAt: at(time.Hour)}, "", "", time.Minute, ErrLinkMismatch},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.link.Check(tt.req, tt.appr, at(tt.at))
			if !errors.Is(err, tt.want) || (err == nil) != (tt.want == nil) {
				t.Errorf("Check = %v, want %v", err, tt.want)
			}
		})
	}
	t.Run("ok/use is single", func(t *testing.T) {
		t.Parallel()
		l := fresh
		if err := l.Use("req-1", "bob", at(time.Minute)); err != nil {
			t.Fatal(err)
		}
		if !l.UsedAt.Equal(at(time.Minute)) {
			t.Errorf("UsedAt = %v", l.UsedAt)
		}
		if err := l.Use("req-1", "bob", at(2*time.Minute)); !errors.Is(err, ErrLinkUsed) {
			t.Errorf("second Use = %v, want ErrLinkUsed", err)
		}
		m := fresh
		if err := m.Use("req-1", "carol", at(time.Minute)); !errors.Is(err, ErrLinkMismatch) || !m.UsedAt.IsZero() {
			t.Errorf("mismatched Use = %v, UsedAt %v", err, m.UsedAt)
		}
	})
}
