// Package bench holds the data-plane benchmarks of DESIGN.md's performance
// table that need the agent and the broker together: the real agent/tunnel
// against the real broker/gateway, two wireguard-go devices in one process
// over loopback UDP, and a bare wireguard-go pair as the baseline measured in
// the same run. Everything talks only to loopback and stops when the
// benchmark ends. It runs only with -bench; `make bench` prints the table.
package bench

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"github.com/pinhole-dev/pinhole/agent/tunnel"
	"github.com/pinhole-dev/pinhole/broker/gateway"
	"github.com/pinhole-dev/pinhole/internal/testnet"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
)

var (
	// target is the granted destination the agent dials in the tunnel.
	target = netip.MustParseAddrPort("100.127.0.1:5432")
	// agentAddr is the agent's tunnel address.
	agentAddr = netip.MustParseAddr("100.96.0.2")
)

// The bulk protocol, spoken by client and target over one connection: a
// 9-byte header (op, uint64 big-endian length), then for opUp the client
// sends length bytes and the target answers one byte once it read them all,
// and for opDown the target sends length bytes.
const (
	opUp   = 'U'
	opDown = 'D'
)

var payload = make([]byte, 64<<10)

// serveBulk answers bulk requests on c until the client goes away.
func serveBulk(c net.Conn) {
	var hdr [9]byte
	for {
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		n := int64(binary.BigEndian.Uint64(hdr[1:]))
		switch hdr[0] {
		case opUp:
			if _, err := io.CopyN(io.Discard, c, n); err != nil {
				return
			}
			if _, err := c.Write([]byte{1}); err != nil {
				return
			}
		case opDown:
			if err := writeN(c, n); err != nil {
				return
			}
		default:
			return
		}
	}
}

func writeN(w io.Writer, n int64) error {
	for n > 0 {
		chunk := payload[:min(n, int64(len(payload)))]
		if _, err := w.Write(chunk); err != nil {
			return err
		}
		n -= int64(len(chunk))
	}
	return nil
}

// bulk runs one request of n bytes in direction op on c and returns once
// every byte arrived at the other end.
func bulk(c net.Conn, op byte, n int64) error {
	var hdr [9]byte
	hdr[0] = op
	binary.BigEndian.PutUint64(hdr[1:], uint64(n))
	if _, err := c.Write(hdr[:]); err != nil {
		return err
	}
	switch op {
	case opUp:
		if err := writeN(c, n); err != nil {
			return err
		}
		var ack [1]byte
		_, err := io.ReadFull(c, ack[:])
		return err
	default:
		got, err := io.CopyN(io.Discard, c, n)
		if err != nil {
			return fmt.Errorf("read %d of %d bytes: %w", got, n, err)
		}
		return nil
	}
}

// newTarget starts the bulk target on 127.0.0.1 and returns its address.
func newTarget(b *testing.B) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	testnet.Serve(b, ln, serveBulk)
	return ln.Addr().String()
}

// newGateway starts the broker's gateway. Its decision does what the broker
// does for a granted raw TCP target (broker.decide's default branch): the
// flow must go to the granted destination, then the Handler dials the target
// and splices. (The broker also audits the decision; that is one
// audit append per connection, measured by BenchmarkAuditAppend.)
func newGateway(b *testing.B, backend string) *gateway.Gateway {
	key, err := wgkey.NewPrivate(nil)
	if err != nil {
		b.Fatal(err)
	}
	decide := func(ctx context.Context, f gateway.Flow) (gateway.Handler, error) {
		if f.Dst != target {
			return nil, errors.New("destination not granted")
		}
		return func(ctx context.Context, c net.Conn) {
			d := net.Dialer{Timeout: 10 * time.Second}
			up, err := d.DialContext(ctx, "tcp", backend)
			if err != nil {
				_ = c.Close()
				return
			}
			_, _, _ = gateway.Splice(ctx, c, up)
		}, nil
	}
	gw, err := gateway.New(gateway.Config{PrivateKey: key, Decide: decide})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = gw.Close() })
	return gw
}

// newAgent starts the real agent tunnel for one grant (fresh key, as the
// agent makes per grant), adds it as a peer of gw, and returns it with the
// local listener address a user's tool connects to.
func newAgent(b *testing.B, gw *gateway.Gateway) (*tunnel.Userspace, wgkey.Public, string) {
	key, err := wgkey.NewPrivate(nil)
	if err != nil {
		b.Fatal(err)
	}
	u, err := tunnel.New(tunnel.Config{
		PrivateKey: key, Address: agentAddr, Peer: gw.PublicKey(),
		Endpoint:  netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(gw.ListenPort())),
		AllowedIP: netip.PrefixFrom(target.Addr(), 32),
	})
	if err != nil {
		b.Fatal(err)
	}
	if err := gw.AddPeer(key.Public(), agentAddr); err != nil {
		_ = u.Close()
		b.Fatal(err)
	}
	local, err := u.Listen("127.0.0.1:0", target)
	if err != nil {
		_ = u.Close()
		b.Fatal(err)
	}
	return u, key.Public(), local.String()
}

// newPinhole sets up target, gateway and agent and returns a connection
// from a user's tool (plain TCP to the agent's listener) through the tunnel
// to the target.
func newPinhole(b *testing.B) net.Conn {
	gw := newGateway(b, newTarget(b))
	u, _, local := newAgent(b, gw)
	b.Cleanup(func() { _ = u.Close() })
	c, err := net.Dial("tcp", local)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	return c
}

// wgDevice is one end of the bare pair: stock netstack, stock device.
type wgDevice struct {
	key  wgkey.Private
	dev  *device.Device
	net  *netstack.Net
	port int
}

func newWGDevice(b *testing.B, addr netip.Addr) *wgDevice {
	key, err := wgkey.NewPrivate(nil)
	if err != nil {
		b.Fatal(err)
	}
	tdev, tnet, err := netstack.CreateNetTUN([]netip.Addr{addr}, nil, gateway.DefaultMTU)
	if err != nil {
		b.Fatal(err)
	}
	dev := device.NewDevice(tdev, conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
	b.Cleanup(dev.Close)
	if err := dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\n", key.UAPIHex())); err != nil {
		b.Fatal(err)
	}
	if err := dev.Up(); err != nil {
		b.Fatal(err)
	}
	conf, err := dev.IpcGet()
	if err != nil {
		b.Fatal(err)
	}
	d := &wgDevice{key: key, dev: dev, net: tnet}
	for line := range strings.Lines(conf) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "listen_port="); ok {
			d.port, _ = strconv.Atoi(v)
		}
	}
	if d.port == 0 {
		b.Fatalf("no listen port in device config")
	}
	return d
}

func (d *wgDevice) addPeer(b *testing.B, peer *wgDevice, allowed netip.Addr) {
	conf := fmt.Sprintf("public_key=%s\nendpoint=127.0.0.1:%d\nallowed_ip=%s/32\n", peer.key.Public().UAPIHex(), peer.port, allowed)
	if err := d.dev.IpcSet(conf); err != nil {
		b.Fatal(err)
	}
}

// newBare sets up a bare wireguard-go pair, the far end serving the bulk
// protocol on the target address inside the tunnel, and returns a
// connection dialed in the tunnel.
func newBare(b *testing.B) net.Conn {
	far := newWGDevice(b, target.Addr())
	near := newWGDevice(b, agentAddr)
	far.addPeer(b, near, agentAddr)
	near.addPeer(b, far, target.Addr())
	ln, err := far.net.ListenTCPAddrPort(target)
	if err != nil {
		b.Fatal(err)
	}
	testnet.Serve(b, ln, serveBulk)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := near.net.DialContextTCPAddrPort(ctx, target)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = c.Close() })
	return c
}

// checkGoroutines fails the benchmark when goroutines it started outlive
// its cleanups. Call it first, so its cleanup runs last. wireguard-go's
// workers finish shortly after Device.Close returns, hence the grace.
func checkGoroutines(b *testing.B) {
	before := runtime.NumGoroutine()
	b.Cleanup(func() {
		deadline := time.Now().Add(5 * time.Second)
		for runtime.NumGoroutine() > before {
			if time.Now().After(deadline) {
				buf := make([]byte, 1<<20)
				n := runtime.Stack(buf, true)
				b.Errorf("goroutines: %d before, %d after cleanup\n%s", before, runtime.NumGoroutine(), buf[:n])
				return
			}
			time.Sleep(10 * time.Millisecond) // polling a count that has no event to wait on
		}
	})
}
