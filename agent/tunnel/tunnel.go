// Package tunnel is the agent's WireGuard client in userspace: a wireguard-go
// device over a gVisor netstack with exactly one peer, the broker's gateway,
// whose allowed IPs are the single granted target address. It needs no root
// and no TUN device. Connections reach the target either by DialContext or
// through a local TCP listener (Listen) that ordinary tools such as ssh or
// psql connect to.
package tunnel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"

	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wglog"
)

const (
	// DefaultMTU is the tunnel MTU used when Config.MTU is zero.
	DefaultMTU = 1420
	// MinMTU and MaxMTU bound Config.MTU. 1280 is the IPv6 minimum.
	MinMTU = 1280
	MaxMTU = 9000
	// MaxKeepAlive bounds Config.KeepAlive (the UAPI field is 16 bits of
	// seconds).
	MaxKeepAlive = 65535 * time.Second

	// dialTimeout bounds one dial through the tunnel for Listen.
	dialTimeout = 10 * time.Second
	// minAcceptBackoff and maxAcceptBackoff bound the pause after a failed
	// Accept on a local listener.
	minAcceptBackoff = 5 * time.Millisecond
	maxAcceptBackoff = time.Second
	// drainPoll is how often Drain looks whether connections are left.
	drainPoll = 10 * time.Millisecond
)

// ErrClosed is returned by methods called after Close.
var ErrClosed = errors.New("tunnel: closed")

// Config configures a Userspace tunnel. Every field except Logger, MTU and
// KeepAlive is required.
type Config struct {
	// PrivateKey is the agent's WireGuard key for this grant.
	PrivateKey wgkey.Private
	// Address is the agent's tunnel address, assigned by the broker.
	Address netip.Addr
	// Peer is the gateway's public key.
	Peer wgkey.Public
	// Endpoint is the gateway's UDP address.
	Endpoint netip.AddrPort
	// AllowedIP is the granted target's tunnel address; it must be a single
	// address (/32 or /128). Nothing else enters the tunnel.
	AllowedIP netip.Prefix
	// MTU is the tunnel MTU; 0 means DefaultMTU.
	MTU int
	// KeepAlive is WireGuard's persistent keepalive interval, rounded down
	// to whole seconds; 0 turns it off.
	KeepAlive time.Duration
	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger
}

func (c *Config) validate() error {
	var errs []error
	if c.PrivateKey.IsZero() {
		errs = append(errs, errors.New("private key is required"))
	}
	if !c.Address.IsValid() || c.Address.IsUnspecified() || c.Address.IsMulticast() || c.Address.Zone() != "" {
		errs = append(errs, fmt.Errorf("invalid tunnel address %v", c.Address))
	}
	if c.Peer.IsZero() {
		errs = append(errs, errors.New("peer key is required"))
	}
	if !c.Endpoint.IsValid() || c.Endpoint.Port() == 0 || c.Endpoint.Addr().IsUnspecified() {
		errs = append(errs, fmt.Errorf("invalid gateway endpoint %v", c.Endpoint))
	}
	if !c.AllowedIP.IsValid() || !c.AllowedIP.IsSingleIP() {
		errs = append(errs, fmt.Errorf("allowed IP %v must be a single address (/32 or /128)", c.AllowedIP))
	}
	if c.MTU != 0 && (c.MTU < MinMTU || c.MTU > MaxMTU) {
		errs = append(errs, fmt.Errorf("MTU %d outside [%d, %d]", c.MTU, MinMTU, MaxMTU))
	}
	if c.KeepAlive < 0 || c.KeepAlive > MaxKeepAlive {
		errs = append(errs, fmt.Errorf("keepalive %v outside [0, %v]", c.KeepAlive, MaxKeepAlive))
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("tunnel: invalid config: %w", err)
	}
	return nil
}

// Userspace is a running userspace tunnel. Its methods are safe for
// concurrent use.
type Userspace struct {
	log    *slog.Logger
	target netip.Prefix
	dev    *device.Device
	ns     *netStack

	// lifetime is the parent of every dial Listen makes; Close cancels it.
	lifetime context.Context
	stop     context.CancelFunc

	mu        sync.Mutex
	closed    bool
	listeners map[net.Listener]struct{}
	conns     map[net.Conn]struct{}
	wg        sync.WaitGroup
}

// New creates the tunnel and brings its device up. The WireGuard handshake
// happens on the first packet.
func New(cfg Config) (*Userspace, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	addr := cfg.Address.Unmap()
	ns, err := newNetStack(addr, mtu)
	if err != nil {
		return nil, err
	}
	dev := device.NewDevice(ns.dev, conn.NewDefaultBind(), wglog.New(log))

	var b strings.Builder
	fmt.Fprintf(&b, "private_key=%s\n", cfg.PrivateKey.UAPIHex())
	fmt.Fprintf(&b, "public_key=%s\n", cfg.Peer.UAPIHex())
	fmt.Fprintf(&b, "endpoint=%s\n", cfg.Endpoint)
	fmt.Fprintf(&b, "persistent_keepalive_interval=%d\n", int(cfg.KeepAlive/time.Second))
	fmt.Fprintf(&b, "replace_allowed_ips=true\nallowed_ip=%s\n", cfg.AllowedIP.Masked())
	if err := dev.IpcSet(b.String()); err != nil {
		dev.Close()
		ns.close()
		return nil, fmt.Errorf("tunnel: configuring device: %w", err)
	}
	if err := dev.Up(); err != nil {
		dev.Close()
		ns.close()
		return nil, fmt.Errorf("tunnel: bringing device up: %w", err)
	}
	u := &Userspace{
		log:       log,
		target:    cfg.AllowedIP.Masked(),
		dev:       dev,
		ns:        ns,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[net.Conn]struct{}),
	}
	u.lifetime, u.stop = context.WithCancel(context.Background())
	log.Info("tunnel up", "addr", addr, "gateway", cfg.Endpoint, "target", u.target)
	return u, nil
}

// DialContext opens a TCP connection through the tunnel to dst, which must be
// the granted target address.
func (u *Userspace) DialContext(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	if err := u.checkDst(dst); err != nil {
		return nil, err
	}
	u.mu.Lock()
	closed := u.closed
	u.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	c, err := u.ns.dial(ctx, netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()))
	if err != nil {
		return nil, fmt.Errorf("tunnel: dialing %v: %w", dst, err)
	}
	return c, nil
}

// checkDst fails fast for destinations the tunnel cannot reach: anything but
// the granted target would never enter it and a dial would only time out.
func (u *Userspace) checkDst(dst netip.AddrPort) error {
	if !dst.IsValid() || dst.Port() == 0 || !u.target.Contains(dst.Addr().Unmap()) {
		return fmt.Errorf("tunnel: %v is not a port on the granted target %v", dst, u.target.Addr())
	}
	return nil
}

// checkLoopback accepts "ip:port" with a loopback ip, or "localhost:port".
func checkLoopback(local string) error {
	host, _, err := net.SplitHostPort(local)
	if err != nil {
		return fmt.Errorf("tunnel: local address %q: %w", local, err)
	}
	if host == "localhost" {
		return nil
	}
	ip, err := netip.ParseAddr(host)
	if err != nil || !ip.Unmap().IsLoopback() {
		return fmt.Errorf("tunnel: local address %q is not a loopback address", local)
	}
	return nil
}

// Listen accepts TCP connections on local, a loopback address and port (for
// example "127.0.0.1:0"), and carries each one through the tunnel to dst,
// until Close. It returns the bound address. Other local addresses are
// refused: the grant is for this workstation, not its network. When the tunnel side of a connection ends (the gateway
// closed it or reset it), the local connection is closed, so a client such as
// ssh exits; a half-close from the local client is passed on.
func (u *Userspace) Listen(local string, dst netip.AddrPort) (net.Addr, error) {
	if err := u.checkDst(dst); err != nil {
		return nil, err
	}
	if err := checkLoopback(local); err != nil {
		return nil, err
	}
	var lc net.ListenConfig
	ln, err := lc.Listen(u.lifetime, "tcp", local)
	if err != nil {
		return nil, fmt.Errorf("tunnel: listening on %s: %w", local, err)
	}
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		_ = ln.Close()
		return nil, ErrClosed
	}
	u.listeners[ln] = struct{}{}
	u.wg.Add(1)
	u.mu.Unlock()
	go u.accept(ln, dst)
	u.log.Info("forwarding", "local", ln.Addr().String(), "dst", dst)
	return ln.Addr(), nil
}

func (u *Userspace) accept(ln net.Listener, dst netip.AddrPort) {
	defer u.wg.Done()
	defer func() {
		u.mu.Lock()
		delete(u.listeners, ln)
		u.mu.Unlock()
		_ = ln.Close()
	}()
	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if errors.Is(err, net.ErrClosed) || u.lifetime.Err() != nil {
				return
			}
			// Out of descriptors and the like: back off and retry, as
			// net/http does, rather than stop forwarding.
			backoff = min(max(2*backoff, minAcceptBackoff), maxAcceptBackoff)
			u.log.Warn("accepting local connection", "local", ln.Addr().String(), "err", err, "retry_in", backoff)
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-u.lifetime.Done():
				t.Stop()
				return
			}
			continue
		}
		backoff = 0
		if !u.track(c) {
			_ = c.Close()
			continue
		}
		u.wg.Add(1)
		go u.forward(c, dst)
	}
}

// forward carries one local connection through the tunnel.
func (u *Userspace) forward(local net.Conn, dst netip.AddrPort) {
	defer u.wg.Done()
	defer u.untrack(local)
	defer local.Close()

	ctx, cancel := context.WithTimeout(u.lifetime, dialTimeout)
	remote, err := u.DialContext(ctx, dst)
	cancel()
	if err != nil {
		u.log.Warn("forwarded connection failed", "local", local.RemoteAddr().String(), "dst", dst, "err", err)
		return
	}
	if !u.track(remote) {
		_ = remote.Close()
		return
	}
	defer u.untrack(remote)
	up, down, err := pipe(local, remote)
	u.log.Debug("forwarded connection ended", "dst", dst, "bytes_up", up, "bytes_down", down, "err", err)
}

func (u *Userspace) track(c net.Conn) bool {
	u.mu.Lock()
	defer u.mu.Unlock()
	if u.closed {
		return false
	}
	u.conns[c] = struct{}{}
	return true
}

func (u *Userspace) untrack(c net.Conn) {
	u.mu.Lock()
	defer u.mu.Unlock()
	delete(u.conns, c)
}

// Drain stops accepting local connections and waits until every forwarded
// connection has ended by itself or ctx is done. It reports whether none is
// left. The tunnel still carries what remains; Close ends it.
func (u *Userspace) Drain(ctx context.Context) bool {
	u.mu.Lock()
	lns := make([]net.Listener, 0, len(u.listeners))
	for ln := range u.listeners {
		lns = append(lns, ln)
	}
	u.mu.Unlock()
	for _, ln := range lns {
		_ = ln.Close()
	}
	t := time.NewTicker(drainPoll)
	defer t.Stop()
	for {
		u.mu.Lock()
		n := len(u.conns)
		u.mu.Unlock()
		if n == 0 {
			return true
		}
		select {
		case <-ctx.Done():
			return false
		case <-t.C:
		}
	}
}

// Close closes the listeners and every forwarded connection, waits for their
// goroutines and shuts the device down. Connections returned by DialContext
// end with the device. Calling Close again returns nil.
func (u *Userspace) Close() error {
	u.mu.Lock()
	if u.closed {
		u.mu.Unlock()
		return nil
	}
	u.closed = true
	lns := make([]net.Listener, 0, len(u.listeners))
	for ln := range u.listeners {
		lns = append(lns, ln)
	}
	conns := make([]net.Conn, 0, len(u.conns))
	for c := range u.conns {
		conns = append(conns, c)
	}
	u.mu.Unlock()

	u.stop()
	for _, ln := range lns {
		_ = ln.Close()
	}
	for _, c := range conns {
		_ = c.Close()
	}
	u.wg.Wait()
	u.dev.Close()
	u.ns.close()
	u.log.Info("tunnel closed")
	return nil
}
