package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// tcpPair returns both ends of a loopback TCP connection.
func tcpPair(t *testing.T) (client, server *net.TCPConn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	for _, x := range []net.Conn{c, s} {
		if err := x.SetDeadline(time.Now().Add(10 * time.Second)); err != nil {
			t.Fatal(err)
		}
	}
	return c.(*net.TCPConn), s.(*net.TCPConn)
}

type spliceResult struct {
	aToB, bToA int64
	err        error
}

func startSplice(ctx context.Context, a, b net.Conn) <-chan spliceResult {
	ch := make(chan spliceResult, 1)
	go func() {
		x, y, err := Splice(ctx, a, b)
		ch <- spliceResult{x, y, err}
	}()
	return ch
}

func TestSpliceHalfClose(t *testing.T) {
	t.Parallel()
	c1, s1 := tcpPair(t)
	c2, s2 := tcpPair(t)
	done := startSplice(context.Background(), s1, s2)

	if _, err := c1.Write([]byte("request")); err != nil {
		t.Fatal(err)
	}
	if err := c1.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c2)
	if err != nil || string(got) != "request" {
		t.Fatalf("far side read %q, %v; want request then EOF", got, err)
	}
	// The reply still flows after the half-close.
	if _, err := c2.Write([]byte("reply")); err != nil {
		t.Fatal(err)
	}
	c2.Close()
	got, err = io.ReadAll(c1)
	if err != nil || string(got) != "reply" {
		t.Fatalf("near side read %q, %v; want reply then EOF", got, err)
	}
	r := within(t, done, 5*time.Second, "Splice returning")
	if r.err != nil || r.aToB != 7 || r.bToA != 5 {
		t.Fatalf("Splice = %d, %d, %v; want 7, 5, nil", r.aToB, r.bToA, r.err)
	}
}

func TestSpliceEnds(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		end     func(cancel context.CancelFunc, c1, c2 net.Conn)
		wantErr error // nil: no error; errAny: some error
	}{
		{"ctx-cancelled", func(cancel context.CancelFunc, _, _ net.Conn) { cancel() }, context.Canceled},
		{"one-side-reset", func(_ context.CancelFunc, c1, _ net.Conn) {
			_ = c1.(*net.TCPConn).SetLinger(0)
			_ = c1.Close()
		}, errAny},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c1, s1 := tcpPair(t)
			c2, s2 := tcpPair(t)
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			done := startSplice(ctx, s1, s2)
			// Prove the splice is up before ending it.
			if _, err := c1.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			if _, err := io.ReadFull(c2, make([]byte, 1)); err != nil {
				t.Fatal(err)
			}
			tt.end(cancel, c1, c2)
			r := within(t, done, 5*time.Second, "Splice returning")
			switch {
			case tt.wantErr == errAny && r.err == nil:
				t.Error("Splice returned no error")
			case tt.wantErr != errAny && !errors.Is(r.err, tt.wantErr):
				t.Errorf("Splice error = %v, want %v", r.err, tt.wantErr)
			}
			// Both sides are closed: the far client sees the end.
			if _, err := io.ReadAll(c2); err != nil && !errors.Is(err, net.ErrClosed) {
				t.Logf("far side read ended with %v", err)
			}
		})
	}
}

func TestSpliceWithoutCloseWrite(t *testing.T) {
	t.Parallel()
	a, aPeer := net.Pipe()
	b, bPeer := net.Pipe()
	done := startSplice(context.Background(), a, b)
	go func() {
		_, _ = aPeer.Write([]byte("hi"))
		_ = aPeer.Close()
	}()
	got, _ := io.ReadAll(bPeer)
	if string(got) != "hi" {
		t.Fatalf("read %q, want hi", got)
	}
	r := within(t, done, 5*time.Second, "Splice returning")
	if r.err != nil || r.aToB != 2 {
		t.Fatalf("Splice = %d, %d, %v; want 2, 0, nil", r.aToB, r.bToA, r.err)
	}
}

func FuzzAllowedPacket(f *testing.F) {
	tcp4 := make([]byte, 40)
	header.IPv4(tcp4).Encode(&header.IPv4Fields{TotalLength: 40, Protocol: uint8(header.TCPProtocolNumber), TTL: 64})
	udp4 := make([]byte, 28)
	header.IPv4(udp4).Encode(&header.IPv4Fields{TotalLength: 28, Protocol: uint8(header.UDPProtocolNumber), TTL: 64})
	tcp6 := make([]byte, 60)
	header.IPv6(tcp6).Encode(&header.IPv6Fields{PayloadLength: 20, TransportProtocol: header.TCPProtocolNumber, HopLimit: 64})
	icmp6 := make([]byte, 48)
	header.IPv6(icmp6).Encode(&header.IPv6Fields{PayloadLength: 8, TransportProtocol: header.ICMPv6ProtocolNumber, HopLimit: 64})
	for _, seed := range [][]byte{tcp4, udp4, tcp6, icmp6, {}, {0x45}, {0x00, 1, 2}, {0x60}} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		proto, ok := allowedPacket(p)
		if !ok {
			return
		}
		switch proto {
		case header.IPv4ProtocolNumber:
			if len(p) < header.IPv4MinimumSize || header.IPv4(p).Protocol() != uint8(header.TCPProtocolNumber) {
				t.Fatalf("accepted non-TCP IPv4 packet % x", p)
			}
		case header.IPv6ProtocolNumber:
			if len(p) < header.IPv6MinimumSize || header.IPv6(p).NextHeader() != uint8(header.TCPProtocolNumber) {
				t.Fatalf("accepted non-TCP IPv6 packet % x", p)
			}
		default:
			t.Fatalf("unexpected protocol %d", proto)
		}
	})
}

func TestAllowedPacket(t *testing.T) {
	t.Parallel()
	mk4 := func(proto uint8) []byte {
		p := make([]byte, 40)
		header.IPv4(p).Encode(&header.IPv4Fields{TotalLength: 40, Protocol: proto, TTL: 64})
		return p
	}
	tests := []struct {
		name string
		p    []byte
		want bool
	}{
		{"ok/tcp4", mk4(uint8(header.TCPProtocolNumber)), true},
		{"drop/udp4", mk4(uint8(header.UDPProtocolNumber)), false},
		{"drop/icmp4", mk4(uint8(header.ICMPv4ProtocolNumber)), false},
		{"drop/short", []byte{0x45, 0}, false},
		{"drop/empty", nil, false},
		{"drop/version0", make([]byte, 40), false},
	}
	for _, tt := range tests {
		if _, got := allowedPacket(tt.p); got != tt.want {
			t.Errorf("%s: allowedPacket = %v, want %v", tt.name, got, tt.want)
		}
	}
}
