package recording

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
)

// maxLineLen bounds one line of a recording. The proxy writes at most a
// 32 KiB read per event, which JSON-escapes to at most 6 times as much.
const maxLineLen = 1 << 20

// maxCodeLen bounds an event code.
const maxCodeLen = 16

// CastEvent is one event of a recording.
type CastEvent struct {
	// Time is the event time in seconds since the start of the recording.
	Time float64
	// Code is the event type: "o" output, "i" input, "r" resize, "m" marker,
	// or something a player ignores.
	Code string
	// Data is the event payload.
	Data string
}

// ReadCast reads and validates a whole asciicast v2 recording of at most
// maxBytes bytes: version 2, positive width and height, events that are
// [time, code, data] arrays with a finite, non-negative and non-decreasing
// time, and well-formed "r" events. Errors name the offending line.
func ReadCast(r io.Reader, maxBytes int64) (CastHeader, []CastEvent, error) {
	if maxBytes <= 0 {
		return CastHeader{}, nil, errors.New("recording: ReadCast needs a positive size limit")
	}
	d := newDecoder(r, maxBytes)
	h, err := d.header()
	if err != nil {
		return CastHeader{}, nil, err
	}
	var events []CastEvent
	for {
		ev, err := d.next()
		if errors.Is(err, io.EOF) {
			return h, events, nil
		}
		if err != nil {
			return CastHeader{}, nil, err
		}
		events = append(events, ev)
	}
}

// decoder reads a recording line by line with bounded memory.
type decoder struct {
	br       *bufio.Reader
	maxBytes int64 // 0: unlimited
	read     int64
	line     int
	last     float64
}

func newDecoder(r io.Reader, maxBytes int64) *decoder {
	return &decoder{br: bufio.NewReaderSize(r, 64<<10), maxBytes: maxBytes}
}

// readLine returns the next line without its newline; io.EOF at the end.
func (d *decoder) readLine() ([]byte, error) {
	var line []byte
	for {
		chunk, err := d.br.ReadSlice('\n')
		d.read += int64(len(chunk))
		if d.maxBytes > 0 && d.read > d.maxBytes {
			return nil, fmt.Errorf("recording: line %d: recording is larger than %d bytes", d.line+1, d.maxBytes)
		}
		if len(line)+len(chunk) > maxLineLen {
			return nil, fmt.Errorf("recording: line %d: longer than %d bytes", d.line+1, maxLineLen)
		}
		line = append(line, chunk...)
		switch {
		case err == nil:
			d.line++
			return line[:len(line)-1], nil
		case errors.Is(err, bufio.ErrBufferFull):
			continue
		case errors.Is(err, io.EOF):
			if len(line) == 0 {
				return nil, io.EOF
			}
			d.line++
			return line, nil // last line without a newline
		default:
			return nil, fmt.Errorf("recording: reading line %d: %w", d.line+1, err)
		}
	}
}

func (d *decoder) header() (CastHeader, error) {
	line, err := d.readLine()
	if errors.Is(err, io.EOF) {
		return CastHeader{}, errors.New("recording: empty recording, no header line")
	}
	if err != nil {
		return CastHeader{}, err
	}
	if len(line) > maxHeaderLen {
		return CastHeader{}, fmt.Errorf("recording: line 1: header longer than %d bytes", maxHeaderLen)
	}
	var probe struct {
		Version *int `json:"version"`
	}
	if err := json.Unmarshal(line, &probe); err != nil {
		return CastHeader{}, fmt.Errorf("recording: line 1: header is not a JSON object: %w", err)
	}
	if probe.Version == nil {
		return CastHeader{}, errors.New("recording: line 1: header has no version")
	}
	if *probe.Version != Version {
		return CastHeader{}, fmt.Errorf("recording: line 1: asciicast version %d is not supported (want %d)", *probe.Version, Version)
	}
	var h CastHeader
	if err := json.Unmarshal(line, &h); err != nil {
		return CastHeader{}, fmt.Errorf("recording: line 1: bad header: %w", err)
	}
	if err := checkSize(h.Width, h.Height); err != nil {
		return CastHeader{}, fmt.Errorf("recording: line 1: %w", err)
	}
	return h, nil
}

// next returns the next event, or io.EOF after the last one. Blank lines are
// skipped.
func (d *decoder) next() (CastEvent, error) {
	for {
		line, err := d.readLine()
		if err != nil {
			return CastEvent{}, err
		}
		if len(bytes.TrimSpace(line)) == 0 {
			continue
		}
		ev, err := parseEvent(line)
		if err != nil {
			return CastEvent{}, fmt.Errorf("recording: line %d: %w", d.line, err)
		}
		if ev.Time < d.last {
			return CastEvent{}, fmt.Errorf("recording: line %d: event time %g is before the previous event's %g", d.line, ev.Time, d.last)
		}
		d.last = ev.Time
		return ev, nil
	}
}

func parseEvent(line []byte) (CastEvent, error) {
	var parts []json.RawMessage
	if err := json.Unmarshal(line, &parts); err != nil {
		return CastEvent{}, fmt.Errorf("event is not a JSON array: %w", err)
	}
	if len(parts) != 3 {
		return CastEvent{}, fmt.Errorf("event has %d elements, want [time, code, data]", len(parts))
	}
	var ev CastEvent
	if err := json.Unmarshal(parts[0], &ev.Time); err != nil {
		return CastEvent{}, fmt.Errorf("event time is not a number: %w", err)
	}
	if math.IsNaN(ev.Time) || math.IsInf(ev.Time, 0) || ev.Time < 0 {
		return CastEvent{}, fmt.Errorf("event time %g is negative or not finite", ev.Time)
	}
	if err := json.Unmarshal(parts[1], &ev.Code); err != nil {
		return CastEvent{}, fmt.Errorf("event code is not a string: %w", err)
	}
	if ev.Code == "" || len(ev.Code) > maxCodeLen {
		return CastEvent{}, fmt.Errorf("event code %q is empty or too long", ev.Code)
	}
	if err := json.Unmarshal(parts[2], &ev.Data); err != nil {
		return CastEvent{}, fmt.Errorf("event data is not a string: %w", err)
	}
	if ev.Code == "r" {
		if _, _, err := ParseResize(ev.Data); err != nil {
			return CastEvent{}, err
		}
	}
	return ev, nil
}

// ParseResize parses the data of an "r" event ("COLSxROWS").
func ParseResize(data string) (cols, rows int, err error) {
	c, r, ok := strings.Cut(data, "x")
	if ok {
		cols, err = strconv.Atoi(c)
		if err == nil {
			rows, err = strconv.Atoi(r)
		}
	}
	if !ok || err != nil || checkSize(cols, rows) != nil {
		return 0, 0, fmt.Errorf("resize data %q is not COLSxROWS within 1..%d", data, MaxDimension)
	}
	return cols, rows, nil
}
