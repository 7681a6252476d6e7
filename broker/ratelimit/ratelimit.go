// Package ratelimit counts events per client network in fixed windows, for
// refusing token guessing and enrollment floods. It fails closed when it is
// full of live keys.
package ratelimit

import (
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"
)

// Limiter counts events (failed lookups, enrollments) per key in fixed
// windows. Only Add creates entries; when maxKeys networks are being tracked and
// none of their windows has run out, networks not yet tracked are refused
// too (fail closed under a spread-out guessing attack) until windows expire.
type Limiter struct {
	mu     sync.Mutex
	max    int
	window time.Duration
	now    func() time.Time
	// MaxKeys bounds how many keys are tracked (default 100000).
	MaxKeys int
	counts  map[string]*window // guarded by mu
}

type window struct {
	start time.Time
	n     int
}

func New(max int, win time.Duration, now func() time.Time) *Limiter {
	return &Limiter{max: max, window: win, now: now, MaxKeys: 100000, counts: make(map[string]*window)}
}

// liveLocked returns key's window if it has not run out.
func (l *Limiter) liveLocked(key string, now time.Time) (*window, bool) {
	w, ok := l.counts[key]
	if !ok || now.Sub(w.start) >= l.window {
		return nil, false
	}
	return w, true
}

// pruneLocked drops every window that has run out.
func (l *Limiter) pruneLocked(now time.Time) {
	for k, w := range l.counts {
		if now.Sub(w.start) >= l.window {
			delete(l.counts, k)
		}
	}
}

func (l *Limiter) Add(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if w, ok := l.liveLocked(key, now); ok {
		w.n++
		return
	}
	if len(l.counts) >= l.MaxKeys {
		l.pruneLocked(now)
		if len(l.counts) >= l.MaxKeys {
			return // full of live offenders: over() refuses untracked keys
		}
	}
	l.counts[key] = &window{start: now, n: 1}
}

func (l *Limiter) Over(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if w, ok := l.liveLocked(key, now); ok {
		return w.n >= l.max
	}
	if len(l.counts) >= l.MaxKeys {
		l.pruneLocked(now)
		return len(l.counts) >= l.MaxKeys
	}
	return false
}

// Key is the network a client is counted by: its IPv4 address, or the
// /64 of its IPv6 address (one host usually owns a whole /64).
func Key(r *http.Request) string {
	a, err := netip.ParseAddr(clientIP(r))
	if err != nil {
		return clientIP(r)
	}
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.String()
	}
	return a.String()
}

func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}
