package gateway

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/waiter"
)

// flow is one live, allowed connection.
type flow struct {
	src    netip.Addr
	ep     tcpip.Endpoint
	conn   *flowConn
	cancel context.CancelFunc
}

// cut ends the flow from the gateway's side: the agent gets a reset, the
// Handler's context is cancelled and its connection closed.
func (f *flow) cut() {
	// Linger 0 turns the close into a reset, sent synchronously.
	f.ep.SocketOptions().SetLinger(tcpip.LingerOption{Enabled: true, Timeout: 0})
	f.cancel()
	_ = f.conn.Close()
}

// flowConn is the net.Conn a Handler gets. Close is idempotent, since both
// the Handler and the gateway may close it.
type flowConn struct {
	*gonet.TCPConn
	once sync.Once
}

// Close closes the connection once.
func (c *flowConn) Close() error {
	c.once.Do(func() { _ = c.TCPConn.Close() })
	return nil
}

// forward is the TCP forwarder's callback; gVisor runs it in a new goroutine
// for every SYN.
func (g *Gateway) forward(r *tcp.ForwarderRequest) {
	id := r.ID()
	fl := Flow{
		Src: addrPort(id.RemoteAddress, id.RemotePort),
		Dst: addrPort(id.LocalAddress, id.LocalPort),
	}
	if !g.enter() {
		r.Complete(true)
		return
	}
	defer g.wg.Done()

	if !g.knownSource(fl.Src.Addr()) {
		g.log.Warn("flow refused: source is not a peer address", "src", fl.Src, "dst", fl.Dst)
		r.Complete(true)
		return
	}
	h := g.callDecide(fl)
	if h == nil {
		r.Complete(true)
		return
	}

	var wq waiter.Queue
	ep, terr := r.CreateEndpoint(&wq)
	if terr != nil {
		g.log.Debug("flow handshake failed", "src", fl.Src, "dst", fl.Dst, "err", terr.String())
		r.Complete(true)
		g.serveDead(h, fl)
		return
	}
	r.Complete(false)
	setBackstops(ep)

	ctx, cancel := context.WithCancel(g.lifetime)
	f := &flow{
		src:    fl.Src.Addr(),
		ep:     ep,
		conn:   &flowConn{TCPConn: gonet.NewTCPConn(&wq, ep)},
		cancel: cancel,
	}
	if !g.track(f) {
		f.cut()
		g.serve(ctx, h, f, fl)
		return
	}
	defer g.untrack(f)
	defer cancel()
	defer f.conn.Close()
	g.serve(ctx, h, f, fl)
}

// serve runs the Handler, turning a panic into a closed flow.
func (g *Gateway) serve(ctx context.Context, h Handler, f *flow, fl Flow) {
	defer func() {
		if p := recover(); p != nil {
			g.log.Error("flow handler panicked", "src", fl.Src, "dst", fl.Dst, "panic", fmt.Sprint(p))
		}
	}()
	h(ctx, f.conn)
}

// serveDead calls h for a flow whose connection could not be completed, so
// the Handler can release what Decide acquired: its context is already done
// and its connection closed.
func (g *Gateway) serveDead(h Handler, fl Flow) {
	ctx, cancel := context.WithCancel(g.lifetime)
	cancel()
	c, peer := net.Pipe()
	_ = peer.Close()
	_ = c.Close()
	defer func() {
		if p := recover(); p != nil {
			g.log.Error("flow handler panicked", "src", fl.Src, "dst", fl.Dst, "panic", fmt.Sprint(p))
		}
	}()
	h(ctx, c)
}

// callDecide asks Config.Decide about fl and returns the Handler, or nil when
// the flow is refused (error, nil Handler, timeout or panic).
func (g *Gateway) callDecide(fl Flow) (h Handler) {
	ctx, cancel := context.WithTimeout(g.lifetime, decideTimeout)
	defer cancel()
	defer func() {
		if p := recover(); p != nil {
			g.log.Error("flow decision panicked; refusing", "src", fl.Src, "dst", fl.Dst, "panic", fmt.Sprint(p))
			h = nil
		}
	}()
	h, err := g.decide(ctx, fl)
	if err != nil {
		g.log.Debug("flow refused", "src", fl.Src, "dst", fl.Dst, "err", err)
		return nil
	}
	if h == nil {
		g.log.Debug("flow refused", "src", fl.Src, "dst", fl.Dst)
	}
	return h
}

// enter registers a forwarder goroutine unless the gateway is closed.
func (g *Gateway) enter() bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	g.wg.Add(1)
	return true
}

func (g *Gateway) knownSource(a netip.Addr) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	_, ok := g.owners[a]
	return ok
}

// track records a live flow; it refuses when the gateway is closed or the
// source stopped being a peer address while the flow was being set up.
func (g *Gateway) track(f *flow) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.closed {
		return false
	}
	if _, ok := g.owners[f.src]; !ok {
		return false
	}
	set := g.flows[f.src]
	if set == nil {
		set = make(map[*flow]struct{})
		g.flows[f.src] = set
	}
	set[f] = struct{}{}
	return true
}

func (g *Gateway) untrack(f *flow) {
	g.mu.Lock()
	defer g.mu.Unlock()
	set := g.flows[f.src]
	delete(set, f)
	if len(set) == 0 {
		delete(g.flows, f.src)
	}
}

// takeFlowsLocked removes and returns the flows from addr. g.mu must be held.
func (g *Gateway) takeFlowsLocked(addr netip.Addr) []*flow {
	set := g.flows[addr]
	delete(g.flows, addr)
	out := make([]*flow, 0, len(set))
	for f := range set {
		out = append(out, f)
	}
	return out
}

// setBackstops enables TCP keepalive and a user timeout, so a flow whose
// agent vanished ends by itself even if nobody cuts it.
func setBackstops(ep tcpip.Endpoint) {
	ep.SocketOptions().SetKeepAlive(true)
	idle := tcpip.KeepaliveIdleOption(keepaliveIdle)
	interval := tcpip.KeepaliveIntervalOption(keepaliveInterval)
	user := tcpip.TCPUserTimeoutOption(userTimeout)
	// These options are supported by TCP endpoints; errors are impossible
	// for valid values and would only weaken a backstop.
	_ = ep.SetSockOpt(&idle)
	_ = ep.SetSockOpt(&interval)
	_ = ep.SetSockOpt(&user)
	_ = ep.SetSockOptInt(tcpip.KeepaliveCountOption, keepaliveCount)
}

func addrPort(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip.Unmap(), port)
}
