package recording_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pinhole-dev/pinhole/internal/recording"
)

var update = flag.Bool("update", false, "rewrite golden files in testdata")

// stepClock returns a clock that advances by step on every call.
func stepClock(start time.Time, step time.Duration) func() time.Time {
	var mu sync.Mutex
	now := start
	return func() time.Time {
		mu.Lock()
		defer mu.Unlock()
		t := now
		now = now.Add(step)
		return t
	}
}

var t0 = time.Date(2026, 5, 1, 9, 0, 0, 0, time.UTC)

func goldenHeader() recording.CastHeader {
	return recording.CastHeader{
		Width: 80, Height: 24, Command: "", Title: "db-prod as root",
		Env:   map[string]string{"TERM": "xterm-256color", "SHELL": "/bin/bash"},
		Grant: "g-42", User: "alice", Target: "db-prod", Session: "s-1",
	}
}

// writeGolden writes the reference session used by the golden and
// asciinema tests.
func writeGolden(t *testing.T, w io.Writer) {
	t.Helper()
	c, err := recording.NewCastWriter(w, goldenHeader(), stepClock(t0, 250*time.Millisecond), 0)
	if err != nil {
		t.Fatal(err)
	}
	steps := []func() error{
		func() error { return c.Output([]byte("$ echo hello\r\nhello\r\n")) },
		func() error { return c.Output([]byte("price: \xe2\x82")) }, // "€" split in two writes
		func() error { return c.Output([]byte("\xac 5 <ok> \"q\" \x1b[1mbold\x1b[0m\r\n")) },
		func() error { return c.Resize(120, 40) },
		func() error { return c.Marker("checkpoint") },
		func() error { return c.Output([]byte("bye\r\n")) },
		c.Close,
	}
	for i, f := range steps {
		if err := f(); err != nil {
			t.Fatalf("step %d: %v", i, err)
		}
	}
}

func TestCastWriterGolden(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	writeGolden(t, &buf)
	path := filepath.Join("testdata", "session.cast")
	if *update {
		if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run go test -update to create it)", err)
	}
	if diff := cmp.Diff(buf.String(), string(want)); diff != "" {
		t.Fatalf("recording differs from %s (-got +want):\n%s", path, diff)
	}

	h, events, err := recording.ReadCast(bytes.NewReader(want), 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	wantHeader := goldenHeader()
	wantHeader.Version = 2
	wantHeader.Timestamp = t0.Unix()
	if diff := cmp.Diff(h, wantHeader); diff != "" {
		t.Errorf("header (-got +want):\n%s", diff)
	}
	wantEvents := []recording.CastEvent{
		{Time: 0.25, Code: "o", Data: "$ echo hello\r\nhello\r\n"},
		{Time: 0.5, Code: "o", Data: "price: "},
		{Time: 0.75, Code: "o", Data: "€ 5 <ok> \"q\" \x1b[1mbold\x1b[0m\r\n"},
		{Time: 1, Code: "r", Data: "120x40"},
		{Time: 1.25, Code: "m", Data: "checkpoint"},
		{Time: 1.5, Code: "o", Data: "bye\r\n"},
	}
	if diff := cmp.Diff(events, wantEvents); diff != "" {
		t.Errorf("events (-got +want):\n%s", diff)
	}
}

func TestCastWriterUTF8(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		writes []string
		want   []string // "o" event data
	}{
		{name: "ok/euro-split-2+1", writes: []string{"a\xe2\x82", "\xacb"}, want: []string{"a", "\u20acb"}},
		{name: "ok/euro-split-1+2", writes: []string{"\xe2", "\x82\xac"}, want: []string{"\u20ac"}},
		{name: "ok/euro-byte-by-byte", writes: []string{"\xe2", "\x82", "\xac"}, want: []string{"\u20ac"}},
		{name: "ok/4-byte-split", writes: []string{"\xf0\x9f", "\x98\x80!"}, want: []string{"\U0001F600!"}},
		{name: "ok/invalid-not-held", writes: []string{"x\xff", "y"}, want: []string{"x\ufffd", "y"}},
		{name: "ok/partial-flushed-on-close", writes: []string{"z\xe2\x82"}, want: []string{"z", "\ufffd\ufffd"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var buf bytes.Buffer
			c, err := recording.NewCastWriter(&buf, recording.CastHeader{Width: 80, Height: 24}, stepClock(t0, time.Millisecond), 0)
			if err != nil {
				t.Fatal(err)
			}
			for _, w := range tt.writes {
				if err := c.Output([]byte(w)); err != nil {
					t.Fatal(err)
				}
			}
			if err := c.Close(); err != nil {
				t.Fatal(err)
			}
			_, events, err := recording.ReadCast(&buf, 1<<20)
			if err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, e := range events {
				got = append(got, e.Data)
			}
			if diff := cmp.Diff(got, tt.want); diff != "" {
				t.Fatalf("output events (-got +want):\n%s", diff)
			}
		})
	}
}

func TestCastWriterTruncation(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	const max = 600
	c, err := recording.NewCastWriter(&buf, recording.CastHeader{Width: 80, Height: 24}, stepClock(t0, time.Millisecond), max)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	for ; n < 100; n++ {
		err = c.Output([]byte(strings.Repeat("x", 40)))
		if err != nil {
			break
		}
	}
	if !errors.Is(err, recording.ErrTruncated) {
		t.Fatalf("Output error = %v after %d writes, want ErrTruncated", err, n)
	}
	if n == 0 {
		t.Fatal("truncated before the first event")
	}
	for _, f := range []func() error{
		func() error { return c.Output([]byte("y")) },
		func() error { return c.Resize(10, 10) },
		func() error { return c.Marker("m") },
	} {
		if err := f(); !errors.Is(err, recording.ErrTruncated) {
			t.Fatalf("call after truncation = %v, want ErrTruncated", err)
		}
	}
	if err := c.Close(); err != nil {
		t.Fatalf("Close after truncation: %v", err)
	}
	if buf.Len() > max {
		t.Fatalf("recording is %d bytes, cap %d", buf.Len(), max)
	}
	size := buf.Len()
	_, events, err := recording.ReadCast(&buf, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	last := events[len(events)-1]
	markerLine := fmt.Sprintf("[%.6f, \"m\", %q]\n", last.Time, last.Data)
	want := fmt.Sprintf("pinhole: recording truncated at %d bytes", size-len(markerLine))
	if last.Code != "m" || last.Data != want {
		t.Fatalf("last event = %+v, want marker %q", last, want)
	}
	if len(events) != n+1 {
		t.Fatalf("got %d events, want %d outputs and a marker", len(events), n)
	}

	if _, err := recording.NewCastWriter(io.Discard, recording.CastHeader{Width: 80, Height: 24}, nil, 100); err == nil {
		t.Fatal("a cap too small for the header was accepted")
	}
}

func TestCastWriterConcurrent(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	c, err := recording.NewCastWriter(&buf, recording.CastHeader{Width: 80, Height: 24}, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for i := range 50 {
				if err := c.Output([]byte(fmt.Sprintf("g%d-%d ", g, i))); err != nil {
					t.Error(err)
					return
				}
				if i%10 == 0 {
					if err := c.Resize(80+g, 24); err != nil {
						t.Error(err)
						return
					}
				}
			}
		})
	}
	wg.Wait()
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	if err := c.Output([]byte("late")); !errors.Is(err, recording.ErrClosed) {
		t.Fatalf("Output after Close = %v, want ErrClosed", err)
	}
	_, events, err := recording.ReadCast(&buf, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(events), 8*50+8*5; got != want {
		t.Fatalf("got %d events, want %d", got, want)
	}
}

type failWriter struct{ after int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.after <= 0 {
		return 0, errors.New("disk full")
	}
	f.after--
	return len(p), nil
}

func TestCastWriterWriteErrorSticky(t *testing.T) {
	t.Parallel()
	c, err := recording.NewCastWriter(&failWriter{after: 1}, recording.CastHeader{Width: 80, Height: 24}, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Output([]byte("a")); err == nil || !strings.Contains(err.Error(), "disk full") {
		t.Fatalf("Output = %v, want disk full", err)
	}
	if err := c.Resize(1, 1); err == nil {
		t.Fatal("error not sticky")
	}
	if err := c.Close(); err == nil {
		t.Fatal("Close hid the write error")
	}
	if _, err := recording.NewCastWriter(&failWriter{}, recording.CastHeader{Width: 80, Height: 24}, nil, 0); err == nil {
		t.Fatal("header write error not reported")
	}
	if _, err := recording.NewCastWriter(io.Discard, recording.CastHeader{Width: 0, Height: 24}, nil, 0); err == nil {
		t.Fatal("zero width accepted")
	}
	if _, err := recording.NewCastWriter(io.Discard, recording.CastHeader{Version: 3, Width: 1, Height: 1}, nil, 0); err == nil {
		t.Fatal("version 3 accepted")
	}
}

func TestFileStoreIDs(t *testing.T) {
	t.Parallel()
	s, err := recording.NewFileStore(filepath.Join(t.TempDir(), "rec"))
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name string
		id   string
		ok   bool
	}{
		{name: "ok/simple", id: "abc-DEF_123", ok: true},
		{name: "ok/64", id: strings.Repeat("a", 64), ok: true},
		{name: "deny/empty", id: ""},
		{name: "deny/65", id: strings.Repeat("a", 65)},
		{name: "deny/dotdot", id: "../x"},
		{name: "deny/slash", id: "a/b"},
		{name: "deny/dot", id: "a.b"},
		{name: "deny/newline", id: "a\n"},
		{name: "deny/unicode", id: "é"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, errPath := s.Path(tt.id)
			f, errCreate := s.Create(tt.id)
			if tt.ok {
				if errPath != nil || errCreate != nil {
					t.Fatalf("Path: %v, Create: %v", errPath, errCreate)
				}
				if _, _, err := f.Close(); err != nil {
					t.Fatal(err)
				}
				return
			}
			if !errors.Is(errPath, recording.ErrInvalidID) || !errors.Is(errCreate, recording.ErrInvalidID) {
				t.Fatalf("Path: %v, Create: %v, want ErrInvalidID", errPath, errCreate)
			}
			if _, err := s.Open(tt.id); !errors.Is(err, recording.ErrInvalidID) {
				t.Fatalf("Open: %v, want ErrInvalidID", err)
			}
		})
	}
}

func TestFileStoreWriteHashAndPrefix(t *testing.T) {
	t.Parallel()
	dir := filepath.Join(t.TempDir(), "rec")
	s, err := recording.NewFileStore(dir)
	if err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("store dir: %v, mode %v", err, fi.Mode())
	}
	f, err := s.Create("s-1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create("s-1"); err == nil {
		t.Fatal("second Create of the same id succeeded")
	}
	c, err := recording.NewCastWriter(f, recording.CastHeader{Width: 80, Height: 24}, stepClock(t0, time.Millisecond), 0)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Output([]byte("first\r\n")); err != nil {
		t.Fatal(err)
	}
	// Before Close (a crash now), the file already holds a playable prefix.
	path, err := s.Path("s-1")
	if err != nil {
		t.Fatal(err)
	}
	prefix, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if _, ev, err := recording.ReadCast(bytes.NewReader(prefix), 1<<20); err != nil || len(ev) != 1 {
		t.Fatalf("prefix before close: %d events, %v", len(ev), err)
	}
	if err := c.Output([]byte("second\r\n")); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(); err != nil {
		t.Fatal(err)
	}
	sum, size, err := f.Close()
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := f.Close(); err == nil {
		t.Fatal("double Close succeeded")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want := sha256.Sum256(data)
	if sum != hex.EncodeToString(want[:]) || size != int64(len(data)) {
		t.Fatalf("Close = %s, %d; file sha256 %x, %d bytes", sum, size, want, len(data))
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Perm() != 0o600 {
		t.Fatalf("recording mode %v, want 0600", fi.Mode())
	}
	rc, err := s.Open("s-1")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("Open returned different bytes")
	}
}

func TestReadCastErrors(t *testing.T) {
	t.Parallel()
	const hdr = `{"version": 2, "width": 80, "height": 24}` + "\n"
	tests := []struct {
		name    string
		in      string
		max     int64
		wantErr string
	}{
		{name: "ok/header-only", in: hdr},
		{name: "ok/no-final-newline", in: hdr + `[0.1, "o", "x"]`},
		{name: "ok/unknown-code", in: hdr + `[0.1, "x", "whatever"]` + "\n"},
		{name: "ok/blank-line", in: hdr + "\n" + `[0.1, "o", "x"]` + "\n"},
		{name: "deny/empty", in: "", wantErr: "no header"},
		{name: "deny/not-json", in: "hello\n", wantErr: "line 1: header is not a JSON object"},
		{name: "deny/no-version", in: `{"width": 80, "height": 24}` + "\n", wantErr: "line 1: header has no version"},
		{name: "deny/version-1", in: `{"version": 1, "width": 80, "height": 24}` + "\n", wantErr: "line 1: asciicast version 1"},
		{name: "deny/width-0", in: `{"version": 2, "width": 0, "height": 24}` + "\n", wantErr: "line 1: terminal size 0x24"},
		{name: "deny/height-negative", in: `{"version": 2, "width": 80, "height": -1}` + "\n", wantErr: "line 1: terminal size"},
		{name: "deny/width-string", in: `{"version": 2, "width": "80", "height": 24}` + "\n", wantErr: "line 1: bad header"},
		{name: "deny/event-object", in: hdr + `{"t": 1}` + "\n", wantErr: "line 2: event is not a JSON array"},
		{name: "deny/event-short", in: hdr + `[0.1, "o"]` + "\n", wantErr: "line 2: event has 2 elements"},
		{name: "deny/time-string", in: hdr + `["0.1", "o", "x"]` + "\n", wantErr: "line 2: event time is not a number"},
		{name: "deny/time-negative", in: hdr + `[-1, "o", "x"]` + "\n", wantErr: "line 2: event time -1"},
		{name: "deny/code-number", in: hdr + `[0.1, 1, "x"]` + "\n", wantErr: "line 2: event code is not a string"},
		{name: "deny/code-empty", in: hdr + `[0.1, "", "x"]` + "\n", wantErr: "line 2: event code"},
		{name: "deny/data-number", in: hdr + `[0.1, "o", 5]` + "\n", wantErr: "line 2: event data is not a string"},
		{name: "deny/time-backwards", in: hdr + `[0.5, "o", "a"]` + "\n" + `[0.4, "o", "b"]` + "\n", wantErr: "line 3: event time 0.4 is before"},
		{name: "deny/bad-resize", in: hdr + `[0.1, "r", "80-24"]` + "\n", wantErr: "line 2: resize data"},
		{name: "deny/trailing-garbage", in: hdr + `[0.1, "o", "x"] [1]` + "\n", wantErr: "line 2:"},
		{name: "deny/too-big", in: hdr + `[0.1, "o", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"]` + "\n", max: 60, wantErr: "larger than 60 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			max := tt.max
			if max == 0 {
				max = 1 << 20
			}
			_, _, err := recording.ReadCast(strings.NewReader(tt.in), max)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("ReadCast: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Fatalf("ReadCast error = %v, want it to contain %q", err, tt.wantErr)
			}
		})
	}
}

func FuzzReadCast(f *testing.F) {
	golden, err := os.ReadFile(filepath.Join("testdata", "session.cast"))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(golden)
	f.Add([]byte(`{"version": 2, "width": 80, "height": 24}` + "\n" + `[0.1, "o", "x"]`))
	f.Add([]byte(`{"version": 2, "width": 1, "height": 1}` + "\n" + `[1e308, "r", "1x1"]` + "\n"))
	f.Add([]byte(`{"version": 2}`))
	f.Add([]byte("[0,\"o\",\"\\ud800\"]"))
	f.Add([]byte(""))
	f.Fuzz(func(t *testing.T, data []byte) {
		h, events, err := recording.ReadCast(bytes.NewReader(data), 1<<20)
		if err != nil {
			return
		}
		if h.Version != 2 || h.Width <= 0 || h.Height <= 0 {
			t.Fatalf("accepted bad header %+v", h)
		}
		last := 0.0
		for _, e := range events {
			if e.Time < last || e.Code == "" {
				t.Fatalf("accepted bad event %+v", e)
			}
			last = e.Time
		}
		// Whatever ReadCast accepts, Play must play without error.
		var sleeps time.Duration
		err = recording.Play(context.Background(), bytes.NewReader(data), io.Discard, recording.PlayOptions{
			Sleep: func(_ context.Context, d time.Duration) error { sleeps += d; return nil },
		})
		if err != nil {
			t.Fatalf("Play failed on a recording ReadCast accepted: %v", err)
		}
		if sleeps < 0 {
			t.Fatalf("negative sleep %s", sleeps)
		}
	})
}

func TestPlay(t *testing.T) {
	t.Parallel()
	const cast = `{"version": 2, "width": 80, "height": 24}
[0.5, "o", "a"]
[1.0, "r", "100x30"]
[1.5, "o", "b"]
[11.5, "o", "c"]
[11.5, "o", "d"]
`
	tests := []struct {
		name       string
		opts       recording.PlayOptions
		wantSleeps []time.Duration
	}{
		{name: "ok/defaults", wantSleeps: []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second}},
		{name: "ok/speed-2", opts: recording.PlayOptions{Speed: 2}, wantSleeps: []time.Duration{250 * time.Millisecond, 500 * time.Millisecond, time.Second}},
		{name: "ok/max-idle-300ms", opts: recording.PlayOptions{MaxIdle: 300 * time.Millisecond}, wantSleeps: []time.Duration{300 * time.Millisecond, 300 * time.Millisecond, 300 * time.Millisecond}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var sleeps []time.Duration
			tt.opts.Sleep = func(_ context.Context, d time.Duration) error { sleeps = append(sleeps, d); return nil }
			var out bytes.Buffer
			if err := recording.Play(context.Background(), strings.NewReader(cast), &out, tt.opts); err != nil {
				t.Fatal(err)
			}
			if out.String() != "abcd" {
				t.Fatalf("output %q, want abcd", out.String())
			}
			if diff := cmp.Diff(sleeps, tt.wantSleeps); diff != "" {
				t.Fatalf("sleeps (-got +want):\n%s", diff)
			}
		})
	}
	t.Run("deny/negative-speed", func(t *testing.T) {
		t.Parallel()
		if err := recording.Play(context.Background(), strings.NewReader(cast), io.Discard, recording.PlayOptions{Speed: -1}); err == nil {
			t.Fatal("negative speed accepted")
		}
	})
	t.Run("deny/cancelled", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		err := recording.Play(ctx, strings.NewReader(cast), io.Discard, recording.PlayOptions{})
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Play = %v, want context.Canceled", err)
		}
	})
	t.Run("ok/real-sleep-respects-ctx", func(t *testing.T) {
		t.Parallel()
		ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
		defer cancel()
		long := `{"version": 2, "width": 80, "height": 24}` + "\n" + `[100, "o", "x"]` + "\n"
		err := recording.Play(ctx, strings.NewReader(long), io.Discard, recording.PlayOptions{MaxIdle: time.Hour})
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Play = %v, want DeadlineExceeded", err)
		}
	})
	t.Run("deny/bad-event", func(t *testing.T) {
		t.Parallel()
		bad := `{"version": 2, "width": 80, "height": 24}` + "\n" + `oops` + "\n"
		err := recording.Play(context.Background(), strings.NewReader(bad), io.Discard, recording.PlayOptions{})
		if err == nil || !strings.Contains(err.Error(), "line 2") {
			t.Fatalf("Play = %v, want a line 2 error", err)
		}
	})
}
