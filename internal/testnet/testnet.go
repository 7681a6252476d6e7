// Package testnet holds network helpers for tests: a TCP server that runs a
// handler per connection and is torn down with the test. It is for test code
// only; no production binary imports it.
package testnet

import (
	"net"
	"sync"
	"testing"
)

// Serve accepts on ln and runs handle on its own goroutine per connection,
// closing the connection when handle returns, until the test or benchmark
// ends. Cleanup closes ln and every open connection and waits for every
// goroutine Serve started.
func Serve(tb testing.TB, ln net.Listener, handle func(net.Conn)) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]struct{}{}
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns[c] = struct{}{}
			mu.Unlock()
			wg.Go(func() {
				handle(c)
				_ = c.Close()
				mu.Lock()
				delete(conns, c)
				mu.Unlock()
			})
		}
	})
	tb.Cleanup(func() {
		_ = ln.Close()
		mu.Lock()
		for c := range conns {
			_ = c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}
