package gateway

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"sync"
	"sync/atomic"

	"golang.zx2c4.com/wireguard/tun"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/channel"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// markerLen is the size of a barrier marker queued on the outbound channel.
// A marker starts with a zero byte, which no IPv4 or IPv6 packet does, so
// netTUN.Read can tell it from real traffic and never hands it to the device.
const markerLen = 9

// netTUN is the tun.Device wireguard-go reads from and writes to. Packets the
// device decrypts are injected into the gVisor stack; packets the stack sends
// are read from the channel endpoint's outbound queue. Only TCP reaches the
// stack: everything else is dropped here, before gVisor could answer it.
type netTUN struct {
	ep     *channel.Endpoint
	notify *channel.NotificationHandle
	mtu    int
	events chan tun.Event

	// ctx is cancelled by Close; it unblocks Read.
	ctx    context.Context
	cancel context.CancelFunc

	closeOnce sync.Once

	// spaceMu and space implement backpressure: WriteNotify, which gVisor
	// calls in the sending goroutine after queueing a packet, waits while
	// the queue is above highWater, like the stock netstack device (which
	// blocks every sender until the device takes its packet) but without
	// serialising senders. Without it, bulk flows overrun the queue and
	// packets are dropped.
	spaceMu   sync.Mutex
	space     *sync.Cond
	spaceWait atomic.Int32

	mu sync.Mutex
	// markers maps a barrier id to the channel closed when Read reaches it.
	markers map[uint64]chan struct{}
	nextID  uint64
}

var _ tun.Device = (*netTUN)(nil)

func newNetTUN(ep *channel.Endpoint, mtu int) *netTUN {
	ctx, cancel := context.WithCancel(context.Background())
	t := &netTUN{
		ep:      ep,
		mtu:     mtu,
		events:  make(chan tun.Event, 1),
		ctx:     ctx,
		cancel:  cancel,
		markers: make(map[uint64]chan struct{}),
	}
	t.space = sync.NewCond(&t.spaceMu)
	t.notify = ep.AddNotify(t)
	t.events <- tun.EventUp
	return t
}

// highWater is the queue length above which senders wait for the device.
const highWater = outboundQueueLen / 2

// WriteNotify implements channel.Notification; see spaceMu.
func (t *netTUN) WriteNotify() {
	if t.ep.NumQueued() < highWater {
		return
	}
	t.spaceMu.Lock()
	t.spaceWait.Add(1)
	for t.ep.NumQueued() >= highWater && t.ctx.Err() == nil {
		t.space.Wait()
	}
	t.spaceWait.Add(-1)
	t.spaceMu.Unlock()
}

// wakeSenders releases senders waiting in WriteNotify once there is room.
func (t *netTUN) wakeSenders() {
	if t.spaceWait.Load() == 0 {
		return
	}
	t.spaceMu.Lock()
	t.space.Broadcast()
	t.spaceMu.Unlock()
}

// File implements tun.Device; there is no file behind this device.
func (t *netTUN) File() *os.File { return nil }

// Name implements tun.Device.
func (t *netTUN) Name() (string, error) { return "pinhole-gw", nil }

// MTU implements tun.Device.
func (t *netTUN) MTU() (int, error) { return t.mtu, nil }

// BatchSize implements tun.Device: one packet per Read, which the barrier
// logic relies on.
func (t *netTUN) BatchSize() int { return 1 }

// Events implements tun.Device.
func (t *netTUN) Events() <-chan tun.Event { return t.events }

// Read returns the next packet the stack wants to send. When it reaches a
// barrier marker, every packet queued before the marker has been returned
// and, because the device calls Read again only after it has handed the
// previous packet to its peer's queues, fully processed by the device.
func (t *netTUN) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
	for {
		pkt := t.ep.ReadContext(t.ctx)
		if pkt == nil {
			return 0, os.ErrClosed
		}
		n := 0
		dst := bufs[0][offset:]
		for _, s := range pkt.AsSlices() {
			n += copy(dst[n:], s)
		}
		pkt.DecRef()
		t.wakeSenders()
		if n > 0 && dst[0] == 0 {
			t.reachedMarker(dst[:n])
			continue
		}
		sizes[0] = n
		return 1, nil
	}
}

func (t *netTUN) reachedMarker(b []byte) {
	if len(b) != markerLen {
		return
	}
	id := binary.BigEndian.Uint64(b[1:])
	t.mu.Lock()
	defer t.mu.Unlock()
	if ch, ok := t.markers[id]; ok {
		close(ch)
		delete(t.markers, id)
	}
}

// barrier queues a marker behind every packet the stack has sent so far and
// waits until the device has consumed it (see Read) or ctx is done.
func (t *netTUN) barrier(ctx context.Context) error {
	t.mu.Lock()
	id := t.nextID
	t.nextID++
	ch := make(chan struct{})
	t.markers[id] = ch
	t.mu.Unlock()
	defer func() {
		t.mu.Lock()
		delete(t.markers, id)
		t.mu.Unlock()
	}()

	b := make([]byte, markerLen)
	binary.BigEndian.PutUint64(b[1:], id)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	var l stack.PacketBufferList
	l.PushBack(pkt)
	n, terr := t.ep.WritePackets(l)
	l.DecRef()
	if terr != nil || n != 1 {
		return errBarrierQueueFull
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.ctx.Done():
		return os.ErrClosed
	}
}

// Write injects packets decrypted by the device into the stack. Only TCP over
// IPv4 or IPv6 is let through; everything else is dropped silently.
func (t *netTUN) Write(bufs [][]byte, offset int) (int, error) {
	if t.ctx.Err() != nil {
		return 0, os.ErrClosed
	}
	for _, b := range bufs {
		pkt := b[offset:]
		proto, ok := allowedPacket(pkt)
		if !ok {
			continue
		}
		pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(pkt)})
		t.ep.InjectInbound(proto, pb)
		pb.DecRef()
	}
	return len(bufs), nil
}

// Close implements tun.Device. It stops Read and closes the event channel; the
// stack and the endpoint belong to the Gateway, which tears them down.
func (t *netTUN) Close() error {
	t.closeOnce.Do(func() {
		t.cancel()
		t.ep.RemoveNotify(t.notify)
		t.spaceMu.Lock()
		t.space.Broadcast()
		t.spaceMu.Unlock()
		close(t.events)
	})
	return nil
}

// allowedPacket reports whether an inbound packet may enter the stack and
// with which network protocol: well-formed-looking TCP over IPv4 or IPv6 only
// (no IPv6 extension headers). gVisor validates everything else.
func allowedPacket(p []byte) (proto tcpip.NetworkProtocolNumber, ok bool) {
	if len(p) == 0 {
		return 0, false
	}
	switch p[0] >> 4 {
	case 4:
		if len(p) < header.IPv4MinimumSize {
			return 0, false
		}
		if header.IPv4(p).Protocol() != uint8(header.TCPProtocolNumber) {
			return 0, false
		}
		return header.IPv4ProtocolNumber, true
	case 6:
		if len(p) < header.IPv6MinimumSize {
			return 0, false
		}
		if header.IPv6(p).NextHeader() != uint8(header.TCPProtocolNumber) {
			return 0, false
		}
		return header.IPv6ProtocolNumber, true
	}
	return 0, false
}

// errBarrierQueueFull reports that a barrier marker could not be queued.
var errBarrierQueueFull = errors.New("outbound packet queue full")
