package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"
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
