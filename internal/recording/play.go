package recording

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"strings"
	"time"
	"unicode/utf8"
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
	// Raw writes the recorded bytes exactly. By default Play drops terminal
	// control strings (OSC, DCS, SOS, PM, APC): a recorded session must not
	// be able to set the reviewer's clipboard or window title, or talk to
	// their terminal, just because someone replays it.
	Raw bool
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
	var filter controlStringFilter
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
		data := ev.Data
		if !o.Raw {
			data = filter.apply(data)
		}
		if _, err := io.WriteString(w, data); err != nil {
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

// controlStringFilter removes ECMA-48 control strings (OSC, DCS, SOS, PM,
// APC, in their 7-bit ESC forms and 8-bit C1 forms) from terminal output,
// keeping everything else (text, CSI sequences for colour and cursor). It
// keeps state across calls, so a string split between events is still
// removed.
type controlStringFilter struct {
	state int // fsNormal, fsEsc, fsString, fsStringEsc
	n     int // bytes dropped in the current string
}

const (
	fsNormal = iota
	fsEsc
	fsString
	fsStringEsc
	// maxControlString bounds one control string; past it the filter gives
	// up on the string and returns to text, so a stray opener cannot
	// swallow the rest of a recording.
	maxControlString = 64 << 10
)

func (f *controlStringFilter) apply(s string) string {
	var b strings.Builder
	b.Grow(len(s))
	for _, r := range s {
		switch f.state {
		case fsNormal:
			switch r {
			case 0x1b:
				f.state = fsEsc
			case 0x90, 0x98, 0x9d, 0x9e, 0x9f: // DCS, SOS, OSC, PM, APC
				f.state, f.n = fsString, 0
			default:
				b.WriteRune(r)
			}
		case fsEsc:
			switch r {
			case ']', 'P', 'X', '^', '_':
				f.state, f.n = fsString, 0
			case 0x1b:
				b.WriteRune(0x1b)
			default:
				b.WriteRune(0x1b)
				b.WriteRune(r)
				f.state = fsNormal
			}
		case fsString, fsStringEsc:
			switch {
			case r == 0x07 || r == 0x9c || (f.state == fsStringEsc && r == '\\'):
				f.state = fsNormal
			case r == 0x1b:
				f.state = fsStringEsc
			default:
				f.state = fsString
				if f.n += utf8.RuneLen(r); f.n > maxControlString {
					f.state = fsNormal
				}
			}
		}
	}
	return b.String()
}
