package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"github.com/pinhole-dev/pinhole/internal/testnet"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
)

// target is the granted destination the tests' agents dial.
var target = netip.MustParseAddrPort("100.127.0.1:22")

// testAgent is the far end of the tunnel: stock wireguard-go netstack, built
// here rather than with agent/tunnel, which broker packages must not import.
type testAgent struct {
	key  wgkey.Private
	addr netip.Addr
	dev  *device.Device
	net  *netstack.Net
}

// newTestAgent starts an agent device with tunnel address addr whose only
// peer is gw, routing 100.127.0.0/16 into the tunnel, and adds it to gw.
func newTestAgent(t *testing.T, gw *Gateway, addr netip.Addr) *testAgent {
	t.Helper()
	key, err := wgkey.NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	a := &testAgent{key: key, addr: addr}
	tdev, tnet, err := netstack.CreateNetTUN([]netip.Addr{addr}, nil, DefaultMTU)
	if err != nil {
		t.Fatal(err)
	}
	lg := &device.Logger{Verbosef: device.DiscardLogf, Errorf: device.DiscardLogf}
	if debugLogs() {
		logf := debugLogf("agent " + addr.String())
		lg = &device.Logger{Verbosef: logf, Errorf: logf}
	}
	a.dev = device.NewDevice(tdev, conn.NewDefaultBind(), lg)
	a.net = tnet
	gwPub := gw.PublicKey()
	conf := fmt.Sprintf("private_key=%s\npublic_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=100.127.0.0/16\n",
		key.UAPIHex(), gwPub.UAPIHex(), gw.ListenPort())
	if err := a.dev.IpcSet(conf); err != nil {
		t.Fatal(err)
	}
	if err := a.dev.Up(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(a.dev.Close)
	if err := gw.AddPeer(key.Public(), addr); err != nil {
		t.Fatal(err)
	}
	return a
}

func (a *testAgent) dial(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	return a.net.DialContextTCPAddrPort(ctx, dst)
}

// echoBackend is a real TCP echo server on 127.0.0.1.
type echoBackend struct {
	addr string
	// ended receives once per connection whose echo loop finished.
	ended chan struct{}
}

func newEchoBackend(t *testing.T) *echoBackend {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &echoBackend{addr: ln.Addr().String(), ended: make(chan struct{}, 64)}
	testnet.Serve(t, ln, func(c net.Conn) {
		_, _ = io.Copy(c, c)
		_ = c.Close()
		b.ended <- struct{}{}
	})
	return b
}

// decider is a Decide callback mapping allowed destinations to backends and
// recording every flow it was asked about.
type decider struct {
	mu     sync.Mutex
	routes map[netip.AddrPort]string
	seen   []Flow
}

func newDecider(routes map[netip.AddrPort]string) *decider {
	return &decider{routes: routes}
}

func (d *decider) decide(ctx context.Context, f Flow) (Handler, error) {
	d.mu.Lock()
	d.seen = append(d.seen, f)
	backend, ok := d.routes[f.Dst]
	d.mu.Unlock()
	if !ok {
		return nil, errors.New("no grant")
	}
	// Dial before accepting, so a dead backend shows up as a refusal.
	var dialer net.Dialer
	bc, err := dialer.DialContext(ctx, "tcp", backend)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context, c net.Conn) {
		_, _, _ = Splice(ctx, c, bc)
	}, nil
}

func (d *decider) flows() []Flow {
	d.mu.Lock()
	defer d.mu.Unlock()
	return append([]Flow(nil), d.seen...)
}

func newTestGateway(t *testing.T, decide func(context.Context, Flow) (Handler, error)) *Gateway {
	t.Helper()
	key, err := wgkey.NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	var lg *slog.Logger
	if debugLogs() {
		lg = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
	}
	gw, err := New(Config{PrivateKey: key, Decide: decide, Logger: lg})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := gw.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return gw
}

// within fails the test unless ch yields before d passes.
func within[T any](t *testing.T, ch <-chan T, d time.Duration, what string) T {
	t.Helper()
	timer := time.NewTimer(d)
	defer timer.Stop()
	select {
	case v := <-ch:
		return v
	case <-timer.C:
		t.Fatalf("%s: nothing within %v", what, d)
		var zero T
		return zero
	}
}

// debugLogs reports whether PINHOLE_WG_DEBUG asks for device logs on stderr.
// (Not t.Log: wireguard-go's workers may log after Close returns.)
func debugLogs() bool { return os.Getenv("PINHOLE_WG_DEBUG") != "" }

func debugLogf(who string) func(string, ...any) {
	start := time.Now()
	return func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "%v %s: %s\n", time.Since(start), who, fmt.Sprintf(format, args...))
	}
}
