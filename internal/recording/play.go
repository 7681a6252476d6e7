package recording

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"time"
)

// DefaultMaxIdle is the longest pause Play makes when PlayOptions.MaxIdle is
// zero.
const DefaultMaxIdle = 2 * time.Second

// PlayOptions tune Play. The zero value plays at normal speed with pauses
// capped at DefaultMaxIdle.
type PlayOptions struct {
	// Speed multiplies playback speed; 0 means 1. It must not be negative.
	Speed float64
	// MaxIdle caps every pause between events; 0 means DefaultMaxIdle. It
	// must not be negative.
	MaxIdle time.Duration
	// Sleep waits for d or until ctx is done; nil means a real timer. Tests
	// inject a fake.
	Sleep func(ctx context.Context, d time.Duration) error
}

// Play reads an asciicast v2 recording from r and writes its output events
// to w, pausing between them as the recording says (scaled by Speed, each
// pause capped by MaxIdle). It streams: memory use does not grow with the
// length of the recording. It stops early with ctx's error.
func Play(ctx context.Context, r io.Reader, w io.Writer, o PlayOptions) error {
	speed := o.Speed
	if speed == 0 {
		speed = 1
	}
	if speed < 0 || math.IsNaN(speed) || math.IsInf(speed, 0) {
		return fmt.Errorf("recording: invalid playback speed %g", o.Speed)
	}
	maxIdle := o.MaxIdle
	if maxIdle == 0 {
		maxIdle = DefaultMaxIdle
	}
	if maxIdle < 0 {
		return fmt.Errorf("recording: negative MaxIdle %s", o.MaxIdle)
	}
	sleep := o.Sleep
	if sleep == nil {
		sleep = sleepCtx
	}
	d := newDecoder(r, 0)
	if _, err := d.header(); err != nil {
		return err
	}
	var prev float64
	var pause time.Duration
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		ev, err := d.next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		gap := maxIdle
		if secs := ev.Time - prev; secs < maxIdle.Seconds() {
			gap = time.Duration(secs * float64(time.Second))
		}
		prev = ev.Time
		pause = min(pause+gap, maxIdle)
		if ev.Code != "o" {
			continue
		}
		if wait := time.Duration(float64(pause) / speed); wait > 0 {
			if err := sleep(ctx, wait); err != nil {
				return err
			}
		}
		pause = 0
		if _, err := io.WriteString(w, ev.Data); err != nil {
			return fmt.Errorf("recording: writing playback: %w", err)
		}
	}
}

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
