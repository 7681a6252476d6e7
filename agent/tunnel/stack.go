package tunnel

import (
	"context"
	"fmt"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"

	"github.com/pinhole-dev/pinhole/internal/netstacktun"
)

const (
	// nicID is the stack's only NIC.
	nicID = 1
	// queueLen is the stack's outbound packet queue (as in wireguard-go's
	// stock netstack).
	queueLen = 1024
)

// netStack is the agent's end of a tunnel: a gVisor TCP/IP stack that owns
// the agent's tunnel address, joined to the WireGuard device through a
// netstacktun.Device. It carries TCP only.
type netStack struct {
	s   *stack.Stack
	ep  *channel.Endpoint
	dev *netstacktun.Device
}

func newNetStack(addr netip.Addr, mtu int) (*netStack, error) {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol},
		HandleLocal:        true,
	})
	fail := func(what string, terr tcpip.Error) (*netStack, error) {
		s.Destroy()
		return nil, fmt.Errorf("tunnel: %s: %s", what, terr)
	}
	sack := tcpip.TCPSACKEnabled(true)
	if terr := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); terr != nil {
		return fail("enabling TCP SACK", terr)
	}
	ep := channel.New(queueLen, uint32(mtu), "")
	if terr := s.CreateNIC(nicID, ep); terr != nil {
		ep.Close()
		return fail("creating NIC", terr)
	}
	proto, route := tcpip.NetworkProtocolNumber(ipv4.ProtocolNumber), header.IPv4EmptySubnet
	if addr.Is6() {
		proto, route = ipv6.ProtocolNumber, header.IPv6EmptySubnet
	}
	pa := tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(addr.AsSlice()).WithPrefix()}
	if terr := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); terr != nil {
		ep.Close()
		return fail("adding the tunnel address", terr)
	}
	s.SetRouteTable([]tcpip.Route{{Destination: route, NIC: nicID}})
	return &netStack{s: s, ep: ep, dev: netstacktun.New(ep, queueLen, mtu, "pinhole")}, nil
}

// dial opens a TCP connection to dst through the stack.
func (n *netStack) dial(ctx context.Context, dst netip.AddrPort) (*gonet.TCPConn, error) {
	proto := tcpip.NetworkProtocolNumber(ipv4.ProtocolNumber)
	if dst.Addr().Is6() {
		proto = ipv6.ProtocolNumber
	}
	fa := tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(dst.Addr().AsSlice()), Port: dst.Port()}
	return gonet.DialContextTCP(ctx, n.s, fa, proto)
}

// close tears the stack down and waits for its goroutines; call it after the
// WireGuard device (which closes n.dev) is closed.
func (n *netStack) close() {
	n.s.Destroy()
	n.ep.Close()
}
