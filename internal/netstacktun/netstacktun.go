// Package netstacktun is the tun.Device that joins a wireguard-go device to a
// gVisor network stack of our own, for the broker's gateway and the agent's
// userspace tunnel.
//
// It replaces wireguard-go's stock tun/netstack device, whose Close closes a
// channel that gVisor's TCP goroutines may still send on (a panic when a
// segment arrives for a closed connection while the tunnel shuts down). Here
// nothing is ever sent on a closed channel: Read takes packets straight from
// the channel endpoint's queue, and senders that wait for room give up when
// the device closes.
package netstacktun

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
// Device.Read can tell it from real traffic and never hands it to the device.
const markerLen = 9

// Device is the tun.Device wireguard-go reads from and writes to. Packets the
// device decrypts are injected into the gVisor stack; packets the stack sends
// are read from the channel endpoint's outbound queue. Only TCP reaches the
// stack: everything else is dropped here, before gVisor could answer it.
type Device struct {
	ep        *channel.Endpoint
	notify    *channel.NotificationHandle
	mtu       int
	name      string
	highWater int
	events    chan tun.Event

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

var _ tun.Device = (*Device)(nil)

// New returns a Device over ep, whose outbound queue holds queueLen packets,
// named name. The stack and the endpoint stay the caller's: Close stops the
// Device only.
func New(ep *channel.Endpoint, queueLen, mtu int, name string) *Device {
	ctx, cancel := context.WithCancel(context.Background())
	t := &Device{
		ep:        ep,
		mtu:       mtu,
		name:      name,
		highWater: queueLen / 2,
		events:    make(chan tun.Event, 1),
		ctx:       ctx,
		cancel:    cancel,
		markers:   make(map[uint64]chan struct{}),
	}
	t.space = sync.NewCond(&t.spaceMu)
	t.notify = ep.AddNotify(t)
	t.events <- tun.EventUp
	return t
}

// WriteNotify implements channel.Notification; see spaceMu.
func (t *Device) WriteNotify() {
	if t.ep.NumQueued() < t.highWater {
		return
	}
	t.spaceMu.Lock()
	t.spaceWait.Add(1)
	for t.ep.NumQueued() >= t.highWater && t.ctx.Err() == nil {
		t.space.Wait()
	}
	t.spaceWait.Add(-1)
	t.spaceMu.Unlock()
}

// wakeSenders releases senders waiting in WriteNotify once there is room.
func (t *Device) wakeSenders() {
	if t.spaceWait.Load() == 0 {
		return
	}
	t.spaceMu.Lock()
	t.space.Broadcast()
	t.spaceMu.Unlock()
}

// File implements tun.Device; there is no file behind this device.
func (t *Device) File() *os.File { return nil }

// Name implements tun.Device.
func (t *Device) Name() (string, error) { return t.name, nil }

// MTU implements tun.Device.
func (t *Device) MTU() (int, error) { return t.mtu, nil }

// BatchSize implements tun.Device: one packet per Read, which the barrier
// logic relies on.
func (t *Device) BatchSize() int { return 1 }

// Events implements tun.Device.
func (t *Device) Events() <-chan tun.Event { return t.events }

// Read returns the next packet the stack wants to send. When it reaches a
// barrier marker, every packet queued before the marker has been returned
// and, because the device calls Read again only after it has handed the
// previous packet to its peer's queues, fully processed by the device.
func (t *Device) Read(bufs [][]byte, sizes []int, offset int) (int, error) {
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

func (t *Device) reachedMarker(b []byte) {
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

// Barrier queues a marker behind every packet the stack has sent so far and
// waits until the device has consumed it (see Read) or ctx is done. It
// returns ErrQueueFull when the marker cannot be queued.
func (t *Device) Barrier(ctx context.Context) error {
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
		return ErrQueueFull
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
func (t *Device) Write(bufs [][]byte, offset int) (int, error) {
	if t.ctx.Err() != nil {
		return 0, os.ErrClosed
	}
	for _, b := range bufs {
		pkt := b[offset:]
		proto, ok := AllowedPacket(pkt)
		if !ok {
			continue
		}
		pb := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(pkt)})
		t.ep.InjectInbound(proto, pb)
		pb.DecRef()
	}
	return len(bufs), nil
}

// Close implements tun.Device. It stops Read, releases waiting senders and
// closes the event channel; the stack and the endpoint belong to the caller,
// which tears them down.
func (t *Device) Close() error {
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

// AllowedPacket reports whether an inbound packet may enter the stack and
// with which network protocol: well-formed-looking TCP over IPv4 or IPv6 only
// (no IPv6 extension headers). gVisor validates everything else.
func AllowedPacket(p []byte) (proto tcpip.NetworkProtocolNumber, ok bool) {
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

// ErrQueueFull reports that a barrier marker could not be queued.
var ErrQueueFull = errors.New("outbound packet queue full")
