package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"github.com/pinhole-dev/pinhole/agent/localapi"
	"github.com/pinhole-dev/pinhole/agent/tunnel"
	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// TestProbe drives a probe through the local API of a running agent whose
// tunnel is a fakeTunnel (the granted port connects, others are refused).
func TestProbe(t *testing.T) {
	t.Parallel()
	fb := newFakeBroker(t)
	dir := filepath.Join(shortTempDir(t), "state")
	enroll(t, fb, dir)
	ts := newTunnels()
	c, _, _ := runAgent(t, dir, ts)

	// Before any grant there is nothing to probe.
	_, err := c.LocalProbe(t.Context(), "db-prod", 22, time.Second)
	wantAPIError(t, err, 404, "not_found", "no live tunnel to db-prod")

	fb.grant("r1", time.Now().Add(time.Hour))
	if _, err := c.LocalWait(t.Context(), "r1", 30*time.Second); err != nil {
		t.Fatalf("LocalWait: %v", err)
	}
	ft := <-ts.made

	tests := []struct {
		name    string
		target  string
		port    int
		timeout time.Duration
		want    wire.LocalProbe
	}{
		{"ok/granted-port-by-default", "db-prod", 0, time.Second, wire.LocalProbe{Target: "db-prod", Destination: "100.80.0.1:22", Port: 22, Connected: true}},
		{"ok/granted-port", "db-prod", 22, 0, wire.LocalProbe{Target: "db-prod", Destination: "100.80.0.1:22", Port: 22, Connected: true}},
		{"refused/other-port", "db-prod", 5432, time.Second, wire.LocalProbe{Target: "db-prod", Destination: "100.80.0.1:5432", Port: 5432, Error: wire.ProbeRefused}},
		{"timeout/no-answer", "db-prod", hangPort, 50 * time.Millisecond, wire.LocalProbe{Target: "db-prod", Destination: "100.80.0.1:9", Port: hangPort, Error: wire.ProbeTimedOut}},
	}
	// The group returns once its parallel cases are done.
	t.Run("live", func(t *testing.T) {
		for _, tt := range tests {
			t.Run(tt.name, func(t *testing.T) {
				t.Parallel()
				got, err := c.LocalProbe(t.Context(), tt.target, tt.port, tt.timeout)
				if err != nil {
					t.Fatalf("LocalProbe: %v", err)
				}
				if diff := cmp.Diff(got, tt.want); diff != "" {
					t.Errorf("probe (-got +want):\n%s", diff)
				}
			})
		}
		t.Run("err/unknown-target", func(t *testing.T) {
			t.Parallel()
			_, err := c.LocalProbe(t.Context(), "db-staging", 22, time.Second)
			wantAPIError(t, err, 404, "not_found", "no live tunnel to db-staging")
		})
		t.Run("err/bad-port", func(t *testing.T) {
			t.Parallel()
			_, err := c.LocalProbe(t.Context(), "db-prod", 70000, time.Second)
			wantAPIError(t, err, 400, "bad_request", `parameter port must be a number between 1 and 65535, got "70000"`)
		})
	})

	// Once the grant ends, its tunnel can no longer be probed.
	fb.end("r1", "revoked by bob")
	<-ft.closed
	eventually(t, "the tunnel to leave the status", func() bool {
		st, err := c.LocalStatus(t.Context())
		return err == nil && len(st.Tunnels) == 0
	})
	_, err = c.LocalProbe(t.Context(), "db-prod", 0, time.Second)
	wantAPIError(t, err, 404, "not_found", "no live tunnel to db-prod")
	for _, d := range ft.dialed() {
		if d.Addr() != netip.MustParseAddr("100.80.0.1") {
			t.Errorf("dialed %v, want only the granted address", d)
		}
	}
}

func wantAPIError(t *testing.T, err error, status int, code, msg string) {
	t.Helper()
	var ae *client.APIError
	if !errors.As(err, &ae) {
		t.Fatalf("error = %v, want an APIError", err)
	}
	if diff := cmp.Diff(ae, &client.APIError{Status: status, Code: code, Message: msg}); diff != "" {
		t.Errorf("error (-got +want):\n%s", diff)
	}
}

// probeAgent returns an agent holding the given live grants.
func probeAgent(grants ...*grant) *Agent {
	a := &Agent{log: discardLogger(), grants: make(map[string]*grant), ended: make(map[string]endedGrant), changed: make(chan struct{})}
	for _, g := range grants {
		a.grants[g.id] = g
	}
	return a
}

func TestProbeChoosesLongestTunnel(t *testing.T) {
	t.Parallel()
	now := time.Now()
	mk := func(id, target string, up bool, expires time.Time) (*grant, *fakeTunnel) {
		ft := &fakeTunnel{closed: make(chan struct{}), dst: netip.MustParseAddrPort("100.80.0.1:22")}
		return &grant{id: id, up: up, tun: ft, dst: ft.dst, info: wire.Tunnel{Request: id, Target: target, ExpiresAt: expires}}, ft
	}
	short, shortTun := mk("r1", "db", true, now.Add(time.Minute))
	long, longTun := mk("r2", "db", true, now.Add(time.Hour))
	down, downTun := mk("r3", "db", false, now.Add(2*time.Hour))
	other, otherTun := mk("r4", "web", true, now.Add(3*time.Hour))
	a := probeAgent(short, long, down, other)

	got, err := a.Probe(t.Context(), "db", 0)
	if err != nil {
		t.Fatal(err)
	}
	if !got.Connected {
		t.Errorf("probe = %+v, want connected", got)
	}
	for name, tt := range map[string]struct {
		ft   *fakeTunnel
		want int
	}{"short": {shortTun, 0}, "long": {longTun, 1}, "down": {downTun, 0}, "other": {otherTun, 0}} {
		if n := len(tt.ft.dialed()); n != tt.want {
			t.Errorf("%s tunnel dialed %d times, want %d", name, n, tt.want)
		}
	}
}

func TestProbeErrors(t *testing.T) {
	t.Parallel()
	ft := &fakeTunnel{closed: make(chan struct{}), dst: netip.MustParseAddrPort("100.80.0.1:22")}
	closedTun := &fakeTunnel{closed: make(chan struct{}), dst: ft.dst}
	closedTun.Close()
	a := probeAgent(
		&grant{id: "r1", up: true, tun: ft, dst: ft.dst, info: wire.Tunnel{Target: "db"}},
		&grant{id: "r2", up: true, tun: closedTun, dst: ft.dst, info: wire.Tunnel{Target: "gone"}},
	)
	cancelled, cancel := context.WithCancel(t.Context())
	cancel()
	tests := []struct {
		name      string
		ctx       context.Context
		target    string
		port      int
		wantErr   string
		noTunnel  bool
		cancelled bool
	}{
		{name: "err/port-negative", target: "db", port: -1, wantErr: "port -1 is not between 1 and 65535"},
		{name: "err/port-too-large", target: "db", port: 65536, wantErr: "port 65536 is not between 1 and 65535"},
		{name: "err/no-tunnel", target: "nope", wantErr: "no live tunnel to nope", noTunnel: true},
		{name: "err/tunnel-closed", target: "gone", wantErr: "no live tunnel to gone: it closed during the probe", noTunnel: true},
		{name: "err/cancelled", ctx: cancelled, target: "db", port: hangPort, wantErr: "context canceled", cancelled: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx := tt.ctx
			if ctx == nil {
				ctx = t.Context()
			}
			_, err := a.Probe(ctx, tt.target, tt.port)
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("Probe = %v, want an error containing %q", err, tt.wantErr)
			}
			if got := errors.Is(err, localapi.ErrNoTunnel); got != tt.noTunnel {
				t.Errorf("errors.Is(ErrNoTunnel) = %v, want %v", got, tt.noTunnel)
			}
			if got := errors.Is(err, context.Canceled); got != tt.cancelled {
				t.Errorf("errors.Is(context.Canceled) = %v, want %v", got, tt.cancelled)
			}
		})
	}
}

func TestIsRefused(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		err  error
		want bool
	}{
		{"yes/kernel", &net.OpError{Op: "dial", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}, true},
		{"yes/gvisor-wrapped", fmt.Errorf("tunnel: dialing 10.0.0.1:5432: %w", &net.OpError{Op: "connect", Err: errors.New(gvisorRefused)}), true},
		{"no/timeout", &net.OpError{Op: "dial", Err: context.DeadlineExceeded}, false},
		{"no/reset-text-without-op-error", errors.New(gvisorRefused), false},
		{"no/other-gvisor-error", &net.OpError{Op: "connect", Err: errors.New("host is unreachable")}, false},
		{"no/nil", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := isRefused(tt.err); got != tt.want {
				t.Errorf("isRefused(%v) = %v, want %v", tt.err, got, tt.want)
			}
		})
	}
}

// gatewayIP is the target address the far end owns in TestProbeUserspace.
var gatewayIP = netip.MustParseAddr("100.127.0.1")

// farEnd is a stock wireguard-go netstack that owns gatewayIP and serves TCP
// on one port; like the gateway, it resets connections to any other port.
// It returns its UDP port and public key.
func farEnd(t *testing.T, agentKey wgkey.Public, agentAddr netip.Addr, port uint16) (int, wgkey.Public) {
	t.Helper()
	key, err := wgkey.NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	tdev, tnet, err := netstack.CreateNetTUN([]netip.Addr{gatewayIP}, nil, tunnel.DefaultMTU)
	if err != nil {
		t.Fatal(err)
	}
	dev := device.NewDevice(tdev, conn.NewDefaultBind(), &device.Logger{Verbosef: device.DiscardLogf, Errorf: device.DiscardLogf})
	t.Cleanup(dev.Close)
	conf := fmt.Sprintf("private_key=%s\nlisten_port=0\npublic_key=%s\nallowed_ip=%s/32\n", key.UAPIHex(), agentKey.UAPIHex(), agentAddr)
	if err := dev.IpcSet(conf); err != nil {
		t.Fatal(err)
	}
	if err := dev.Up(); err != nil {
		t.Fatal(err)
	}
	got, err := dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	udpPort := 0
	for line := range strings.Lines(got) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "listen_port="); ok {
			udpPort, _ = strconv.Atoi(v)
		}
	}
	if udpPort == 0 {
		t.Fatalf("no listen port in %q", got)
	}
	ln, err := tnet.ListenTCPAddrPort(netip.AddrPortFrom(gatewayIP, port))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	return udpPort, key.Public()
}

// realTunnel brings a tunnel.Userspace up towards the gateway at endpoint.
func realTunnel(t *testing.T, key wgkey.Private, addr netip.Addr, peer wgkey.Public, endpoint netip.AddrPort) *tunnel.Userspace {
	t.Helper()
	u, err := tunnel.New(tunnel.Config{
		PrivateKey: key, Address: addr, Peer: peer, Endpoint: endpoint,
		AllowedIP: netip.PrefixFrom(gatewayIP, 32), Logger: discardLogger(),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { u.Close() })
	return u
}

// TestProbeUserspace probes through a real userspace WireGuard tunnel, so the
// refusal is gVisor's own reset and error.
func TestProbeUserspace(t *testing.T) {
	t.Parallel()
	agentAddr := netip.MustParseAddr("100.64.0.2")
	key, err := wgkey.NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	udpPort, gwPub := farEnd(t, key.Public(), agentAddr, 22)
	live := realTunnel(t, key, agentAddr, gwPub, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(udpPort)))

	// A gateway that never answers: its UDP socket is open but unread.
	silent, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { silent.Close() })
	key2, err := wgkey.NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	dead := realTunnel(t, key2, agentAddr, gwPub, silent.LocalAddr().(*net.UDPAddr).AddrPort())

	granted := netip.AddrPortFrom(gatewayIP, 22)
	a := probeAgent(
		&grant{id: "r1", up: true, tun: live, dst: granted, info: wire.Tunnel{Target: "db"}},
		&grant{id: "r2", up: true, tun: dead, dst: granted, info: wire.Tunnel{Target: "silent"}},
		&grant{id: "r3", up: true, tun: live, dst: netip.AddrPortFrom(gatewayIP, 23), info: wire.Tunnel{Target: "down"}},
	)
	tests := []struct {
		name    string
		target  string
		port    int
		timeout time.Duration
		want    wire.LocalProbe
	}{
		{"ok/granted", "db", 0, 10 * time.Second, wire.LocalProbe{Target: "db", Destination: "100.127.0.1:22", Port: 22, Connected: true}},
		{"refused/other-port", "db", 5432, 10 * time.Second, wire.LocalProbe{Target: "db", Destination: "100.127.0.1:5432", Port: 5432, Error: wire.ProbeRefused}},
		{"refused/granted-port-down", "down", 0, 10 * time.Second, wire.LocalProbe{Target: "down", Destination: "100.127.0.1:23", Port: 23, Error: probeRefusedGranted}},
		{"timeout/no-gateway", "silent", 22, 200 * time.Millisecond, wire.LocalProbe{Target: "silent", Destination: "100.127.0.1:22", Port: 22, Error: wire.ProbeTimedOut}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithTimeout(t.Context(), tt.timeout)
			defer cancel()
			got, err := a.Probe(ctx, tt.target, tt.port)
			if err != nil {
				t.Fatalf("Probe: %v", err)
			}
			if diff := cmp.Diff(got, tt.want); diff != "" {
				t.Errorf("probe (-got +want):\n%s", diff)
			}
		})
	}
}
