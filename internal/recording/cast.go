// Package recording writes, stores, reads and replays session recordings.
//
// Terminal sessions are recorded as asciicast v2
// (https://docs.asciinema.org/manual/asciicast/v2/): newline-delimited JSON,
// a header object on the first line and one [time, code, data] array per
// event after it, playable by `asciinema play`. Recordings are streamed to
// disk as they happen so a crash leaves a playable prefix, closed with a
// SHA-256 for the audit log, and capped in size with an explicit truncation
// marker rather than silent loss.
package recording

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"
)

// Version is the asciicast format version written and accepted.
const Version = 2

// Limits shared by the writer and the reader.
const (
	// MaxDimension is the largest terminal width or height accepted.
	MaxDimension = 10000
	// maxHeaderLen bounds the encoded header line.
	maxHeaderLen = 64 << 10
	// markerReserve is the room kept free under maxBytes for the truncation
	// marker, so the marker itself never breaks the cap.
	markerReserve = 128
)

var (
	// ErrTruncated is returned by a CastWriter once the recording reached its
	// size cap. The recording ends with a marker event saying so.
	ErrTruncated = errors.New("recording: size cap reached, recording truncated")
	// ErrClosed is returned by a CastWriter after Close.
	ErrClosed = errors.New("recording: writer closed")
)

// CastHeader is the first line of an asciicast v2 recording. The pinhole_*
// fields are extensions (players ignore unknown header fields) that tie a
// recording to its grant and session.
type CastHeader struct {
	// Version is always 2; NewCastWriter sets it.
	Version int `json:"version"`
	// Width and Height are the initial terminal size in columns and rows.
	Width  int `json:"width"`
	Height int `json:"height"`
	// Timestamp is the start of the recording in unix seconds; NewCastWriter
	// fills it from its clock when zero.
	Timestamp int64 `json:"timestamp,omitempty"`
	// Command is the command that was run (empty for a shell).
	Command string `json:"command,omitempty"`
	// Title is a human-readable title.
	Title string `json:"title,omitempty"`
	// Env holds selected environment variables, usually TERM and SHELL.
	Env map[string]string `json:"env,omitempty"`
	// Grant is the grant the session ran under.
	Grant string `json:"pinhole_grant,omitempty"`
	// User is the requester who ran the session.
	User string `json:"pinhole_user,omitempty"`
	// Target is the target name.
	Target string `json:"pinhole_target,omitempty"`
	// Session is the session id.
	Session string `json:"pinhole_session,omitempty"`
}

// CastWriter writes an asciicast v2 recording. It is safe for concurrent use.
// Every event is written to the underlying writer with one Write call.
type CastWriter struct {
	now   func() time.Time
	start time.Time
	max   int64

	mu      sync.Mutex
	w       io.Writer
	written int64   // bytes written so far, header included
	last    float64 // time of the last event, to keep times non-decreasing
	pending []byte  // incomplete trailing UTF-8 sequence of the last Output
	err     error   // sticky: ErrTruncated, ErrClosed or a write error
	buf     bytes.Buffer
}

// NewCastWriter writes h (with Version 2, and Timestamp from now when zero)
// to w as the first line and returns a writer for the events. now is the
// clock (time.Now when nil); event times are measured from the moment
// NewCastWriter is called. maxBytes caps the whole recording including the
// header; 0 or less means no cap. When an event would break the cap, one
// marker event "pinhole: recording truncated at N bytes" is written instead
// and every later call returns ErrTruncated.
func NewCastWriter(w io.Writer, h CastHeader, now func() time.Time, maxBytes int64) (*CastWriter, error) {
	if w == nil {
		return nil, errors.New("recording: nil writer")
	}
	if now == nil {
		now = time.Now
	}
	if h.Version != 0 && h.Version != Version {
		return nil, fmt.Errorf("recording: cannot write asciicast version %d", h.Version)
	}
	h.Version = Version
	if err := checkSize(h.Width, h.Height); err != nil {
		return nil, fmt.Errorf("recording: header: %w", err)
	}
	c := &CastWriter{now: now, w: w, max: maxBytes}
	c.start = now()
	if h.Timestamp == 0 {
		h.Timestamp = c.start.Unix()
	}
	line, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("recording: encoding header: %w", err)
	}
	line = append(line, '\n')
	if len(line) > maxHeaderLen {
		return nil, fmt.Errorf("recording: header is %d bytes, more than %d", len(line), maxHeaderLen)
	}
	if maxBytes > 0 && int64(len(line))+markerReserve > maxBytes {
		return nil, fmt.Errorf("recording: size cap %d bytes is too small for the header", maxBytes)
	}
	if err := c.writeLocked(line); err != nil {
		return nil, err
	}
	return c, nil
}

func checkSize(cols, rows int) error {
	if cols <= 0 || rows <= 0 || cols > MaxDimension || rows > MaxDimension {
		return fmt.Errorf("terminal size %dx%d out of range 1..%d", cols, rows, MaxDimension)
	}
	return nil
}

// Output records p as an "o" event. An incomplete UTF-8 sequence at the end
// of p is held back and prepended to the next Output (or flushed by Close),
// so a character split across two writes is recorded intact.
func (c *CastWriter) Output(p []byte) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	data := p
	if len(c.pending) > 0 {
		data = append(c.pending, p...)
		c.pending = nil
	}
	cut := completeUTF8(data)
	if cut < len(data) {
		c.pending = append([]byte(nil), data[cut:]...)
		data = data[:cut]
	}
	if len(data) == 0 {
		return nil
	}
	return c.eventLocked("o", string(data))
}

// completeUTF8 returns the length of the longest prefix of p that does not
// end in an incomplete (but possibly valid) UTF-8 sequence.
func completeUTF8(p []byte) int {
	n := len(p)
	for i := n - 1; i >= 0 && i >= n-utf8.UTFMax; i-- {
		if utf8.RuneStart(p[i]) {
			if !utf8.FullRune(p[i:]) {
				return i
			}
			return n
		}
	}
	return n
}

// Resize records an "r" event "COLSxROWS".
func (c *CastWriter) Resize(cols, rows int) error {
	if err := checkSize(cols, rows); err != nil {
		return fmt.Errorf("recording: resize: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	return c.eventLocked("r", strconv.Itoa(cols)+"x"+strconv.Itoa(rows))
}

// Marker records an "m" event with label.
func (c *CastWriter) Marker(label string) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.err != nil {
		return c.err
	}
	return c.eventLocked("m", label)
}

// Close flushes held-back bytes of an incomplete UTF-8 sequence (recorded as
// U+FFFD) and stops the writer. It does not close the underlying writer. It
// returns the first write error, if any; reaching the size cap is not an
// error here because it was already reported and marked in the recording.
func (c *CastWriter) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if errors.Is(c.err, ErrClosed) {
		return ErrClosed
	}
	if c.err == nil && len(c.pending) > 0 {
		data := string(c.pending)
		c.pending = nil
		_ = c.eventLocked("o", data)
	}
	err := c.err
	c.err = ErrClosed
	if errors.Is(err, ErrTruncated) {
		return nil
	}
	return err
}

// BytesWritten returns how many bytes the recording has so far.
func (c *CastWriter) BytesWritten() int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.written
}

func (c *CastWriter) eventLocked(code, data string) error {
	t := c.now().Sub(c.start).Seconds()
	if t < c.last {
		t = c.last
	}
	line := c.encodeLocked(t, code, data)
	if c.max > 0 && c.written+int64(len(line)) > c.max-markerReserve {
		marker := c.encodeLocked(t, "m", fmt.Sprintf("pinhole: recording truncated at %d bytes", c.written))
		if err := c.writeLocked(marker); err != nil {
			return err
		}
		c.err = ErrTruncated
		return ErrTruncated
	}
	c.last = t
	return c.writeLocked(line)
}

func (c *CastWriter) encodeLocked(t float64, code, data string) []byte {
	c.buf.Reset()
	c.buf.WriteByte('[')
	c.buf.WriteString(strconv.FormatFloat(t, 'f', 6, 64))
	c.buf.WriteString(", ")
	enc := json.NewEncoder(&c.buf)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(code) // strings always encode
	c.buf.Truncate(c.buf.Len() - 1)
	c.buf.WriteString(", ")
	_ = enc.Encode(data)
	c.buf.Truncate(c.buf.Len() - 1)
	c.buf.WriteString("]\n")
	return append([]byte(nil), c.buf.Bytes()...)
}

func (c *CastWriter) writeLocked(line []byte) error {
	n, err := c.w.Write(line)
	c.written += int64(n)
	if err == nil && n < len(line) {
		err = io.ErrShortWrite
	}
	if err != nil {
		c.err = fmt.Errorf("recording: writing event: %w", err)
		return c.err
	}
	return nil
}
