package agent

import (
	"context"
	"math/rand/v2"
	"time"
)

// Reconnect backoff bounds.
const (
	backoffMin = 500 * time.Millisecond
	backoffMax = 30 * time.Second
)

// backoff yields exponentially growing, jittered delays between backoffMin
// and backoffMax. It is not safe for concurrent use.
type backoff struct {
	cur time.Duration
}

// next returns the delay before the next attempt: a uniformly random value
// in [d/2, d], where d doubles on every call up to backoffMax.
func (b *backoff) next() time.Duration {
	if b.cur < backoffMin {
		b.cur = backoffMin
	} else {
		b.cur = min(2*b.cur, backoffMax)
	}
	half := b.cur / 2
	return half + time.Duration(rand.Int64N(int64(half)+1))
}

// reset starts over after a success.
func (b *backoff) reset() { b.cur = 0 }

// sleep waits for d or until ctx is done, and reports whether d elapsed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}
