package gateway

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/internal/wgkey"
)

// TestCloseJoinsGoroutines is not parallel: it compares goroutine counts,
// which only works while no other test is running.
func TestCloseJoinsGoroutines(t *testing.T) {
	backend := newEchoBackend(t)
	round := func() {
		d := newDecider(map[netip.AddrPort]string{target: backend.addr})
		key, err := wgkey.NewPrivate(nil)
		if err != nil {
			t.Fatal(err)
		}
		cfg := Config{PrivateKey: key, Decide: d.decide}
		if os.Geteuid() == 0 {
			cfg.UAPIName = uniqueUAPIName(t) // its goroutines must be joined too
		}
		gw, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		a := newTestAgent(t, gw, netip.MustParseAddr("100.64.0.2"))
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c, err := a.dial(ctx, target)
		if err != nil {
			t.Fatal(err)
		}
		echo(t, c, 4096)
		// Leave the flow open: Close must cut it and join its Handler.
		if err := gw.Close(); err != nil {
			t.Fatal(err)
		}
		if err := gw.Close(); err != nil {
			t.Fatalf("second Close: %v", err)
		}
		_ = c.Close()
		a.dev.Close()
	}
	// The first round warms up lazily started runtime and library goroutines.
	round()
	before := runtime.NumGoroutine()
	round()
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("goroutines: %d before, %d after Close\n%s", before, runtime.NumGoroutine(), buf[:n])
		}
		runtime.Gosched()
		time.Sleep(10 * time.Millisecond) // polling a count that has no event to wait on
	}
}

func TestAllowedFlowEcho(t *testing.T) {
	t.Parallel()
	backend := newEchoBackend(t)
	d := newDecider(map[netip.AddrPort]string{target: backend.addr})
	gw := newTestGateway(t, d.decide)
	a := newTestAgent(t, gw, netip.MustParseAddr("100.64.0.2"))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := a.dial(ctx, target)
	if err != nil {
		t.Fatalf("dial %v: %v", target, err)
	}
	defer c.Close()
	echo(t, c, 1<<20)

	flows := d.flows()
	if len(flows) != 1 || flows[0].Dst != target || flows[0].Src.Addr() != a.addr || flows[0].Src.Port() == 0 {
		t.Fatalf("decision saw %v, want one flow %v -> %v", flows, a.addr, target)
	}
}

func TestDeniedFlowRefused(t *testing.T) {
	t.Parallel()
	backend := newEchoBackend(t)
	d := newDecider(map[netip.AddrPort]string{target: backend.addr})
	gw := newTestGateway(t, func(ctx context.Context, f Flow) (Handler, error) {
		switch f.Dst.Port() {
		case 24:
			_, _ = d.decide(ctx, f) // record it
			return nil, nil
		case 25:
			_, _ = d.decide(ctx, f)
			panic("decision bug")
		}
		return d.decide(ctx, f)
	})
	a := newTestAgent(t, gw, netip.MustParseAddr("100.64.0.3"))

	// An allowed flow first, so the WireGuard handshake is not timed below.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := a.dial(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo(t, c, 1024)

	tests := []struct {
		name string
		dst  netip.AddrPort
	}{
		{"deny/other-port", netip.MustParseAddrPort("100.127.0.1:23")},
		{"deny/nil-handler", netip.MustParseAddrPort("100.127.0.1:24")},
		{"deny/decide-panics", netip.MustParseAddrPort("100.127.0.1:25")},
		{"deny/other-ip", netip.MustParseAddrPort("100.127.0.2:22")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			start := time.Now()
			c, err := a.dial(ctx, tt.dst)
			if err == nil {
				c.Close()
				t.Fatalf("dial %v succeeded", tt.dst)
			}
			if ctx.Err() != nil || !strings.Contains(err.Error(), "refused") {
				t.Fatalf("dial %v: got %v after %v, want connection refused", tt.dst, err, time.Since(start))
			}
			if el := time.Since(start); el > time.Second {
				t.Errorf("refusal took %v", el)
			}
			var saw bool
			for _, f := range d.flows() {
				saw = saw || (f.Dst == tt.dst && f.Src.Addr() == a.addr)
			}
			if !saw {
				t.Errorf("decision never saw %v -> %v: %v", a.addr, tt.dst, d.flows())
			}
		})
	}
	// The gateway still serves allowed flows after a panicking decision.
	c2, err := a.dial(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	echo(t, c2, 1024)
}

func TestRemovePeerCutsBusyFlow(t *testing.T) {
	t.Parallel()
	backend := newEchoBackend(t)
	d := newDecider(map[netip.AddrPort]string{target: backend.addr})
	gw := newTestGateway(t, d.decide)
	a := newTestAgent(t, gw, netip.MustParseAddr("100.64.0.4"))
	other := newTestAgent(t, gw, netip.MustParseAddr("100.64.0.5"))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := a.dial(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	oc, err := other.dial(ctx, target)
	if err != nil {
		t.Fatal(err)
	}
	defer oc.Close()

	readEnded, flowing := busyFlow(c)
	within(t, flowing, 10*time.Second, "echoed data")

	start := time.Now()
	if err := gw.RemovePeer(a.key.Public()); err != nil {
		t.Fatal(err)
	}
	within(t, readEnded, time.Second, "agent read ending after RemovePeer")
	within(t, backend.ended, time.Second, "backend connection closing")
	t.Logf("flow cut %v after RemovePeer started", time.Since(start))

	if got := gw.Peers(); got != 1 {
		t.Errorf("Peers() = %d, want 1", got)
	}
	dctx, dcancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer dcancel()
	if c2, err := a.dial(dctx, target); err == nil {
		c2.Close()
		t.Error("removed peer could dial again")
	}
	if err := gw.RemovePeer(a.key.Public()); !errors.Is(err, ErrUnknownPeer) {
		t.Errorf("second RemovePeer: got %v, want ErrUnknownPeer", err)
	}
	// The other peer's flow is untouched.
	echo(t, oc, 1024)
}

func TestCloseFlowsKeepsPeer(t *testing.T) {
	t.Parallel()
	backend := newEchoBackend(t)
	d := newDecider(map[netip.AddrPort]string{target: backend.addr})
	gw := newTestGateway(t, d.decide)
	a := newTestAgent(t, gw, netip.MustParseAddr("100.64.0.6"))

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	var conns []net.Conn
	for range 2 {
		c, err := a.dial(ctx, target)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echo(t, c, 1024)
		conns = append(conns, c)
	}
	readEnded, _ := busyFlow(conns[0])
	if got := gw.CloseFlows(a.addr); got != 2 {
		t.Errorf("CloseFlows = %d, want 2", got)
	}
	within(t, readEnded, time.Second, "agent read ending after CloseFlows")
	if got := gw.CloseFlows(a.addr); got != 0 {
		t.Errorf("second CloseFlows = %d, want 0", got)
	}
	if got := gw.Peers(); got != 1 {
		t.Errorf("Peers() = %d, want 1", got)
	}
	c, err := a.dial(ctx, target)
	if err != nil {
		t.Fatalf("dial after CloseFlows: %v", err)
	}
	defer c.Close()
	echo(t, c, 1024)
}

func TestAddPeer(t *testing.T) {
	t.Parallel()
	gw := newTestGateway(t, func(context.Context, Flow) (Handler, error) { return nil, nil })
	k1, k2 := mustKey(t).Public(), mustKey(t).Public()
	a1, a2 := netip.MustParseAddr("100.64.1.1"), netip.MustParseAddr("fd00::2")
	if err := gw.AddPeer(k1, a1); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		pub     wgkey.Public
		addr    netip.Addr
		wantErr error // nil: success; errAny: some error
	}{
		{"ok/same-key-same-addr", k1, a1, nil},
		{"ok/ipv6", k2, a2, nil},
		{"conflict/key-other-addr", k1, netip.MustParseAddr("100.64.1.2"), ErrPeerConflict},
		{"conflict/addr-other-key", mustKey(t).Public(), a1, ErrPeerConflict},
		{"bad/zero-key", wgkey.Public{}, netip.MustParseAddr("100.64.1.3"), errAny},
		{"bad/own-key", gw.PublicKey(), netip.MustParseAddr("100.64.1.4"), errAny},
		{"bad/invalid-addr", mustKey(t).Public(), netip.Addr{}, errAny},
		{"bad/unspecified", mustKey(t).Public(), netip.IPv4Unspecified(), errAny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := gw.AddPeer(tt.pub, tt.addr)
			switch {
			case tt.wantErr == nil && err != nil:
				t.Fatalf("AddPeer: %v", err)
			case tt.wantErr == errAny && err == nil:
				t.Fatal("AddPeer accepted bad input")
			case tt.wantErr != nil && tt.wantErr != errAny && !errors.Is(err, tt.wantErr):
				t.Fatalf("AddPeer: got %v, want %v", err, tt.wantErr)
			}
		})
	}
	if got := gw.Peers(); got != 2 {
		t.Errorf("Peers() = %d, want 2", got)
	}
	if err := gw.RemovePeer(k2); err != nil {
		t.Fatal(err)
	}
	if err := gw.Close(); err != nil {
		t.Fatal(err)
	}
	if err := gw.AddPeer(k2, a2); !errors.Is(err, ErrClosed) {
		t.Errorf("AddPeer after Close: got %v, want ErrClosed", err)
	}
}

var errAny = errors.New("any error")

func TestNewRejectsBadConfig(t *testing.T) {
	t.Parallel()
	key := mustKey(t)
	decide := func(context.Context, Flow) (Handler, error) { return nil, nil }
	tests := []struct {
		name string
		cfg  Config
	}{
		{"bad/no-key", Config{Decide: decide}},
		{"bad/no-decide", Config{PrivateKey: key}},
		{"bad/port", Config{PrivateKey: key, Decide: decide, ListenPort: 70000}},
		{"bad/mtu-small", Config{PrivateKey: key, Decide: decide, MTU: 500}},
		{"bad/mtu-large", Config{PrivateKey: key, Decide: decide, MTU: 65536}},
		{"bad/uapi-traversal", Config{PrivateKey: key, Decide: decide, UAPIName: "../x"}},
		{"bad/uapi-long", Config{PrivateKey: key, Decide: decide, UAPIName: strings.Repeat("a", 16)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			gw, err := New(tt.cfg)
			if err == nil {
				gw.Close()
				t.Fatal("New accepted bad config")
			}
		})
	}
}

func TestUAPIWgShow(t *testing.T) {
	t.Parallel()
	wg, err := exec.LookPath("wg")
	switch {
	case err != nil && os.Getenv("CI") != "":
		t.Fatal("wg (wireguard-tools) is required in CI")
	case err != nil:
		t.Skip("wg not installed")
	case os.Geteuid() != 0 && os.Getenv("CI") != "":
		t.Fatal("the UAPI test needs root (/var/run/wireguard) in CI")
	case os.Geteuid() != 0:
		t.Skip("UAPI sockets live in /var/run/wireguard, which needs root")
	}
	name := uniqueUAPIName(t)
	key := mustKey(t)
	gw, err := New(Config{PrivateKey: key, Decide: func(context.Context, Flow) (Handler, error) { return nil, nil }, UAPIName: name})
	if err != nil {
		t.Fatal(err)
	}
	defer gw.Close()
	peer := mustKey(t).Public()
	if err := gw.AddPeer(peer, netip.MustParseAddr("100.64.2.7")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, wg, "show", name).CombinedOutput()
	if err != nil {
		t.Fatalf("wg show %s: %v\n%s", name, err, out)
	}
	for _, want := range []string{
		"public key: " + gw.PublicKey().String(),
		"peer: " + peer.String(),
		"allowed ips: 100.64.2.7/32",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("wg show output lacks %q:\n%s", want, out)
		}
	}
	if err := gw.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat("/var/run/wireguard/" + name + ".sock"); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind after Close: %v", err)
	}
}

func uniqueUAPIName(t *testing.T) string {
	t.Helper()
	b := make([]byte, 5)
	_, _ = rand.Read(b)
	return "phgw" + hex.EncodeToString(b)
}

func mustKey(t *testing.T) wgkey.Private {
	t.Helper()
	k, err := wgkey.NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// echo writes n random bytes to c while reading them back, and compares.
func echo(t *testing.T, c net.Conn, n int) {
	t.Helper()
	if err := c.SetDeadline(time.Now().Add(20 * time.Second)); err != nil {
		t.Fatal(err)
	}
	defer c.SetDeadline(time.Time{})
	want := make([]byte, n)
	_, _ = rand.Read(want)
	werr := make(chan error, 1)
	go func() {
		_, err := c.Write(want)
		werr <- err
	}()
	got := make([]byte, n)
	if _, err := io.ReadFull(c, got); err != nil {
		t.Fatalf("reading echo: %v", err)
	}
	if err := <-werr; err != nil {
		t.Fatalf("writing: %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("echo differs")
	}
}

// busyFlow writes to c continuously and reads the echo; readEnded yields the
// read error once reading stops, flowing closes after the first 64 KiB came
// back. Both goroutines end when c does.
func busyFlow(c net.Conn) (readEnded <-chan error, flowing <-chan struct{}) {
	ended := make(chan error, 1)
	flow := make(chan struct{})
	go func() {
		buf := make([]byte, 32<<10)
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	}()
	go func() {
		buf := make([]byte, 32<<10)
		total, signalled := 0, false
		for {
			n, err := c.Read(buf)
			total += n
			if total >= 64<<10 && !signalled {
				close(flow)
				signalled = true
			}
			if err != nil {
				ended <- err
				return
			}
		}
	}()
	return ended, flow
}
