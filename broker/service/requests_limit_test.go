package service

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/synctest"
	"time"

	"github.com/pinhole-dev/pinhole/internal/access"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/policy"
	"github.com/pinhole-dev/pinhole/internal/posture"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// requestFixture is a service whose rules let dba holders (alice, dave)
// request db-prod for up to an hour with one approval by an approver (bob,
// carol, each with a security key). Each dba has one active device with a
// fresh posture report; the clock stands still unless a test moves it.
type requestFixture struct {
	s       *Service
	users   map[string]store.User
	devices map[string]store.Device // by user

	mu  sync.Mutex
	now time.Time // guarded by mu
}

// pendingFor is how long a fixture request waits for approval.
const pendingFor = 10 * time.Minute

func newRequestFixture(t *testing.T) *requestFixture {
	t.Helper()
	s, st := newTestService(t)
	f := &requestFixture{s: s, users: map[string]store.User{}, devices: map[string]store.Device{},
		now: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	s.now = f.clock

	pc := &policy.Config{
		Targets: []policy.Target{{Name: "db-prod", Address: "10.0.0.5:5432", Protocol: policy.ProtocolTCP}},
		Roles:   []policy.Role{{Name: "dba"}, {Name: "approver"}},
		Rules: []policy.Rule{{Name: "dba-db", Roles: []string{"dba"}, Targets: []string{"db-prod"}, MaxTTL: time.Hour,
			ApproverRoles: []string{"approver"}, PendingFor: pendingFor, Posture: policy.PostureRequirement{MaxAge: time.Hour}}},
	}
	if err := pc.Normalize(); err != nil {
		t.Fatal(err)
	}
	s.cfg.Policy.Store(pc)

	ctx := t.Context()
	now := f.clock()
	err := st.Update(ctx, func(tx store.Tx) error {
		for _, u := range []store.User{{Name: "alice", Role: "dba"}, {Name: "dave", Role: "dba"}, {Name: "bob", Role: "approver"}, {Name: "carol", Role: "approver"}} {
			u.WebAuthnID = make([]byte, 32)
			if _, err := rand.Read(u.WebAuthnID); err != nil {
				return err
			}
			u.CreatedAt = now
			if err := tx.CreateUser(ctx, u); err != nil {
				return err
			}
			f.users[u.Name] = u
			if u.Role == "approver" {
				if err := tx.AddCredential(ctx, store.Credential{ID: []byte("cred-" + u.Name), User: u.Name, Data: []byte("{}"), CreatedAt: now}); err != nil {
					return err
				}
				continue
			}
			pub, _, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				return err
			}
			d := store.Device{ID: "d-" + u.Name, User: u.Name, Hostname: "ws-" + u.Name, PublicKey: pub, State: store.DeviceActive, CreatedAt: now, ConfirmedAt: now}
			if err := tx.CreateDevice(ctx, d); err != nil {
				return err
			}
			f.devices[u.Name] = d
			rep, err := json.Marshal(posture.Report{Device: d.ID, Hostname: d.Hostname, OS: "Debian GNU/Linux 12", Kernel: "6.1.0",
				DiskEncrypted: true, FirewallActive: true, ScreenLock: posture.ScreenLockOn, AgentVersion: "test", CollectedAt: now})
			if err != nil {
				return err
			}
			if err := tx.PutPosture(ctx, store.Posture{Device: d.ID, CollectedAt: now, ReceivedAt: now, Report: rep, Signature: []byte("sig")}); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatalf("seeding the store: %v", err)
	}
	return f
}

func (f *requestFixture) clock() time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.now
}

func (f *requestFixture) advance(d time.Duration) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.now = f.now.Add(d)
}

// request creates a request for db-prod as user from their device.
func (f *requestFixture) request(ctx context.Context, user string) (wire.Request, error) {
	return f.s.CreateRequest(ctx, f.devices[user], f.users[user], wire.CreateRequest{Target: "db-prod", TTL: "30m", Reason: "INC-1 check"})
}

// fill creates n requests as user and returns their IDs.
func (f *requestFixture) fill(t *testing.T, user string, n int) []string {
	t.Helper()
	var ids []string
	for i := range n {
		r, err := f.request(t.Context(), user)
		if err != nil {
			t.Fatalf("request %d of %s: %v", i+1, user, err)
		}
		ids = append(ids, r.ID)
	}
	return ids
}

// grant approves request id as bob, straight through the domain and store
// (the WebAuthn ceremony is not what these tests are about).
func (f *requestFixture) grant(t *testing.T, id string) {
	t.Helper()
	ctx := t.Context()
	err := f.s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		r, err := tx.Request(ctx, id)
		if err != nil {
			return err
		}
		granted, err := r.Approve(access.Approver{Name: "bob", Roles: []string{"approver"}}, f.clock())
		if err != nil {
			return err
		}
		if !granted {
			return fmt.Errorf("request %s not granted by one approval", id)
		}
		return tx.UpdateRequest(ctx, r)
	})
	if err != nil {
		t.Fatalf("granting %s: %v", id, err)
	}
}

// TestCreateRequestCapsPendingPerUser: a user may have at most
// maxPendingPerUser requests waiting for approval; only their own pending,
// unexpired requests count.
func TestCreateRequestCapsPendingPerUser(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		setup   func(t *testing.T, f *requestFixture)
		wantErr bool
	}{
		{name: "ok/below the cap", setup: func(t *testing.T, f *requestFixture) { f.fill(t, "alice", maxPendingPerUser-1) }},
		{name: "deny/at the cap", setup: func(t *testing.T, f *requestFixture) { f.fill(t, "alice", maxPendingPerUser) }, wantErr: true},
		{name: "ok/one cancelled", setup: func(t *testing.T, f *requestFixture) {
			ids := f.fill(t, "alice", maxPendingPerUser)
			if _, err := f.s.Revoke(t.Context(), f.users["alice"], ids[0], "not needed"); err != nil {
				t.Fatal(err)
			}
		}},
		{name: "ok/one granted", setup: func(t *testing.T, f *requestFixture) {
			ids := f.fill(t, "alice", maxPendingPerUser)
			f.grant(t, ids[0])
		}},
		{name: "ok/waits over but not yet expired by the loop", setup: func(t *testing.T, f *requestFixture) {
			f.fill(t, "alice", maxPendingPerUser)
			f.advance(pendingFor)
		}},
		{name: "ok/another user at the cap", setup: func(t *testing.T, f *requestFixture) { f.fill(t, "dave", maxPendingPerUser) }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newRequestFixture(t)
			tt.setup(t, f)
			_, err := f.request(t.Context(), "alice")
			if !tt.wantErr {
				if err != nil {
					t.Fatalf("request refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatal("request accepted past the cap")
			}
			if got := KindOf(err); got != KindConflict {
				t.Errorf("kind = %v, want KindConflict (%v)", got, err)
			}
			want := fmt.Sprintf("alice already has %d requests waiting for approval", maxPendingPerUser)
			if !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "pinhole revoke") {
				t.Errorf("error %q: want it to say %q and how to cancel one", err, want)
			}
		})
	}
}

// TestCreateRequestCapHoldsUnderRace: requests created at once by one user
// cannot overshoot the cap, since it is checked in the creating transaction.
func TestCreateRequestCapHoldsUnderRace(t *testing.T) {
	t.Parallel()
	f := newRequestFixture(t)
	const tries = 3 * maxPendingPerUser
	errs := make([]error, tries)
	var wg sync.WaitGroup
	for i := range tries {
		wg.Go(func() { _, errs[i] = f.request(t.Context(), "alice") })
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		switch {
		case err == nil:
			ok++
		case KindOf(err) != KindConflict:
			t.Errorf("unexpected error: %v", err)
		}
	}
	if ok != maxPendingPerUser {
		t.Errorf("%d of %d racing requests were accepted, want %d", ok, tries, maxPendingPerUser)
	}
}

// notifierFunc adapts a function to Notifier.
type notifierFunc func(ctx context.Context, n ApprovalNotice) error

func (f notifierFunc) NotifyApprover(ctx context.Context, n ApprovalNotice) error { return f(ctx, n) }

// stagedNotifier is a SplitNotifier whose quick part records the approver
// and whose slow part, like a webhook that never answers, blocks until
// release is closed.
type stagedNotifier struct {
	mu    sync.Mutex
	quick []string // guarded by mu

	entered  chan string // an approver's slow delivery started
	release  chan struct{}
	slowDone atomic.Int32 // slow deliveries the receiver answered
	gaveUp   atomic.Int32 // slow deliveries that timed out unanswered
}

func newStagedNotifier() *stagedNotifier {
	return &stagedNotifier{entered: make(chan string, 16), release: make(chan struct{})}
}

func (n *stagedNotifier) NotifyApprover(context.Context, ApprovalNotice) error {
	return errors.New("stagedNotifier called whole, not split")
}

func (n *stagedNotifier) Split() (quick, slow Notifier) {
	quick = notifierFunc(func(_ context.Context, a ApprovalNotice) error {
		n.mu.Lock()
		defer n.mu.Unlock()
		n.quick = append(n.quick, a.Approver)
		return nil
	})
	slow = notifierFunc(func(ctx context.Context, a ApprovalNotice) error {
		n.entered <- a.Approver
		select {
		case <-n.release:
			n.slowDone.Add(1)
			return nil
		case <-ctx.Done():
			n.gaveUp.Add(1)
			return ctx.Err()
		}
	})
	return quick, slow
}

func (n *stagedNotifier) quickApprovers() []string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Sorted(slices.Values(n.quick))
}

// TestSlowNotifierDoesNotHoldUpRequest: the quick part of the delivery
// (the outbox) is done when CreateRequest returns; the slow part (a webhook
// that never answers) runs in the background, one goroutine per link, and
// shutdown waits for it.
func TestSlowNotifierDoesNotHoldUpRequest(t *testing.T) {
	t.Parallel()
	f := newRequestFixture(t)
	n := newStagedNotifier()
	f.s.cfg.Notifier = n
	t.Cleanup(func() {
		select {
		case <-n.release:
		default:
			close(n.release)
		}
		f.s.bg.closeAndWait()
	})

	// Would block until the slow part's release if delivery were inline.
	if _, err := f.request(t.Context(), "alice"); err != nil {
		t.Fatal(err)
	}
	if got := n.gaveUp.Load(); got != 0 {
		t.Fatalf("the request returned only after %d slow deliveries timed out: delivery held up the API call", got)
	}
	if got, want := n.quickApprovers(), []string{"bob", "carol"}; !slices.Equal(got, want) {
		t.Errorf("quick part told %v before the request returned, want %v", got, want)
	}
	// Both links are on their way at once, neither is through.
	var entered []string
	for range 2 {
		entered = append(entered, <-n.entered)
	}
	slices.Sort(entered)
	if !slices.Equal(entered, []string{"bob", "carol"}) {
		t.Errorf("slow deliveries started for %v, want bob and carol", entered)
	}
	if got := n.slowDone.Load(); got != 0 {
		t.Fatalf("%d slow deliveries finished before the receiver answered", got)
	}

	// Shutdown waits for the running deliveries.
	joined := make(chan int32)
	go func() {
		f.s.bg.closeAndWait()
		joined <- n.slowDone.Load()
	}()
	close(n.release)
	if got := <-joined; got != 2 {
		t.Errorf("shutdown returned with %d of 2 deliveries finished", got)
	}

	// After shutdown a delivery runs in its caller: nothing is left unjoined.
	if _, err := f.request(t.Context(), "alice"); err != nil {
		t.Fatal(err)
	}
	if got := n.slowDone.Load(); got != 4 {
		t.Errorf("after shutdown, %d of 4 deliveries had finished when the request returned", got)
	}
}

// TestDeliveriesJoin: closeAndWait returns only once every delivery started
// before it has finished, and a delivery started after it runs inline.
func TestDeliveriesJoin(t *testing.T) {
	t.Parallel()
	synctest.Test(t, func(t *testing.T) {
		var d background
		release := make(chan struct{})
		var done atomic.Int32
		for range 3 {
			d.start(func() {
				<-release
				done.Add(1)
			})
		}
		joined := make(chan struct{})
		go func() {
			d.closeAndWait()
			close(joined)
		}()
		synctest.Wait()
		select {
		case <-joined:
			t.Fatal("closeAndWait returned while deliveries were running")
		default:
		}
		close(release)
		synctest.Wait()
		select {
		case <-joined:
		default:
			t.Fatal("closeAndWait did not return once the deliveries finished")
		}
		if got := done.Load(); got != 3 {
			t.Errorf("%d of 3 deliveries finished", got)
		}
		ran := false
		d.start(func() { ran = true })
		if !ran {
			t.Error("a delivery started after closeAndWait did not run inline")
		}
	})
}

// TestRefusedRequestsAreAudited: a request the rules or the pending cap
// refuse leaves a request.refused event behind (the refusal once rolled its
// own audit event back) and nothing else.
func TestRefusedRequestsAreAudited(t *testing.T) {
	f := newRequestFixture(t)
	ctx := t.Context()
	f.fill(t, "alice", maxPendingPerUser)
	if _, err := f.request(ctx, "alice"); err == nil {
		t.Fatal("request over the cap accepted")
	}
	d := f.devices["dave"]
	if _, err := f.s.CreateRequest(ctx, d, f.users["dave"], wire.CreateRequest{Target: "db-prod", TTL: "2h", Reason: "too long"}); err == nil {
		t.Fatal("request over max_ttl accepted")
	}
	var evs []audit.Event
	if err := f.s.cfg.Store.View(ctx, func(tx store.Tx) error {
		var err error
		evs, err = tx.AuditEvents(ctx, 0, 1000)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	var reasons []string
	for _, e := range evs {
		if e.Type == audit.TypeRequestRefused {
			reasons = append(reasons, e.Actor+": "+e.Details["reason"])
		}
	}
	if len(reasons) != 2 || !strings.Contains(reasons[0], "alice: alice already has 5 requests") || !strings.Contains(reasons[1], "dave: request refused: requested 2h exceeds max") {
		t.Errorf("request.refused events: %q", reasons)
	}
}
