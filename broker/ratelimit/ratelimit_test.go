package ratelimit

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"sync"
	"testing"
	"time"
)

type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2031, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func TestLimiter(t *testing.T) {
	t.Parallel()
	type step struct {
		advance time.Duration
		key     string
		add     int  // failures to add before the check
		want    bool // over() after adding
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"under_the_limit", []step{{key: "a", add: 2, want: false}}},
		{"at_the_limit", []step{{key: "a", add: 3, want: true}}},
		{"counts_accumulate_in_a_window", []step{
			{key: "a", add: 1, want: false},
			{advance: 10 * time.Second, key: "a", add: 1, want: false},
			{advance: 10 * time.Second, key: "a", add: 1, want: true},
		}},
		{"checking_does_not_count", []step{
			{key: "a", add: 2, want: false},
			{key: "a", want: false},
			{key: "a", want: false},
		}},
		{"keys_are_separate", []step{
			{key: "a", add: 3, want: true},
			{key: "b", add: 2, want: false},
			{key: "a", want: true},
		}},
		{"still_over_just_before_the_window_ends", []step{
			{key: "a", add: 3, want: true},
			{advance: time.Minute - time.Nanosecond, key: "a", want: true},
		}},
		{"reset_when_the_window_ends", []step{
			{key: "a", add: 3, want: true},
			{advance: time.Minute, key: "a", want: false},
			{key: "a", add: 2, want: false},
			{key: "a", add: 1, want: true},
		}},
		{"window_starts_at_first_use", []step{
			{key: "a", add: 2, want: false},
			{advance: 50 * time.Second, key: "a", add: 1, want: true},
			// 60s after the window began, not after the last failure.
			{advance: 10 * time.Second, key: "a", want: false},
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			clk := newClock()
			l := New(3, time.Minute, clk.Now)
			for i, s := range tc.steps {
				clk.Advance(s.advance)
				for range s.add {
					l.Add(s.key)
				}
				if got := l.Over(s.key); got != s.want {
					t.Errorf("step %d: over(%q) = %v, want %v", i, s.key, got, s.want)
				}
			}
		})
	}
}

func TestLimiterConcurrent(t *testing.T) {
	t.Parallel()
	clk := newClock()
	l := New(1000, time.Minute, clk.Now)
	var wg sync.WaitGroup
	for range 10 {
		wg.Go(func() {
			for range 50 {
				l.Add("a")
				l.Over("a")
			}
		})
	}
	wg.Wait()
	l.mu.Lock()
	n := l.counts["a"].n
	l.mu.Unlock()
	if n != 500 {
		t.Errorf("count = %d after 500 concurrent adds", n)
	}
}

func TestLimiterEvictionKeepsOffenders(t *testing.T) {
	t.Parallel()
	clk := newClock()
	l := New(3, time.Minute, clk.Now)
	for range 3 {
		l.Add("attacker")
	}
	for i := range 10001 {
		l.Over(fmt.Sprintf("2001:db8::%x", i))
	}
	if !l.Over("attacker") {
		t.Error("the attacker's failures were forgotten within the window")
	}
}

func TestClientIP(t *testing.T) {
	t.Parallel()
	tests := []struct{ remote, want string }{
		{"192.0.2.1:1234", "192.0.2.1"},
		{"[2001:db8::1]:443", "2001:db8::1"},
		{"not-an-address", "not-an-address"},
	}
	for _, tc := range tests {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.RemoteAddr = tc.remote
		if got := clientIP(r); got != tc.want {
			t.Errorf("clientIP(%q) = %q, want %q", tc.remote, got, tc.want)
		}
	}
}

func TestLimitKeyGroupsIPv6By64(t *testing.T) {
	t.Parallel()
	tests := []struct{ remote, want string }{
		{"192.0.2.1:1234", "192.0.2.1"},
		{"[2001:db8:1:2:aaaa::1]:443", "2001:db8:1:2::/64"},
		{"[2001:db8:1:2:bbbb::9]:443", "2001:db8:1:2::/64"},
		{"[::ffff:192.0.2.7]:80", "192.0.2.7"},
	}
	for _, tc := range tests {
		r := httptest.NewRequest(http.MethodGet, "/", nil)
		r.RemoteAddr = tc.remote
		if got := Key(r); got != tc.want {
			t.Errorf("Key(%q) = %q, want %q", tc.remote, got, tc.want)
		}
	}
}

func TestLimiterFullFailsClosedUntilWindowsExpire(t *testing.T) {
	t.Parallel()
	clk := newClock()
	l := New(3, time.Minute, clk.Now)
	l.MaxKeys = 4
	for i := range 4 {
		l.Add(fmt.Sprintf("net-%d", i))
	}
	if !l.Over("newcomer") {
		t.Error("an untracked client passed while the limiter was full of live offenders")
	}
	if l.Over("net-0") {
		t.Error("a tracked client under its limit was refused")
	}
	clk.Advance(time.Minute)
	if l.Over("newcomer") {
		t.Error("still refusing after every window ran out")
	}
}
