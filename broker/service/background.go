package service

import "sync"

// background runs work that must not hold up its caller (a grant's
// data-plane cut, the slow part of grant-link delivery) on goroutines that
// Run waits for on exit. Work started after closeAndWait (by an API call
// still finishing during shutdown) runs inline in its caller, so none is
// left running that nobody waits for. The zero value is ready to use.
type background struct {
	mu     sync.Mutex
	closed bool // guarded by mu; set by closeAndWait
	wg     sync.WaitGroup
}

// start runs f on a goroutine b waits for, or inline once b is closed.
func (b *background) start(f func()) {
	b.mu.Lock()
	if b.closed {
		b.mu.Unlock()
		f()
		return
	}
	// Under mu, so the goroutine is counted before closeAndWait can wait:
	// the WaitGroup never grows from zero during a Wait.
	b.wg.Go(f)
	b.mu.Unlock()
}

// closeAndWait makes later work run inline and waits for the running work.
func (b *background) closeAndWait() {
	b.mu.Lock()
	b.closed = true
	b.mu.Unlock()
	b.wg.Wait()
}
