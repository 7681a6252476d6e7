// Package storetest is a conformance suite for store.Store backends. A
// backend's test calls Run with a function that opens a fresh, empty store;
// every method of store.Tx is exercised, including the single-use,
// uniqueness, rollback and not-found contracts the broker's service relies on.
//
//	func TestConformance(t *testing.T) {
//		storetest.Run(t, func(t *testing.T) store.Store {
//			s, err := mybackend.Open(t.Context(), filepath.Join(t.TempDir(), "db"))
//			if err != nil {
//				t.Fatal(err)
//			}
//			t.Cleanup(func() { s.Close() })
//			return s
//		})
//	}
package storetest

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	"github.com/pinhole-dev/pinhole/internal/access"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// T0 is the base time of every record the suite writes. It carries
// nanoseconds so that a backend that truncates time fails.
var T0 = time.Date(2031, time.March, 4, 5, 6, 7, 891011121, time.UTC)

// Run runs the conformance suite. open is called once per subtest, possibly
// from parallel subtests, and must return a new empty store; open is
// responsible for closing it (t.Cleanup).
func Run(t *testing.T, open func(t *testing.T) store.Store) {
	tests := []struct {
		name string
		fn   func(t *testing.T, s store.Store)
	}{
		{"users", testUsers},
		{"credentials", testCredentials},
		{"tokens", testTokens},
		{"ceremonies", testCeremonies},
		{"devices", testDevices},
		{"nonces", testNonces},
		{"posture", testPosture},
		{"requests", testRequests},
		{"activations", testActivations},
		{"device_events", testDeviceEvents},
		{"audit", testAudit},
		{"audit_concurrent", testAuditConcurrent},
		{"audit_checkpoints", testAuditCheckpoints},
		{"recordings", testRecordings},
		{"update_rollback", testUpdateRollback},
		{"view_never_commits", testViewNeverCommits},
		{"not_found", testNotFound},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, open(t))
		})
	}
}

// update runs fn in a read-write transaction and fails the test on error.
func update(t *testing.T, s store.Store, fn func(ctx context.Context, tx store.Tx) error) {
	t.Helper()
	ctx := t.Context()
	if err := s.Update(ctx, func(tx store.Tx) error { return fn(ctx, tx) }); err != nil {
		t.Fatalf("Update: %v", err)
	}
}

// view runs fn in a read transaction and fails the test on error.
func view(t *testing.T, s store.Store, fn func(ctx context.Context, tx store.Tx) error) {
	t.Helper()
	ctx := t.Context()
	if err := s.View(ctx, func(tx store.Tx) error { return fn(ctx, tx) }); err != nil {
		t.Fatalf("View: %v", err)
	}
}

// updateErr runs fn in a read-write transaction and returns its error.
func updateErr(t *testing.T, s store.Store, fn func(ctx context.Context, tx store.Tx) error) error {
	t.Helper()
	ctx := t.Context()
	return s.Update(ctx, func(tx store.Tx) error { return fn(ctx, tx) })
}

// viewErr runs fn in a read transaction and returns its error.
func viewErr(t *testing.T, s store.Store, fn func(ctx context.Context, tx store.Tx) error) error {
	t.Helper()
	ctx := t.Context()
	return s.View(ctx, func(tx store.Tx) error { return fn(ctx, tx) })
}

func wantIs(t *testing.T, what string, err, target error) {
	t.Helper()
	if !errors.Is(err, target) {
		t.Errorf("%s: got error %v, want one wrapping %v", what, err, target)
	}
}

func diff(t *testing.T, what string, got, want any) {
	t.Helper()
	if d := cmp.Diff(want, got, cmpopts.EquateComparable(netip.Addr{}, netip.AddrPort{})); d != "" {
		t.Errorf("%s mismatch (-want +got):\n%s", what, d)
	}
}

func user(name, role string) store.User {
	return store.User{Name: name, Role: role, WebAuthnID: bytes.Repeat([]byte(name[:1]), 32), CreatedAt: T0}
}

func testUsers(t *testing.T, s store.Store) {
	ada := user("ada", "admin")
	bob := user("bob", "dba")
	cy := user("cy", "dba")
	cy.Disabled = true
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, u := range []store.User{cy, ada, bob} {
			if err := tx.CreateUser(ctx, u); err != nil {
				return err
			}
		}
		return nil
	})

	dupName := ada
	dupName.WebAuthnID = bytes.Repeat([]byte{9}, 32)
	wantIs(t, "CreateUser(same name)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.CreateUser(ctx, dupName)
	}), store.ErrConflict)
	dupHandle := user("dora", "dba")
	dupHandle.WebAuthnID = ada.WebAuthnID
	wantIs(t, "CreateUser(same handle)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.CreateUser(ctx, dupHandle)
	}), store.ErrConflict)

	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.User(ctx, "cy")
		if err != nil {
			return err
		}
		diff(t, "User(cy)", got, cy)
		got, err = tx.UserByHandle(ctx, ada.WebAuthnID)
		if err != nil {
			return err
		}
		diff(t, "UserByHandle(ada)", got, ada)
		dbas, err := tx.UsersWithRole(ctx, "dba")
		if err != nil {
			return err
		}
		slices.SortFunc(dbas, func(a, b store.User) int { return strings.Compare(a.Name, b.Name) })
		diff(t, "UsersWithRole(dba)", dbas, []store.User{bob, cy})
		none, err := tx.UsersWithRole(ctx, "auditor")
		if err != nil {
			return err
		}
		if len(none) != 0 {
			t.Errorf("UsersWithRole(auditor) = %v, want none", none)
		}
		_, err = tx.User(ctx, "dora")
		wantIs(t, "User(dora) after refused create", err, store.ErrNotFound)
		return nil
	})
}

func testCredentials(t *testing.T, s store.Store) {
	c1 := store.Credential{ID: []byte("cred-1"), User: "ada", Data: []byte(`{"n":1}`), CreatedAt: T0}
	c2 := store.Credential{ID: []byte("cred-2"), User: "ada", Data: []byte(`{"n":2}`), CreatedAt: T0.Add(time.Second)}
	c3 := store.Credential{ID: []byte("cred-3"), User: "bob", Data: []byte(`{"n":3}`), CreatedAt: T0}
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, u := range []store.User{user("ada", "admin"), user("bob", "dba"), user("cy", "dba")} {
			if err := tx.CreateUser(ctx, u); err != nil {
				return err
			}
		}
		for _, c := range []store.Credential{c2, c1, c3} {
			if err := tx.AddCredential(ctx, c); err != nil {
				return err
			}
		}
		return nil
	})
	wantIs(t, "AddCredential(same ID)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.AddCredential(ctx, store.Credential{ID: c1.ID, User: "ada", Data: []byte("{}"), CreatedAt: T0})
	}), store.ErrConflict)

	c1.Data = []byte(`{"n":1,"sign_count":7}`)
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.UpdateCredential(ctx, c1) })
	wantIs(t, "UpdateCredential(unknown)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.UpdateCredential(ctx, store.Credential{ID: []byte("nope"), User: "ada", Data: []byte("{}")})
	}), store.ErrNotFound)

	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.Credentials(ctx, "ada")
		if err != nil {
			return err
		}
		slices.SortFunc(got, func(a, b store.Credential) int { return bytes.Compare(a.ID, b.ID) })
		diff(t, "Credentials(ada)", got, []store.Credential{c1, c2})
		got, err = tx.Credentials(ctx, "bob")
		if err != nil {
			return err
		}
		diff(t, "Credentials(bob)", got, []store.Credential{c3})
		got, err = tx.Credentials(ctx, "cy")
		if err != nil {
			return err
		}
		if len(got) != 0 {
			t.Errorf("Credentials(cy) = %v, want none", got)
		}
		return nil
	})
}

func testTokens(t *testing.T, s store.Store) {
	tok := store.Token{
		Hash: strings.Repeat("ab", 32), Kind: store.TokenGrant, User: "bob", Device: "dev-1", Request: "req-1", Role: "dba",
		CreatedAt: T0, ExpiresAt: T0.Add(time.Hour),
	}
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutToken(ctx, tok) })
	wantIs(t, "PutToken(same hash)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.PutToken(ctx, store.Token{Hash: tok.Hash, Kind: store.TokenInvite, CreatedAt: T0, ExpiresAt: T0})
	}), store.ErrConflict)

	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.Token(ctx, tok.Hash)
		if err != nil {
			return err
		}
		diff(t, "Token before use", got, tok)
		return nil
	})

	usedAt := T0.Add(time.Minute)
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.UseToken(ctx, tok.Hash, usedAt) })
	wantIs(t, "second UseToken", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.UseToken(ctx, tok.Hash, usedAt.Add(time.Second))
	}), store.ErrConflict)
	if err := updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.UseToken(ctx, strings.Repeat("cd", 32), usedAt)
	}); !errors.Is(err, store.ErrNotFound) && !errors.Is(err, store.ErrConflict) {
		t.Errorf("UseToken(unknown): got %v, want ErrNotFound or ErrConflict", err)
	}

	want := tok
	want.UsedAt = usedAt
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.Token(ctx, tok.Hash)
		if err != nil {
			return err
		}
		diff(t, "Token after use", got, want)
		return nil
	})
}

func testCeremonies(t *testing.T, s store.Store) {
	c := store.Ceremony{ID: "approve:" + strings.Repeat("ef", 32), Data: []byte(`{"challenge":"x"}`), ViewHash: "vh1", ExpiresAt: T0.Add(5 * time.Minute)}
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutCeremony(ctx, c) })
	// A second begin of the same ceremony replaces the first (the page's
	// button may be pressed twice).
	c.Data, c.ViewHash = []byte(`{"challenge":"y"}`), "vh2"
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutCeremony(ctx, c) })
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.TakeCeremony(ctx, c.ID)
		if err != nil {
			return err
		}
		diff(t, "TakeCeremony", got, c)
		return nil
	})
	wantIs(t, "second TakeCeremony", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		_, err := tx.TakeCeremony(ctx, c.ID)
		return err
	}), store.ErrNotFound)
}

func testDevices(t *testing.T, s store.Store) {
	d1 := store.Device{ID: "dev-1", User: "ada", Hostname: "ws1", PublicKey: bytes.Repeat([]byte{1}, 32), State: store.DevicePending, CreatedAt: T0}
	d2 := store.Device{ID: "dev-2", User: "bob", Hostname: "ws2", PublicKey: bytes.Repeat([]byte{2}, 32), State: store.DeviceActive, CreatedAt: T0, ConfirmedAt: T0.Add(time.Minute)}
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		if err := tx.CreateDevice(ctx, d1); err != nil {
			return err
		}
		return tx.CreateDevice(ctx, d2)
	})

	tests := []struct {
		name string
		d    store.Device
	}{
		{"same_key", store.Device{ID: "dev-3", User: "cy", Hostname: "ws3", PublicKey: d1.PublicKey, State: store.DevicePending, CreatedAt: T0}},
		{"same_id", store.Device{ID: d1.ID, User: "cy", Hostname: "ws3", PublicKey: bytes.Repeat([]byte{3}, 32), State: store.DevicePending, CreatedAt: T0}},
	}
	for _, tc := range tests {
		wantIs(t, "CreateDevice/"+tc.name, updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
			return tx.CreateDevice(ctx, tc.d)
		}), store.ErrConflict)
	}

	d1.State, d1.ConfirmedAt, d1.Hostname = store.DeviceActive, T0.Add(2*time.Minute), "ws1.example"
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.UpdateDevice(ctx, d1) })
	wantIs(t, "UpdateDevice(unknown)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.UpdateDevice(ctx, store.Device{ID: "dev-9", User: "x", Hostname: "x", State: store.DeviceDisabled})
	}), store.ErrNotFound)

	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.Device(ctx, d1.ID)
		if err != nil {
			return err
		}
		diff(t, "Device(dev-1)", got, d1)
		got, err = tx.DeviceByKey(ctx, d2.PublicKey)
		if err != nil {
			return err
		}
		diff(t, "DeviceByKey(dev-2)", got, d2)
		_, err = tx.Device(ctx, "dev-3")
		wantIs(t, "Device(dev-3) after refused create", err, store.ErrNotFound)
		return nil
	})
}

func testNonces(t *testing.T, s store.Store) {
	exp := T0.Add(time.Minute)
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, n := range []struct{ dev, nonce string }{{"dev-1", "n1"}, {"dev-1", "n2"}, {"dev-1", "n3"}, {"dev-2", "n4"}} {
			if err := tx.PutNonce(ctx, n.dev, n.nonce, exp); err != nil {
				return err
			}
		}
		return nil
	})
	tests := []struct {
		name       string
		dev, nonce string
		now        time.Time
		want       error
	}{
		{"ok/unexpired", "dev-1", "n1", T0, nil},
		{"deny/second_use", "dev-1", "n1", T0, store.ErrNotFound},
		{"deny/other_device", "dev-2", "n2", T0, store.ErrNotFound},
		{"ok/just_before_expiry", "dev-1", "n2", exp.Add(-time.Nanosecond), nil},
		{"deny/at_expiry", "dev-1", "n3", exp, store.ErrNotFound},
		{"deny/after_expiry", "dev-2", "n4", exp.Add(time.Hour), store.ErrNotFound},
		{"deny/unknown", "dev-1", "n9", T0, store.ErrNotFound},
	}
	for _, tc := range tests {
		err := updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
			return tx.TakeNonce(ctx, tc.dev, tc.nonce, tc.now)
		})
		if tc.want == nil {
			if err != nil {
				t.Errorf("%s: TakeNonce: %v", tc.name, err)
			}
			continue
		}
		wantIs(t, tc.name+": TakeNonce", err, tc.want)
	}

	// A device that keeps asking keeps only the newest MaxNoncesPerDevice.
	extra := 2
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		for i := range store.MaxNoncesPerDevice + extra {
			if err := tx.PutNonce(ctx, "dev-3", fmt.Sprintf("b%d", i), exp.Add(time.Duration(i)*time.Second)); err != nil {
				return err
			}
		}
		return nil
	})
	for i := range store.MaxNoncesPerDevice + extra {
		err := updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
			return tx.TakeNonce(ctx, "dev-3", fmt.Sprintf("b%d", i), T0)
		})
		if i < extra {
			wantIs(t, fmt.Sprintf("bounded: TakeNonce(b%d), dropped", i), err, store.ErrNotFound)
		} else if err != nil {
			t.Errorf("bounded: TakeNonce(b%d), kept: %v", i, err)
		}
	}
}

func testPosture(t *testing.T, s store.Store) {
	p := store.Posture{Device: "dev-1", CollectedAt: T0, ReceivedAt: T0.Add(time.Second), Report: []byte(`{"os":"linux"}`), Signature: []byte{1, 2, 3}}
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutPosture(ctx, p) })
	newer := store.Posture{Device: "dev-1", CollectedAt: T0.Add(time.Hour), ReceivedAt: T0.Add(time.Hour + time.Second), Report: []byte(`{"os":"linux","v":2}`), Signature: []byte{4, 5, 6}}
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutPosture(ctx, newer) })
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.Posture(ctx, "dev-1")
		if err != nil {
			return err
		}
		diff(t, "Posture after replace", got, newer)
		_, err = tx.Posture(ctx, "dev-2")
		wantIs(t, "Posture(dev-2)", err, store.ErrNotFound)
		return nil
	})
}

func request(id, device string, state access.State) access.Request {
	r := access.Request{
		ID: id, Requester: "alice", Device: device, Target: "db-prod", Reason: "INC-4821 vacuum",
		TTL: 45 * time.Minute, CreatedAt: T0, PendingUntil: T0.Add(time.Hour),
		RequiredApprovals: 2, ApproverRoles: []string{"dba-lead", "admin"}, State: state,
	}
	if state != access.StatePending {
		r.Approvals = []access.Approval{{Approver: "bob", At: T0.Add(time.Minute)}, {Approver: "cy", At: T0.Add(2 * time.Minute)}}
		r.GrantedAt = T0.Add(2 * time.Minute)
		r.GrantEnds = r.GrantedAt.Add(r.TTL)
	}
	if state.Final() {
		r.EndedAt, r.EndReason = T0.Add(3*time.Minute), "revoked by ada: done"
	}
	return r
}

func testRequests(t *testing.T, s store.Store) {
	all := []access.Request{
		request("r1", "dev-1", access.StatePending),
		request("r2", "dev-1", access.StateGranted),
		request("r3", "dev-1", access.StateDenied),
		request("r4", "dev-1", access.StateExpired),
		request("r5", "dev-1", access.StateEnded),
		request("r6", "dev-1", access.StateCancelled),
		request("r7", "dev-2", access.StatePending),
		request("r8", "dev-2", access.StateEnded),
	}
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, r := range all {
			if err := tx.CreateRequest(ctx, r); err != nil {
				return err
			}
		}
		return nil
	})
	wantIs(t, "CreateRequest(same ID)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.CreateRequest(ctx, request("r1", "dev-2", access.StatePending))
	}), store.ErrConflict)

	byID := func(rs []access.Request) []access.Request {
		slices.SortFunc(rs, func(a, b access.Request) int { return strings.Compare(a.ID, b.ID) })
		return rs
	}
	pick := func(ids ...string) []access.Request {
		var out []access.Request
		for _, r := range all {
			if slices.Contains(ids, r.ID) {
				out = append(out, r)
			}
		}
		return out
	}
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, want := range all {
			got, err := tx.Request(ctx, want.ID)
			if err != nil {
				return err
			}
			diff(t, "Request("+want.ID+")", got, want)
		}
		open, err := tx.OpenRequests(ctx)
		if err != nil {
			return err
		}
		diff(t, "OpenRequests", byID(open), pick("r1", "r2", "r7"))
		mine, err := tx.RequestsOfDevice(ctx, "dev-1")
		if err != nil {
			return err
		}
		diff(t, "RequestsOfDevice(dev-1)", byID(mine), pick("r1", "r2"))
		none, err := tx.RequestsOfDevice(ctx, "dev-3")
		if err != nil {
			return err
		}
		if len(none) != 0 {
			t.Errorf("RequestsOfDevice(dev-3) = %v, want none", none)
		}
		return nil
	})

	// Granting r1 and ending r2 moves them across the open filter.
	r1 := request("r1", "dev-1", access.StateGranted)
	r2 := request("r2", "dev-1", access.StateEnded)
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		if err := tx.UpdateRequest(ctx, r1); err != nil {
			return err
		}
		return tx.UpdateRequest(ctx, r2)
	})
	wantIs(t, "UpdateRequest(unknown)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.UpdateRequest(ctx, request("r9", "dev-1", access.StateEnded))
	}), store.ErrNotFound)
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.Request(ctx, "r1")
		if err != nil {
			return err
		}
		diff(t, "Request(r1) after update", got, r1)
		mine, err := tx.RequestsOfDevice(ctx, "dev-1")
		if err != nil {
			return err
		}
		diff(t, "RequestsOfDevice(dev-1) after update", byID(mine), []access.Request{r1})
		open, err := tx.OpenRequests(ctx)
		if err != nil {
			return err
		}
		diff(t, "OpenRequests after update", byID(open), []access.Request{r1, all[6]})
		_, err = tx.Request(ctx, "r9")
		wantIs(t, "Request(r9)", err, store.ErrNotFound)
		return nil
	})
}

func activation(req string, addr string) store.Activation {
	return store.Activation{
		Request: req, Device: "dev-1", TunnelAddr: netip.MustParseAddr(addr),
		WGPublicKey: "xTIBA5rboUvnH4htodjb6e697QjLERt1NAB4mZqp8Dg=",
		Destination: netip.MustParseAddrPort("10.0.0.5:5432"),
		CertSerial:  1<<63 + 12345, // does not fit an int64
		CreatedAt:   T0,
	}
}

func testActivations(t *testing.T, s store.Store) {
	a1 := activation("r1", "100.96.0.2")
	a2 := activation("r2", "100.96.0.3")
	a3 := activation("r3", "fd7a:115c:a1e0::4")
	a3.Destination = netip.MustParseAddrPort("[fd00::5]:22")
	a3.CertSerial = 7
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, a := range []store.Activation{a1, a2, a3} {
			if err := tx.PutActivation(ctx, a); err != nil {
				return err
			}
		}
		return nil
	})
	wantIs(t, "PutActivation(live address reused)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.PutActivation(ctx, activation("r4", "100.96.0.2"))
	}), store.ErrConflict)
	// Re-activating a request (a restarted agent) replaces its activation,
	// but not with an address another live activation holds.
	wantIs(t, "PutActivation(r1 again, r2's address)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.PutActivation(ctx, activation("r1", "100.96.0.3"))
	}), store.ErrConflict)
	a1 = activation("r1", "100.96.0.9")
	a1.WGPublicKey, a1.CertSerial, a1.CreatedAt = "bmV3IGtleQ==", 8, T0.Add(time.Minute)
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutActivation(ctx, a1) })
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		// r1's old address is free again.
		return tx.PutActivation(ctx, activation("r5", "100.96.0.2"))
	})

	sortAddrs := func(as []netip.Addr) []netip.Addr {
		slices.SortFunc(as, netip.Addr.Compare)
		return as
	}
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, want := range []store.Activation{a1, a3} {
			got, err := tx.Activation(ctx, want.Request)
			if err != nil {
				return err
			}
			diff(t, "Activation("+want.Request+")", got, want)
		}
		live, err := tx.LiveTunnelAddrs(ctx)
		if err != nil {
			return err
		}
		diff(t, "LiveTunnelAddrs", sortAddrs(live), sortAddrs([]netip.Addr{a1.TunnelAddr, a2.TunnelAddr, a3.TunnelAddr, netip.MustParseAddr("100.96.0.2")}))
		return nil
	})

	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.EndActivation(ctx, "r1") })
	// Once ended, the address may be handed out again.
	a4 := activation("r4", a1.TunnelAddr.String())
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutActivation(ctx, a4) })
	wantIs(t, "PutActivation(address reused while r4 live)", updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.PutActivation(ctx, activation("r6", a1.TunnelAddr.String()))
	}), store.ErrConflict)
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		if err := tx.EndActivation(ctx, "r2"); err != nil {
			return err
		}
		return tx.EndActivation(ctx, "r5")
	})

	a1.Ended = true
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.Activation(ctx, "r1")
		if err != nil {
			return err
		}
		diff(t, "Activation(r1) after end", got, a1)
		live, err := tx.LiveTunnelAddrs(ctx)
		if err != nil {
			return err
		}
		diff(t, "LiveTunnelAddrs after end", sortAddrs(live), sortAddrs([]netip.Addr{a4.TunnelAddr, a3.TunnelAddr}))
		return nil
	})
}

func testDeviceEvents(t *testing.T, s store.Store) {
	var dev1 []wire.Event
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		var last int64
		for i := range 6 {
			dev := "dev-1"
			if i%3 == 2 {
				dev = "dev-2"
			}
			in := wire.Event{Seq: 999, Type: wire.EventGrantIssued, Request: fmt.Sprintf("r%d", i), Reason: "why", Time: T0.Add(time.Duration(i) * time.Second)}
			got, err := tx.AppendDeviceEvent(ctx, dev, in)
			if err != nil {
				return err
			}
			if got.Seq <= last {
				t.Errorf("event %d: Seq %d not above previous %d", i, got.Seq, last)
			}
			last = got.Seq
			want := in
			want.Seq = got.Seq
			diff(t, "AppendDeviceEvent result", got, want)
			if dev == "dev-1" {
				dev1 = append(dev1, got)
			}
		}
		return nil
	})
	// A later transaction keeps counting up.
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.AppendDeviceEvent(ctx, "dev-1", wire.Event{Type: wire.EventGrantEnded, Request: "r0", Time: T0})
		if err != nil {
			return err
		}
		if got.Seq <= dev1[len(dev1)-1].Seq {
			t.Errorf("Seq %d in a later transaction not above %d", got.Seq, dev1[len(dev1)-1].Seq)
		}
		dev1 = append(dev1, got)
		return nil
	})

	tests := []struct {
		name  string
		after int64
		limit int
		want  []wire.Event
	}{
		{"all", 0, 100, dev1},
		{"limit", 0, 2, dev1[:2]},
		{"after", dev1[1].Seq, 100, dev1[2:]},
		{"after_and_limit", dev1[0].Seq, 2, dev1[1:3]},
		{"after_last", dev1[len(dev1)-1].Seq, 100, nil},
	}
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, tc := range tests {
			got, err := tx.DeviceEvents(ctx, "dev-1", tc.after, tc.limit)
			if err != nil {
				return err
			}
			if len(tc.want) == 0 {
				if len(got) != 0 {
					t.Errorf("DeviceEvents/%s = %v, want none", tc.name, got)
				}
				continue
			}
			diff(t, "DeviceEvents/"+tc.name, got, tc.want)
		}
		got, err := tx.DeviceEvents(ctx, "dev-3", 0, 100)
		if err != nil {
			return err
		}
		if len(got) != 0 {
			t.Errorf("DeviceEvents(dev-3) = %v, want none", got)
		}
		return nil
	})
}

func auditEvent(i int) audit.Event {
	return audit.Event{
		Seq: 42, PrevHash: "junk", Hash: "junk", // overwritten by AppendAudit
		Time:    T0.Add(time.Duration(i) * time.Second).In(time.FixedZone("X", 3*3600)),
		Type:    audit.TypeRequestCreated,
		Actor:   "alice",
		Device:  "dev-1",
		Src:     "192.0.2.1",
		Target:  "db-prod",
		Request: fmt.Sprintf("r%d", i),
		Details: map[string]string{"reason": "INC-4821", "n": fmt.Sprint(i)},
	}
}

func testAudit(t *testing.T, s store.Store) {
	var sealed []audit.Event
	appendN := func(from, n int) {
		update(t, s, func(ctx context.Context, tx store.Tx) error {
			for i := from; i < from+n; i++ {
				e, err := tx.AppendAudit(ctx, auditEvent(i))
				if err != nil {
					return err
				}
				sealed = append(sealed, e)
			}
			return nil
		})
	}
	appendN(0, 3)
	appendN(3, 4) // the chain continues across transactions

	for i, e := range sealed {
		if e.Seq != int64(i+1) {
			t.Errorf("event %d: Seq = %d, want %d", i, e.Seq, i+1)
		}
	}
	if sealed[0].PrevHash != audit.GenesisHash {
		t.Errorf("first PrevHash = %q, want the genesis hash", sealed[0].PrevHash)
	}
	if err := audit.Verify(sealed); err != nil {
		t.Errorf("Verify(returned events): %v", err)
	}

	tests := []struct {
		name  string
		after int64
		limit int
		want  []audit.Event
	}{
		{"all", 0, 100, sealed},
		{"first_page", 0, 3, sealed[:3]},
		{"second_page", 3, 3, sealed[3:6]},
		{"last_page", 6, 3, sealed[6:]},
		{"past_end", 7, 3, nil},
	}
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, tc := range tests {
			got, err := tx.AuditEvents(ctx, tc.after, tc.limit)
			if err != nil {
				return err
			}
			if len(tc.want) == 0 {
				if len(got) != 0 {
					t.Errorf("AuditEvents/%s = %v, want none", tc.name, got)
				}
				continue
			}
			diff(t, "AuditEvents/"+tc.name, got, tc.want)
			if err := audit.Verify(got); err != nil {
				t.Errorf("AuditEvents/%s: Verify: %v", tc.name, err)
			}
		}
		return nil
	})
}

func testAuditConcurrent(t *testing.T, s store.Store) {
	const writers, each = 8, 5
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for w := range writers {
		wg.Go(func() {
			errs <- s.Update(t.Context(), func(tx store.Tx) error {
				for i := range each {
					if _, err := tx.AppendAudit(t.Context(), auditEvent(w*each+i)); err != nil {
						return err
					}
				}
				return nil
			})
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("concurrent Update: %v", err)
		}
	}
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.AuditEvents(ctx, 0, 1000)
		if err != nil {
			return err
		}
		if len(got) != writers*each {
			t.Errorf("got %d audit events, want %d", len(got), writers*each)
		}
		if len(got) > 0 && got[0].Seq != 1 {
			t.Errorf("first Seq = %d, want 1", got[0].Seq)
		}
		if err := audit.Verify(got); err != nil {
			t.Errorf("Verify after concurrent appends: %v", err)
		}
		return nil
	})
}

func testRecordings(t *testing.T, s store.Store) {
	rec := func(id string, started time.Time) store.Recording {
		return store.Recording{ID: id, Request: "r1", User: "alice", Target: "db-prod", Kind: "ssh", Started: started}
	}
	older := rec("rec-old", T0)
	middle := rec("rec-mid", T0.Add(time.Minute))
	newest := rec("rec-new", T0.Add(2*time.Minute))
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		for _, r := range []store.Recording{middle, newest, older} {
			if err := tx.PutRecording(ctx, r); err != nil {
				return err
			}
		}
		return nil
	})
	// Closing a recording stores it again with its end, size and hash.
	middle.Ended, middle.Size, middle.SHA256 = T0.Add(90*time.Second), 4096, strings.Repeat("0f", 32)
	update(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutRecording(ctx, middle) })

	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.Recording(ctx, middle.ID)
		if err != nil {
			return err
		}
		diff(t, "Recording after upsert", got, middle)
		list, err := tx.Recordings(ctx, 10)
		if err != nil {
			return err
		}
		diff(t, "Recordings(10)", list, []store.Recording{newest, middle, older})
		list, err = tx.Recordings(ctx, 2)
		if err != nil {
			return err
		}
		diff(t, "Recordings(2)", list, []store.Recording{newest, middle})
		return nil
	})
}

func testUpdateRollback(t *testing.T, s store.Store) {
	errBoom := errors.New("boom")
	dev := store.Device{ID: "dev-1", User: "ada", Hostname: "ws", PublicKey: []byte("key-1"), State: store.DevicePending, CreatedAt: T0}
	err := updateErr(t, s, func(ctx context.Context, tx store.Tx) error {
		steps := []error{
			tx.CreateUser(ctx, user("ada", "admin")),
			tx.AddCredential(ctx, store.Credential{ID: []byte("c1"), User: "ada", Data: []byte("{}"), CreatedAt: T0}),
			tx.PutToken(ctx, store.Token{Hash: "h1", Kind: store.TokenInvite, User: "ada", CreatedAt: T0, ExpiresAt: T0.Add(time.Hour)}),
			tx.PutCeremony(ctx, store.Ceremony{ID: "c1", Data: []byte("{}"), ExpiresAt: T0}),
			tx.CreateDevice(ctx, dev),
			tx.PutNonce(ctx, "dev-1", "n1", T0.Add(time.Hour)),
			tx.PutPosture(ctx, store.Posture{Device: "dev-1", CollectedAt: T0, ReceivedAt: T0, Report: []byte("{}"), Signature: []byte{1}}),
			tx.CreateRequest(ctx, request("r1", "dev-1", access.StatePending)),
			tx.PutActivation(ctx, activation("r1", "100.96.0.2")),
			tx.PutRecording(ctx, store.Recording{ID: "rec", Started: T0}),
		}
		for i, err := range steps {
			if err != nil {
				t.Errorf("step %d in the doomed transaction: %v", i, err)
			}
		}
		if _, err := tx.AppendDeviceEvent(ctx, "dev-1", wire.Event{Type: wire.EventGrantIssued, Time: T0}); err != nil {
			t.Errorf("AppendDeviceEvent in the doomed transaction: %v", err)
		}
		if _, err := tx.AppendAudit(ctx, auditEvent(0)); err != nil {
			t.Errorf("AppendAudit in the doomed transaction: %v", err)
		}
		return fmt.Errorf("step failed: %w", errBoom)
	})
	if !errors.Is(err, errBoom) {
		t.Fatalf("Update returned %v, want fn's error", err)
	}

	view(t, s, func(ctx context.Context, tx store.Tx) error {
		nf := func(what string, err error) { wantIs(t, what+" after rollback", err, store.ErrNotFound) }
		_, err := tx.User(ctx, "ada")
		nf("User", err)
		_, err = tx.Token(ctx, "h1")
		nf("Token", err)
		_, err = tx.Device(ctx, "dev-1")
		nf("Device", err)
		_, err = tx.Posture(ctx, "dev-1")
		nf("Posture", err)
		_, err = tx.Request(ctx, "r1")
		nf("Request", err)
		_, err = tx.Activation(ctx, "r1")
		nf("Activation", err)
		_, err = tx.Recording(ctx, "rec")
		nf("Recording", err)
		creds, err := tx.Credentials(ctx, "ada")
		if err != nil || len(creds) != 0 {
			t.Errorf("Credentials after rollback = %v, %v; want none", creds, err)
		}
		addrs, err := tx.LiveTunnelAddrs(ctx)
		if err != nil || len(addrs) != 0 {
			t.Errorf("LiveTunnelAddrs after rollback = %v, %v; want none", addrs, err)
		}
		evs, err := tx.DeviceEvents(ctx, "dev-1", 0, 10)
		if err != nil || len(evs) != 0 {
			t.Errorf("DeviceEvents after rollback = %v, %v; want none", evs, err)
		}
		aud, err := tx.AuditEvents(ctx, 0, 10)
		if err != nil || len(aud) != 0 {
			t.Errorf("AuditEvents after rollback = %v, %v; want none", aud, err)
		}
		return nil
	})
	update(t, s, func(ctx context.Context, tx store.Tx) error {
		_, err := tx.TakeCeremony(ctx, "c1")
		wantIs(t, "TakeCeremony after rollback", err, store.ErrNotFound)
		wantIs(t, "TakeNonce after rollback", tx.TakeNonce(ctx, "dev-1", "n1", T0), store.ErrNotFound)
		// The rolled-back audit event left no gap in the chain.
		e, err := tx.AppendAudit(ctx, auditEvent(1))
		if err != nil {
			return err
		}
		if e.Seq != 1 || e.PrevHash != audit.GenesisHash {
			t.Errorf("first audit event after rollback: Seq %d PrevHash %q, want 1 and the genesis hash", e.Seq, e.PrevHash)
		}
		return nil
	})
}

func testViewNeverCommits(t *testing.T, s store.Store) {
	// A backend may refuse writes in View or roll them back; it must not
	// keep them.
	_ = viewErr(t, s, func(ctx context.Context, tx store.Tx) error {
		return tx.CreateUser(ctx, user("ada", "admin"))
	})
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		_, err := tx.User(ctx, "ada")
		wantIs(t, "User written in View", err, store.ErrNotFound)
		return nil
	})
	errBoom := errors.New("boom")
	if err := viewErr(t, s, func(context.Context, store.Tx) error { return errBoom }); !errors.Is(err, errBoom) {
		t.Errorf("View returned %v, want fn's error", err)
	}
}

func testNotFound(t *testing.T, s store.Store) {
	tests := []struct {
		name string
		fn   func(ctx context.Context, tx store.Tx) error
	}{
		{"User", func(ctx context.Context, tx store.Tx) error { _, err := tx.User(ctx, "nobody"); return err }},
		{"UserByHandle", func(ctx context.Context, tx store.Tx) error { _, err := tx.UserByHandle(ctx, []byte("h")); return err }},
		{"UpdateCredential", func(ctx context.Context, tx store.Tx) error {
			return tx.UpdateCredential(ctx, store.Credential{ID: []byte("c"), User: "nobody", Data: []byte("{}")})
		}},
		{"Token", func(ctx context.Context, tx store.Tx) error { _, err := tx.Token(ctx, "h"); return err }},
		{"TakeCeremony", func(ctx context.Context, tx store.Tx) error { _, err := tx.TakeCeremony(ctx, "c"); return err }},
		{"Device", func(ctx context.Context, tx store.Tx) error { _, err := tx.Device(ctx, "d"); return err }},
		{"DeviceByKey", func(ctx context.Context, tx store.Tx) error { _, err := tx.DeviceByKey(ctx, []byte("k")); return err }},
		{"UpdateDevice", func(ctx context.Context, tx store.Tx) error {
			return tx.UpdateDevice(ctx, store.Device{ID: "d", State: store.DeviceActive})
		}},
		{"TakeNonce", func(ctx context.Context, tx store.Tx) error { return tx.TakeNonce(ctx, "d", "n", T0) }},
		{"Posture", func(ctx context.Context, tx store.Tx) error { _, err := tx.Posture(ctx, "d"); return err }},
		{"Request", func(ctx context.Context, tx store.Tx) error { _, err := tx.Request(ctx, "r"); return err }},
		{"UpdateRequest", func(ctx context.Context, tx store.Tx) error {
			return tx.UpdateRequest(ctx, request("r", "d", access.StateEnded))
		}},
		{"Activation", func(ctx context.Context, tx store.Tx) error { _, err := tx.Activation(ctx, "r"); return err }},
		{"Recording", func(ctx context.Context, tx store.Tx) error { _, err := tx.Recording(ctx, "rec"); return err }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := updateErr(t, s, tc.fn)
			wantIs(t, tc.name, err, store.ErrNotFound)
			if errors.Is(err, store.ErrConflict) {
				t.Errorf("%s: error %v also matches ErrConflict", tc.name, err)
			}
		})
	}
}

func testAuditCheckpoints(t *testing.T, s store.Store) {
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		if _, err := tx.AuditHead(ctx); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("AuditHead of an empty log: %v, want ErrNotFound", err)
		}
		if _, err := tx.LatestCheckpoint(ctx); !errors.Is(err, store.ErrNotFound) {
			t.Errorf("LatestCheckpoint with none: %v, want ErrNotFound", err)
		}
		return nil
	})
	_, priv, _ := ed25519.GenerateKey(nil)
	var cps []audit.Checkpoint
	for i := range 3 {
		update(t, s, func(ctx context.Context, tx store.Tx) error {
			if _, err := tx.AppendAudit(ctx, auditEvent(i)); err != nil {
				return err
			}
			head, err := tx.AuditHead(ctx)
			if err != nil {
				return err
			}
			if head.Seq != int64(i+1) {
				t.Errorf("AuditHead seq = %d, want %d", head.Seq, i+1)
			}
			cp := audit.SignCheckpoint(priv, head, T0)
			cps = append(cps, cp)
			return tx.PutCheckpoint(ctx, cp)
		})
	}
	view(t, s, func(ctx context.Context, tx store.Tx) error {
		got, err := tx.LatestCheckpoint(ctx)
		if err != nil {
			return err
		}
		if diff := cmp.Diff(cps[2], got); diff != "" {
			t.Errorf("LatestCheckpoint (-want +got):\n%s", diff)
		}
		return nil
	})
	if err := updateErr(t, s, func(ctx context.Context, tx store.Tx) error { return tx.PutCheckpoint(ctx, cps[1]) }); !errors.Is(err, store.ErrConflict) {
		t.Errorf("second checkpoint for one seq: %v, want ErrConflict", err)
	}
}
