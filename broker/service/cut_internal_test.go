package service

import (
	"crypto/rand"
	"net/netip"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/internal/access"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/fido"
	"github.com/pinhole-dev/pinhole/internal/policy"
	"github.com/pinhole-dev/pinhole/internal/recording"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/store/sqlstore"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
)

// newTestService builds a Service over the real SQLite store (WAL,
// synchronous=FULL) in tb.TempDir(), as the broker wires it, with an empty
// policy. Nothing it starts needs stopping but the store, which tb's cleanup
// closes.
func newTestService(tb testing.TB) (*Service, store.Store) {
	tb.Helper()
	st, err := sqlstore.Open(tb.Context(), filepath.Join(tb.TempDir(), "pinhole.db"), nil)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { st.Close() })
	f, err := fido.New(fido.Config{RPID: "localhost", Origins: []string{"https://localhost:8443"}})
	if err != nil {
		tb.Fatal(err)
	}
	clientCA, err := sshca.NewKey(rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	hostCA, err := sshca.NewKey(rand.Reader)
	if err != nil {
		tb.Fatal(err)
	}
	var pol atomic.Pointer[policy.Config]
	pol.Store(&policy.Config{})
	svc, err := New(Config{Store: st, Policy: &pol, FIDO: f, ClientCA: clientCA, HostCA: hostCA, PublicURL: "https://localhost:8443"})
	if err != nil {
		tb.Fatal(err)
	}
	return svc, st
}

// fakeGateway records peer and flow changes.
type fakeGateway struct {
	mu      sync.Mutex
	removed []wgkey.Public
	closed  []netip.Addr
	key     wgkey.Public
}

func (g *fakeGateway) AddPeer(wgkey.Public, netip.Addr) error { return nil }
func (g *fakeGateway) RemovePeer(k wgkey.Public) error {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.removed = append(g.removed, k)
	return nil
}
func (g *fakeGateway) CloseFlows(a netip.Addr) int {
	g.mu.Lock()
	defer g.mu.Unlock()
	g.closed = append(g.closed, a)
	return 0
}
func (g *fakeGateway) PublicKey() wgkey.Public { return g.key }

// blockingCutter holds EndGrant until release is closed, as a session
// saying goodbye to a slow client does.
type blockingCutter struct {
	entered chan string
	release chan struct{}
}

func (c *blockingCutter) EndGrant(id, _ string) int {
	c.entered <- id
	<-c.release
	return 1
}

// TestCutRefusesNewFlowsBeforeGoodbye: from the moment a grant's cut
// starts, no new flow is authorized for it and its tunnel address is not
// handed to another grant, even while its sessions are still being told why
// (invariants 1 and 6); the peer goes and the flows close after the goodbye.
func TestCutRefusesNewFlowsBeforeGoodbye(t *testing.T) {
	s, _ := newTestService(t)
	ctx := t.Context()
	gw := &fakeGateway{}
	cut := &blockingCutter{entered: make(chan string, 1), release: make(chan struct{})}
	s.SetDataPlane(gw, cut)

	priv, err := wgkey.NewPrivate(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	first := s.cfg.TunnelPrefix.Masked().Addr().Next().Next()
	dst := netip.MustParseAddrPort("127.0.0.1:22")
	s.cfg.Policy.Store(&policy.Config{Targets: []policy.Target{{Name: "db-prod", Address: "db.internal:22", Protocol: policy.ProtocolSSH, TunnelIP: dst.Addr()}}})
	g := LiveGrant{Request: "r-1", Device: "d-1", User: "alice", Target: "db-prod", TunnelAddr: first, Dst: dst,
		Ends: s.now().Add(time.Hour), WGPublic: priv.Public()}
	s.flows.put(g)
	src := netip.AddrPortFrom(first, 40000)
	if _, _, err := s.AuthorizeFlow(ctx, src, dst); err != nil {
		t.Fatalf("live grant: flow refused: %v", err)
	}

	done := make(chan struct{})
	go func() {
		defer close(done)
		s.cutDataPlane("r-1", access.Request{ID: "r-1", Target: "db-prod", State: access.StateEnded})
	}()
	<-cut.entered // the cut is telling the sessions why

	if _, _, err := s.AuthorizeFlow(ctx, src, dst); err == nil {
		t.Error("a new flow was authorized for a grant whose cut had started")
	}
	var got netip.Addr
	if err := s.cfg.Store.Update(ctx, func(tx store.Tx) error {
		var err error
		got, err = s.allocateAddr(ctx, tx)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if got == first {
		t.Errorf("allocateAddr handed out %s while the ended grant's flows were still draining", got)
	}
	gw.mu.Lock()
	early := len(gw.removed) + len(gw.closed)
	gw.mu.Unlock()
	if early != 0 {
		t.Errorf("peer removed or flows closed before the sessions were told why")
	}

	close(cut.release)
	<-done
	gw.mu.Lock()
	defer gw.mu.Unlock()
	if len(gw.removed) != 1 || gw.removed[0] != priv.Public() || len(gw.closed) != 1 || gw.closed[0] != first {
		t.Errorf("after the cut: removed %v, closed %v; want the grant's peer and address", gw.removed, gw.closed)
	}
	if s.flows.inUse(first) {
		t.Errorf("address %s still held after the cut finished", first)
	}
}

// TestFlowRefusedWhenTargetChanged: a live grant's flows are refused (and
// audited as flow.denied) once its target is removed from the config or
// points elsewhere.
func TestFlowRefusedWhenTargetChanged(t *testing.T) {
	s, _ := newTestService(t)
	dst := netip.MustParseAddrPort("100.127.0.1:22")
	src := netip.AddrPortFrom(s.cfg.TunnelPrefix.Masked().Addr().Next().Next(), 40000)
	s.flows.put(LiveGrant{Request: "r-1", Target: "db-prod", TunnelAddr: src.Addr(), Dst: dst, Ends: s.now().Add(time.Hour)})
	tests := []struct {
		name    string
		targets []policy.Target
		wantErr string
	}{
		{"ok/unchanged", []policy.Target{{Name: "db-prod", Address: "db:22", TunnelIP: dst.Addr()}}, ""},
		{"deny/removed", nil, "no longer configured"},
		{"deny/other port", []policy.Target{{Name: "db-prod", Address: "db:2222", TunnelIP: dst.Addr()}}, "has changed"},
		{"deny/other tunnel ip", []policy.Target{{Name: "db-prod", Address: "db:22", TunnelIP: netip.MustParseAddr("100.127.0.9")}}, "has changed"},
	}
	for _, tt := range tests {
		s.cfg.Policy.Store(&policy.Config{Targets: tt.targets})
		_, _, err := s.AuthorizeFlow(t.Context(), src, dst)
		switch {
		case tt.wantErr == "" && err != nil:
			t.Errorf("%s: refused: %v", tt.name, err)
		case tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)):
			t.Errorf("%s: got %v, want a refusal saying %q", tt.name, err, tt.wantErr)
		}
	}
}

// TestRestoreSealsInterruptedRecordings: a recording a killed broker left
// open is sealed at the next start: hashed as it is on disk, marked ended
// and audited as recording.closed with the interruption said.
func TestRestoreSealsInterruptedRecordings(t *testing.T) {
	s, st := newTestService(t)
	fs, err := recording.NewFileStore(filepath.Join(t.TempDir(), "recordings"))
	if err != nil {
		t.Fatal(err)
	}
	s.cfg.Recordings = fs
	rec, err := s.OpenRecording(t.Context(), SessionMeta{ID: "S1", Request: "r-1", User: "alice", Target: "db-prod", Kind: "shell", Started: s.now()})
	if err != nil {
		t.Fatal(err)
	}
	if err := rec.Output([]byte("before the crash\r\n")); err != nil {
		t.Fatal(err)
	}
	// The broker dies here: no Close. (The file is flushed as it goes.)
	if err := s.Restore(t.Context()); err != nil {
		t.Fatal(err)
	}
	var got store.Recording
	var evs []audit.Event
	if err := st.View(t.Context(), func(tx store.Tx) error {
		var err error
		if got, err = tx.Recording(t.Context(), "S1"); err != nil {
			return err
		}
		evs, err = tx.AuditEvents(t.Context(), 0, 100)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	sum, size, err := s.hashRecording("S1")
	if err != nil {
		t.Fatal(err)
	}
	if got.Ended.IsZero() || got.SHA256 != sum || got.Size != size || size == 0 {
		t.Errorf("after restore: %+v; want ended with sha256 %s and size %d", got, sum, size)
	}
	sealed := false
	for _, e := range evs {
		sealed = sealed || (e.Type == audit.TypeRecordingClosed && e.Details["sha256"] == sum && e.Details["interrupted"] != "")
	}
	if !sealed {
		t.Errorf("no recording.closed event marked interrupted in %v", evs)
	}
}
