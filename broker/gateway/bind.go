package gateway

import (
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/conn"
)

// keepaliveSize is the size on the wire of a WireGuard keepalive: a transport
// message header plus an authentication tag and no payload. Every data packet
// is larger.
const keepaliveSize = 32

// watchBind wraps the UDP bind to observe keepalives leaving for a given
// endpoint. RemovePeer uses it as the last step of a barrier: a keepalive sent
// after the flows' resets went out through the same per-peer queue proves the
// resets were sent, so removing the peer can no longer drop them.
type watchBind struct {
	conn.Bind

	// waiting counts registered watches, so Send stays cheap without any.
	waiting atomic.Int32

	mu sync.Mutex
	// watches maps an endpoint (as DstToString prints it) to channels closed
	// by the next keepalive sent there.
	watches map[string][]chan struct{}
}

func newWatchBind(b conn.Bind) *watchBind {
	return &watchBind{Bind: b, watches: make(map[string][]chan struct{})}
}

// watchKeepalive returns a channel closed when the next keepalive is sent to
// dst, and a function that stops watching.
func (b *watchBind) watchKeepalive(dst string) (<-chan struct{}, func()) {
	ch := make(chan struct{})
	b.mu.Lock()
	b.watches[dst] = append(b.watches[dst], ch)
	b.mu.Unlock()
	b.waiting.Add(1)
	stop := func() {
		b.mu.Lock()
		defer b.mu.Unlock()
		list := b.watches[dst]
		for i, c := range list {
			if c == ch {
				list = append(list[:i], list[i+1:]...)
				b.waiting.Add(-1)
				break
			}
		}
		if len(list) == 0 {
			delete(b.watches, dst)
		} else {
			b.watches[dst] = list
		}
	}
	return ch, stop
}

// Send implements conn.Bind.
func (b *watchBind) Send(bufs [][]byte, ep conn.Endpoint) error {
	err := b.Bind.Send(bufs, ep)
	if err != nil || b.waiting.Load() == 0 {
		return err
	}
	for _, buf := range bufs {
		if len(buf) == keepaliveSize {
			b.sawKeepalive(ep.DstToString())
			break
		}
	}
	return nil
}

func (b *watchBind) sawKeepalive(dst string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	list, ok := b.watches[dst]
	if !ok {
		return
	}
	for _, ch := range list {
		close(ch)
		b.waiting.Add(-1)
	}
	delete(b.watches, dst)
}
