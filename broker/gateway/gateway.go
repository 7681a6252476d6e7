// Package gateway is the broker's WireGuard data plane in userspace.
//
// A wireguard-go device on a real UDP socket feeds a gVisor network stack of
// our own. The stack runs in promiscuous mode with a TCP forwarder, so an
// agent can connect to ANY destination address through its tunnel; for every
// SYN the gateway asks a decision callback, which either refuses the
// connection (the agent sees a reset) or returns the Handler that serves it.
// UDP, ICMP and everything else that is not TCP is dropped before it reaches
// the stack.
//
// Each peer owns one tunnel address (a /32 or /128). WireGuard's cryptokey
// routing drops packets whose source is not the sending peer's address, so
// the source of a flow identifies the peer. The gateway tracks every live
// flow by source address, so CloseFlows and RemovePeer cut them at once.
package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/pinhole-dev/pinhole/internal/netstacktun"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wglog"
)

const (
	// DefaultMTU is the tunnel MTU used when Config.MTU is zero.
	DefaultMTU = 1420
	// MinMTU and MaxMTU bound Config.MTU. 1280 is the IPv6 minimum.
	MinMTU = 1280
	MaxMTU = 9000

	nicID = 1
	// maxInFlight bounds concurrent connection attempts waiting for a
	// decision; further SYNs are ignored (the agent retransmits).
	maxInFlight = 512
	// outboundQueueLen is the stack's outbound packet queue (as in
	// wireguard-go's netstack).
	outboundQueueLen = 1024
	// decideTimeout bounds one call to Config.Decide.
	decideTimeout = 10 * time.Second
	// flushTimeout bounds how long RemovePeer waits for the resets of cut
	// flows to leave before the peer is removed.
	flushTimeout = 250 * time.Millisecond

	// TCP backstops on forwarded endpoints, for agents that vanish without
	// the gateway removing their peer.
	keepaliveIdle     = 30 * time.Second
	keepaliveInterval = 10 * time.Second
	keepaliveCount    = 3
	userTimeout       = 60 * time.Second
)

var (
	// ErrClosed is returned by methods called after Close.
	ErrClosed = errors.New("gateway: closed")
	// ErrUnknownPeer is returned by RemovePeer for a key that is not a peer.
	ErrUnknownPeer = errors.New("gateway: unknown peer")
	// ErrPeerConflict is returned by AddPeer when the key is already a peer
	// with another address, or the address already belongs to another peer.
	ErrPeerConflict = errors.New("gateway: peer conflict")
)

// uapiNameRE is what Config.UAPIName may be: an interface-like name, so the
// socket path cannot leave /var/run/wireguard.
var uapiNameRE = regexp.MustCompile(`^[A-Za-z0-9_=+.-]{1,15}$`)

// CheckUAPIName reports whether name may be a Config.UAPIName.
func CheckUAPIName(name string) error {
	if !uapiNameRE.MatchString(name) {
		return fmt.Errorf("UAPI name %q: want 1-15 letters, digits or '_', '=', '+', '.', '-'", name)
	}
	return nil
}

// Flow is one TCP connection attempt through the tunnel.
type Flow struct {
	// Src is the agent's tunnel address and port.
	Src netip.AddrPort
	// Dst is the address and port the agent dialed.
	Dst netip.AddrPort
}

// Handler serves one allowed flow; it owns conn. ctx is cancelled when the
// flow is closed by the gateway (CloseFlows, RemovePeer, Close); the gateway
// also closes conn then and after the Handler returns. A Handler must return
// soon after ctx is done. Every Handler Decide returns is called exactly once:
// when the connection could not be completed (the agent went away during the
// handshake, the peer was removed meanwhile) ctx is already done and conn
// already closed, so the Handler can release what Decide acquired.
type Handler func(ctx context.Context, conn net.Conn)

// Config configures a Gateway.
type Config struct {
	// PrivateKey is the gateway's WireGuard key. Required.
	PrivateKey wgkey.Private
	// ListenPort is the UDP port to listen on (all addresses, IPv4 and
	// IPv6); 0 picks a free one (see Gateway.ListenPort).
	ListenPort int
	// MTU is the tunnel MTU; 0 means DefaultMTU.
	MTU int
	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger
	// Decide is called once per SYN, in its own goroutine, with a context
	// that ends after a bounded time or when the gateway closes. An error or
	// a nil Handler refuses the connection with a reset. Required.
	Decide func(ctx context.Context, f Flow) (Handler, error)
	// UAPIName, when set, serves wireguard-go's UAPI socket at
	// /var/run/wireguard/<UAPIName>.sock so `wg show <UAPIName>` works (this
	// needs write access there, normally root). The socket accepts `wg set`
	// too; it is created with mode 0600. Empty means no socket.
	UAPIName string
}

// Gateway is a running userspace WireGuard data plane. Its methods are safe
// for concurrent use.
type Gateway struct {
	log    *slog.Logger
	decide func(context.Context, Flow) (Handler, error)
	pub    wgkey.Public
	port   int

	dev   *device.Device
	bind  *watchBind
	tun   *netstacktun.Device
	stack *stack.Stack
	link  *channel.Endpoint
	uapi  *uapiServer

	// lifetime is the parent of every decision and flow context; Close
	// cancels it. It is a lifetime, not a request context.
	lifetime context.Context
	stop     context.CancelFunc

	// peerMu serialises AddPeer and RemovePeer so the device and the maps
	// below change together. Taken before mu.
	peerMu sync.Mutex

	mu     sync.Mutex
	closed bool
	peers  map[wgkey.Public]netip.Addr
	owners map[netip.Addr]wgkey.Public
	flows  map[netip.Addr]map[*flow]struct{}
	// wg counts forwarder goroutines that passed the closed check.
	wg sync.WaitGroup
}

// New creates the gateway and brings its device up.
func New(cfg Config) (*Gateway, error) {
	if cfg.PrivateKey.IsZero() {
		return nil, errors.New("gateway: private key is required")
	}
	if cfg.Decide == nil {
		return nil, errors.New("gateway: Decide is required")
	}
	if cfg.ListenPort < 0 || cfg.ListenPort > 65535 {
		return nil, fmt.Errorf("gateway: listen port %d out of range", cfg.ListenPort)
	}
	mtu := cfg.MTU
	if mtu == 0 {
		mtu = DefaultMTU
	}
	if mtu < MinMTU || mtu > MaxMTU {
		return nil, fmt.Errorf("gateway: MTU %d outside [%d, %d]", mtu, MinMTU, MaxMTU)
	}
	if err := CheckUAPIName(cfg.UAPIName); cfg.UAPIName != "" && err != nil {
		return nil, fmt.Errorf("gateway: %w", err)
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	g := &Gateway{
		log:    log,
		decide: cfg.Decide,
		pub:    cfg.PrivateKey.Public(),
		peers:  make(map[wgkey.Public]netip.Addr),
		owners: make(map[netip.Addr]wgkey.Public),
		flows:  make(map[netip.Addr]map[*flow]struct{}),
	}
	g.lifetime, g.stop = context.WithCancel(context.Background())

	if err := g.startStack(mtu); err != nil {
		g.stop()
		return nil, err
	}
	g.tun = netstacktun.New(g.link, outboundQueueLen, mtu, "pinhole-gw")
	g.bind = newWatchBind(conn.NewDefaultBind())
	g.dev = device.NewDevice(g.tun, g.bind, wglog.New(log))

	var b strings.Builder
	fmt.Fprintf(&b, "private_key=%s\nlisten_port=%d\n", cfg.PrivateKey.UAPIHex(), cfg.ListenPort)
	if err := g.dev.IpcSet(b.String()); err != nil {
		g.teardown()
		return nil, fmt.Errorf("gateway: configuring device: %w", err)
	}
	if err := g.dev.Up(); err != nil {
		g.teardown()
		return nil, fmt.Errorf("gateway: bringing device up: %w", err)
	}
	port, err := listenPort(g.dev)
	if err != nil {
		g.teardown()
		return nil, err
	}
	g.port = port

	if cfg.UAPIName != "" {
		u, err := serveUAPI(cfg.UAPIName, g.dev, log)
		if err != nil {
			g.teardown()
			return nil, fmt.Errorf("gateway: UAPI socket %q: %w", cfg.UAPIName, err)
		}
		g.uapi = u
	}
	log.Info("gateway up", "listen_port", port, "public_key", g.pub.String(), "mtu", mtu)
	return g, nil
}

func (g *Gateway) startStack(mtu int) error {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
		// Must be false with promiscuous mode: with true every source counts
		// as local and every inbound packet is dropped.
		HandleLocal: false,
	})
	fail := func(what string, terr tcpip.Error) error {
		s.Destroy()
		return fmt.Errorf("gateway: %s: %s", what, terr)
	}
	sack := tcpip.TCPSACKEnabled(true)
	if terr := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); terr != nil {
		return fail("enabling TCP SACK", terr)
	}
	link := channel.New(outboundQueueLen, uint32(mtu), "")
	if terr := s.CreateNIC(nicID, link); terr != nil {
		return fail("creating NIC", terr)
	}
	if terr := s.SetPromiscuousMode(nicID, true); terr != nil {
		return fail("promiscuous mode", terr)
	}
	if terr := s.SetSpoofing(nicID, true); terr != nil {
		return fail("spoofing", terr)
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	fwd := tcp.NewForwarder(s, 0, maxInFlight, g.forward)
	s.SetTransportProtocolHandler(tcp.ProtocolNumber, fwd.HandlePacket)
	g.stack = s
	g.link = link
	return nil
}

// teardown releases what New created, for failures inside New.
func (g *Gateway) teardown() {
	g.stop()
	if g.dev != nil {
		g.dev.Close()
	}
	g.stack.Destroy()
	g.link.Close()
}

func listenPort(dev *device.Device) (int, error) {
	conf, err := dev.IpcGet()
	if err != nil {
		return 0, fmt.Errorf("gateway: reading device config: %w", err)
	}
	for line := range strings.Lines(conf) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "listen_port="); ok {
			p, err := strconv.Atoi(v)
			if err != nil {
				return 0, fmt.Errorf("gateway: parsing listen port %q: %w", v, err)
			}
			return p, nil
		}
	}
	return 0, errors.New("gateway: device reported no listen port")
}

// ListenPort returns the UDP port the device listens on.
func (g *Gateway) ListenPort() int { return g.port }

// PublicKey returns the gateway's WireGuard public key.
func (g *Gateway) PublicKey() wgkey.Public { return g.pub }

// AddPeer adds a peer whose only allowed address is addr (as a /32 or /128),
// with persistent keepalive off; its endpoint is learned from its handshake.
// Adding the same key with the same address again is a no-op; a key or an
// address already used otherwise is ErrPeerConflict.
func (g *Gateway) AddPeer(pub wgkey.Public, addr netip.Addr) error {
	addr = addr.Unmap()
	if pub.IsZero() {
		return errors.New("gateway: peer key is zero")
	}
	if pub == g.pub {
		return errors.New("gateway: peer key is the gateway's own key")
	}
	if !addr.IsValid() || addr.IsUnspecified() || addr.IsMulticast() || addr.Zone() != "" {
		return fmt.Errorf("gateway: invalid peer address %v", addr)
	}

	g.peerMu.Lock()
	defer g.peerMu.Unlock()
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return ErrClosed
	}
	if cur, ok := g.peers[pub]; ok {
		g.mu.Unlock()
		if cur == addr {
			return nil
		}
		return fmt.Errorf("%w: key already has address %v", ErrPeerConflict, cur)
	}
	if _, ok := g.owners[addr]; ok {
		g.mu.Unlock()
		return fmt.Errorf("%w: address %v belongs to another peer", ErrPeerConflict, addr)
	}
	g.mu.Unlock()

	prefix := netip.PrefixFrom(addr, addr.BitLen())
	conf := fmt.Sprintf("public_key=%s\nreplace_allowed_ips=true\nallowed_ip=%s\n", pub.UAPIHex(), prefix)
	if err := g.dev.IpcSet(conf); err != nil {
		return fmt.Errorf("gateway: adding peer %v: %w", pub, err)
	}

	g.mu.Lock()
	g.peers[pub] = addr
	g.owners[addr] = pub
	g.mu.Unlock()
	g.log.Info("peer added", "peer", pub.String(), "addr", addr)
	return nil
}

// RemovePeer first closes every live flow from the peer's address with a
// reset and waits (briefly, bounded) until those resets have left through the
// tunnel, so the agent sees its connections end; then it removes the peer.
// New connections from the address are refused from the start of the call.
func (g *Gateway) RemovePeer(pub wgkey.Public) error {
	g.peerMu.Lock()
	defer g.peerMu.Unlock()
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return ErrClosed
	}
	addr, ok := g.peers[pub]
	if !ok {
		g.mu.Unlock()
		return fmt.Errorf("%w: %v", ErrUnknownPeer, pub)
	}
	delete(g.peers, pub)
	delete(g.owners, addr)
	flows := g.takeFlowsLocked(addr)
	g.mu.Unlock()

	for _, f := range flows {
		f.cut()
	}
	if len(flows) > 0 {
		ctx, cancel := context.WithTimeout(g.lifetime, flushTimeout)
		if err := g.flushPeer(ctx, pub); err != nil {
			g.log.Debug("resets may not have reached the peer", "peer", pub.String(), "err", err)
		}
		cancel()
	}
	if err := g.dev.IpcSet(fmt.Sprintf("public_key=%s\nremove=true\n", pub.UAPIHex())); err != nil {
		return fmt.Errorf("gateway: removing peer %v: %w", pub, err)
	}
	g.log.Info("peer removed", "peer", pub.String(), "addr", addr, "flows_closed", len(flows))
	return nil
}

// flushPeer returns once every packet the stack queued for the peer before
// the call has been sent on the wire, or when ctx ends: a barrier through the
// tun queue puts those packets into the peer's send queue, then a keepalive
// queued behind them is watched until it leaves.
func (g *Gateway) flushPeer(ctx context.Context, pub wgkey.Public) error {
	if err := g.tun.Barrier(ctx); err != nil {
		return fmt.Errorf("tun barrier: %w", err)
	}
	ep, err := peerEndpoint(g.dev, pub)
	if err != nil {
		return err
	}
	if ep == "" {
		return errors.New("peer has no endpoint")
	}
	peer := g.dev.LookupPeer(device.NoisePublicKey(pub))
	if peer == nil {
		return errors.New("peer vanished")
	}
	sent, stop := g.bind.watchKeepalive(ep)
	defer stop()
	peer.SendKeepalive()
	select {
	case <-sent:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for keepalive: %w", ctx.Err())
	}
}

// peerEndpoint returns the peer's current endpoint as the device prints it,
// or "" when it has none.
func peerEndpoint(dev *device.Device, pub wgkey.Public) (string, error) {
	conf, err := dev.IpcGet()
	if err != nil {
		return "", fmt.Errorf("reading device config: %w", err)
	}
	want := "public_key=" + pub.UAPIHex()
	in := false
	for line := range strings.Lines(conf) {
		line = strings.TrimSpace(line)
		if strings.HasPrefix(line, "public_key=") {
			in = line == want
			continue
		}
		if v, ok := strings.CutPrefix(line, "endpoint="); ok && in {
			return v, nil
		}
	}
	return "", nil
}

// CloseFlows closes every live flow from the tunnel address addr with a
// reset and cancels its Handler's context; it returns how many it closed.
func (g *Gateway) CloseFlows(addr netip.Addr) int {
	g.mu.Lock()
	flows := g.takeFlowsLocked(addr.Unmap())
	g.mu.Unlock()
	for _, f := range flows {
		f.cut()
	}
	return len(flows)
}

// Peers returns the number of peers.
func (g *Gateway) Peers() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.peers)
}

// Close cuts every flow, stops the UAPI socket, the device and the stack, and
// waits for the goroutines the gateway started (including Handlers).
// wireguard-go's own crypto workers finish shortly after it returns. Calling
// Close again returns nil; the error is reserved and currently always nil.
func (g *Gateway) Close() error {
	g.peerMu.Lock()
	defer g.peerMu.Unlock()
	g.mu.Lock()
	if g.closed {
		g.mu.Unlock()
		return nil
	}
	g.closed = true
	var flows []*flow
	for addr := range g.flows {
		flows = append(flows, g.takeFlowsLocked(addr)...)
	}
	g.mu.Unlock()

	g.stop()
	for _, f := range flows {
		f.cut()
	}
	if g.uapi != nil {
		g.uapi.close()
	}
	g.dev.Close()
	g.stack.Close()
	g.wg.Wait()
	g.stack.Wait()
	g.link.Close()
	g.log.Info("gateway closed")
	return nil
}

var _ io.Closer = (*Gateway)(nil)
