package testnet

import (
	"io"
	"net"
	"testing"
	"time"
)

// TestServeClosesOnCleanup: a connection is served, and the cleanup closes
// a connection its handler still holds and joins the handler.
func TestServeClosesOnCleanup(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var c net.Conn
	t.Run("serve", func(t *testing.T) {
		Serve(t, ln, func(c net.Conn) { _, _ = io.Copy(c, c) })
		c, err = net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write([]byte("ping")); err != nil {
			t.Fatal(err)
		}
		buf := make([]byte, 4)
		if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
			t.Fatalf("echo: %q, %v", buf, err)
		}
	}) // the subtest's cleanup runs here
	defer c.Close()
	if err := c.SetReadDeadline(time.Now().Add(5 * time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("connection still open after cleanup")
	}
	if _, err := net.DialTimeout("tcp", ln.Addr().String(), time.Second); err == nil {
		t.Error("listener still accepting after cleanup")
	}
}
