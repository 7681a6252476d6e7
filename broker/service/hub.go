package service

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// hub wakes long-polling devices when their event stream grows.
type hub struct {
	mu      sync.Mutex
	waiters map[string]chan struct{} // device -> closed on news
}

func (h *hub) init() { h.waiters = make(map[string]chan struct{}) }

// ch returns the channel that is closed at the next news for device.
func (h *hub) ch(device string) <-chan struct{} {
	h.mu.Lock()
	defer h.mu.Unlock()
	c, ok := h.waiters[device]
	if !ok {
		c = make(chan struct{})
		h.waiters[device] = c
	}
	return c
}

func (h *hub) notify(device string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if c, ok := h.waiters[device]; ok {
		close(c)
		delete(h.waiters, device)
	}
}

// pushEvent appends a device event inside tx; call s.hub.notify after commit.
func (s *Service) pushEvent(ctx context.Context, tx store.Tx, device string, e wire.Event) error {
	e.Time = s.now()
	if _, err := tx.AppendDeviceEvent(ctx, device, e); err != nil {
		return fmt.Errorf("queueing device event: %w", err)
	}
	return nil
}

// MaxEventWait bounds a long-poll.
const MaxEventWait = 60 * time.Second

// Events returns the device's events after seq, waiting up to wait for the
// first one. It answers at once when events are already there.
func (s *Service) Events(ctx context.Context, d store.Device, after int64, wait time.Duration) (wire.Events, error) {
	if wait > MaxEventWait {
		wait = MaxEventWait
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		news := s.hub.ch(d.ID)
		var evs []wire.Event
		err := s.cfg.Store.View(ctx, func(tx store.Tx) error {
			var err error
			evs, err = tx.DeviceEvents(ctx, d.ID, after, 100)
			return err
		})
		if err != nil {
			return wire.Events{}, err
		}
		if len(evs) > 0 {
			return wire.Events{Events: evs, Next: evs[len(evs)-1].Seq}, nil
		}
		select {
		case <-news:
		case <-timer.C:
			return wire.Events{Events: []wire.Event{}, Next: after}, nil
		case <-ctx.Done():
			return wire.Events{}, ctx.Err()
		}
	}
}
