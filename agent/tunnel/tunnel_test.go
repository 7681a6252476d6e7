package tunnel

import (
	"bytes"
	"context"
	"crypto/rand"
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

	"github.com/pinhole-dev/pinhole/internal/testnet"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
)

var (
	targetIP   = netip.MustParseAddr("100.127.0.1")
	echoPort   = uint16(22)
	agentAddr  = netip.MustParseAddr("100.64.0.2")
	targetEcho = netip.AddrPortFrom(targetIP, echoPort)
)

// farEnd stands in for the broker's gateway: a stock wireguard-go netstack
// that owns the target address and serves TCP on it. (The real gateway lives
// in broker/gateway, which agent packages must not import.)
type farEnd struct {
	key  wgkey.Private
	port int
	dev  *device.Device
	net  *netstack.Net
}

func newFarEnd(t *testing.T) *farEnd {
	t.Helper()
	key := mustKey(t)
	tdev, tnet, err := netstack.CreateNetTUN([]netip.Addr{targetIP}, nil, DefaultMTU)
	if err != nil {
		t.Fatal(err)
	}
	dev := device.NewDevice(tdev, conn.NewDefaultBind(), &device.Logger{Verbosef: device.DiscardLogf, Errorf: device.DiscardLogf})
	if err := dev.IpcSet(fmt.Sprintf("private_key=%s\nlisten_port=0\n", key.UAPIHex())); err != nil {
		t.Fatal(err)
	}
	if err := dev.Up(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dev.Close)
	conf, err := dev.IpcGet()
	if err != nil {
		t.Fatal(err)
	}
	f := &farEnd{key: key, dev: dev, net: tnet}
	for line := range strings.Lines(conf) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), "listen_port="); ok {
			f.port, _ = strconv.Atoi(v)
		}
	}
	if f.port == 0 {
		t.Fatalf("no listen port in %q", conf)
	}
	return f
}

func (f *farEnd) addPeer(t *testing.T, pub wgkey.Public, addr netip.Addr) {
	t.Helper()
	if err := f.dev.IpcSet(fmt.Sprintf("public_key=%s\nallowed_ip=%s/32\n", pub.UAPIHex(), addr)); err != nil {
		t.Fatal(err)
	}
}

// serve accepts on the target address and runs handle per connection until
// the test ends.
func (f *farEnd) serve(t *testing.T, port uint16, handle func(net.Conn)) {
	t.Helper()
	ln, err := f.net.ListenTCPAddrPort(netip.AddrPortFrom(targetIP, port))
	if err != nil {
		t.Fatal(err)
	}
	testnet.Serve(t, ln, handle)
}

func echoHandler(c net.Conn) { _, _ = io.Copy(c, c) }

// newPair starts a far end echoing on the target and a Userspace tunnel to it.
func newPair(t *testing.T) (*farEnd, *Userspace) {
	t.Helper()
	f := newFarEnd(t)
	f.serve(t, echoPort, echoHandler)
	key := mustKey(t)
	f.addPeer(t, key.Public(), agentAddr)
	u, err := New(Config{
		PrivateKey: key,
		Address:    agentAddr,
		Peer:       f.key.Public(),
		Endpoint:   netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(f.port)),
		AllowedIP:  netip.PrefixFrom(targetIP, 32),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := u.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return f, u
}

// TestCloseJoinsGoroutines is not parallel: it compares goroutine counts.
func TestCloseJoinsGoroutines(t *testing.T) {
	round := func(t *testing.T) {
		_, u := newPair(t)
		addr, err := u.Listen("127.0.0.1:0", targetEcho)
		if err != nil {
			t.Fatal(err)
		}
		c, err := net.Dial("tcp", addr.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echo(t, c, 4096)
		// Leave the forwarded connection open: Close must end it.
		if err := u.Close(); err != nil {
			t.Fatal(err)
		}
		if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("local connection still open after Close")
		}
		if _, err := u.Listen("127.0.0.1:0", targetEcho); !errors.Is(err, ErrClosed) {
			t.Errorf("Listen after Close: got %v, want ErrClosed", err)
		}
		if _, err := u.DialContext(context.Background(), targetEcho); !errors.Is(err, ErrClosed) {
			t.Errorf("DialContext after Close: got %v, want ErrClosed", err)
		}
	}
	round(t) // warms up lazily started goroutines
	before := runtime.NumGoroutine()
	t.Run("round", round) // runs the far end's cleanups too
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before {
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			t.Fatalf("goroutines: %d before, %d after Close\n%s", before, runtime.NumGoroutine(), buf[:n])
		}
		time.Sleep(10 * time.Millisecond) // polling a count that has no event to wait on
	}
}

func TestDialEcho(t *testing.T) {
	t.Parallel()
	_, u := newPair(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := u.DialContext(ctx, targetEcho)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo(t, c, 1<<20)
}

func TestListenEcho(t *testing.T) {
	t.Parallel()
	_, u := newPair(t)
	addr, err := u.Listen("127.0.0.1:0", targetEcho)
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echo(t, c, 1<<20)

	// A local half-close reaches the far end; its reply still arrives.
	c2, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if err := c2.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Write([]byte("last words")); err != nil {
		t.Fatal(err)
	}
	if err := c2.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c2)
	if err != nil || string(got) != "last words" {
		t.Fatalf("after half-close read %q, %v; want echo then EOF", got, err)
	}
}

func TestListenEndsWhenFlowCut(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		// unread leaves data unread on the far end, so its close is a reset.
		unread bool
	}{
		{"cut/fin", false},
		{"cut/reset", true},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f, u := newPair(t)
			port := uint16(2200 + i)
			cut := make(chan struct{})
			f.serve(t, port, func(c net.Conn) {
				if !tt.unread {
					_, _ = io.ReadFull(c, make([]byte, 5))
				}
				_, _ = c.Write([]byte("hello"))
				<-cut
			})
			addr, err := u.Listen("127.0.0.1:0", netip.AddrPortFrom(targetIP, port))
			if err != nil {
				t.Fatal(err)
			}
			c, err := net.Dial("tcp", addr.String())
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := c.Write([]byte("12345")); err != nil {
				t.Fatal(err)
			}
			if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c, make([]byte, 5)); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			close(cut) // the far end closes the flow
			if err := c.SetReadDeadline(time.Now().Add(time.Second)); err != nil {
				t.Fatal(err)
			}
			_, err = c.Read(make([]byte, 1))
			var ne net.Error
			if err == nil || (errors.As(err, &ne) && ne.Timeout()) {
				t.Fatalf("local read after cut: %v, want EOF or reset within 1s", err)
			}
			t.Logf("local connection ended %v after the cut: %v", time.Since(start), err)
		})
	}
}

func TestRefusesOtherDestinations(t *testing.T) {
	t.Parallel()
	_, u := newPair(t)
	other := netip.MustParseAddrPort("100.127.0.2:22")
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	if c, err := u.DialContext(ctx, other); err == nil {
		c.Close()
		t.Error("DialContext to a non-granted address succeeded")
	} else if ctx.Err() != nil {
		t.Errorf("DialContext to a non-granted address waited for the deadline: %v", err)
	}
	if _, err := u.Listen("127.0.0.1:0", other); err == nil {
		t.Error("Listen for a non-granted address succeeded")
	}
	for _, local := range []string{"0.0.0.0:0", ":0", "[::]:0", "192.0.2.1:0", "example.com:0", "127.0.0.1"} {
		if addr, err := u.Listen(local, targetEcho); err == nil {
			t.Errorf("Listen on non-loopback %q succeeded: %v", local, addr)
		}
	}
	if _, err := u.Listen("[::1]:0", targetEcho); err != nil {
		t.Logf("Listen on [::1]: %v (no IPv6 loopback here?)", err)
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	t.Parallel()
	good := func() Config {
		return Config{
			PrivateKey: mustKey(t),
			Address:    agentAddr,
			Peer:       mustKey(t).Public(),
			Endpoint:   netip.MustParseAddrPort("127.0.0.1:51820"),
			AllowedIP:  netip.MustParsePrefix("100.127.0.1/32"),
		}
	}
	tests := []struct {
		name   string
		mutate func(*Config)
	}{
		{"bad/no-key", func(c *Config) { c.PrivateKey = wgkey.Private{} }},
		{"bad/no-address", func(c *Config) { c.Address = netip.Addr{} }},
		{"bad/no-peer", func(c *Config) { c.Peer = wgkey.Public{} }},
		{"bad/no-endpoint", func(c *Config) { c.Endpoint = netip.AddrPort{} }},
		{"bad/endpoint-port-0", func(c *Config) { c.Endpoint = netip.MustParseAddrPort("127.0.0.1:0") }},
		{"bad/allowed-range", func(c *Config) { c.AllowedIP = netip.MustParsePrefix("100.127.0.0/24") }},
		{"bad/allowed-default", func(c *Config) { c.AllowedIP = netip.MustParsePrefix("0.0.0.0/0") }},
		{"bad/allowed-missing", func(c *Config) { c.AllowedIP = netip.Prefix{} }},
		{"bad/mtu", func(c *Config) { c.MTU = 100 }},
		{"bad/keepalive-negative", func(c *Config) { c.KeepAlive = -time.Second }},
		{"bad/keepalive-huge", func(c *Config) { c.KeepAlive = 100 * time.Hour }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := good()
			tt.mutate(&cfg)
			u, err := New(cfg)
			if err == nil {
				u.Close()
				t.Fatal("New accepted bad config")
			}
		})
	}
	t.Run("ok/good", func(t *testing.T) {
		t.Parallel()
		cfg := good()
		cfg.KeepAlive = 25 * time.Second
		u, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		if err := u.Close(); err != nil {
			t.Fatal(err)
		}
	})
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

// TestDrain: Drain stops new local connections at once, lets a live one
// carry its last words, and returns when it has ended or its time is up.
func TestDrain(t *testing.T) {
	t.Parallel()
	f, u := newPair(t)
	const port = 2210
	bye := make(chan struct{})
	f.serve(t, port, func(c net.Conn) {
		_, _ = c.Write([]byte("hi"))
		<-bye
		_, _ = c.Write([]byte("bye"))
	})
	addr, err := u.Listen("127.0.0.1:0", netip.AddrPortFrom(targetIP, port))
	if err != nil {
		t.Fatal(err)
	}
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadFull(c, make([]byte, 2)); err != nil {
		t.Fatal(err)
	}

	// Time runs out while the connection is still open.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	if u.Drain(ctx) {
		t.Error("Drain reported no connections left while one was open")
	}
	cancel()
	if c2, err := net.DialTimeout("tcp", addr.String(), time.Second); err == nil {
		c2.Close()
		t.Error("local listener still accepts after Drain")
	}

	// The far end says goodbye and closes: the words arrive, Drain returns.
	drained := make(chan bool, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		drained <- u.Drain(ctx)
	}()
	close(bye)
	got, err := io.ReadAll(c)
	if string(got) != "bye" {
		t.Fatalf("read %q, %v after goodbye; want \"bye\"", got, err)
	}
	c.Close()
	if !<-drained {
		t.Error("Drain timed out after the last connection ended")
	}
}
