package audit

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// MaxLineSize bounds one JSON-lines record, without its newline.
const MaxLineSize = 1 << 20

// ErrTooMany is returned by ReadJSONL when the input holds more events than
// allowed.
var ErrTooMany = errors.New("audit: too many events")

// WriteJSONL writes events to w as JSON lines: one JSON object per event,
// each followed by "\n". It fails, having written the events before it, on
// an event whose line would exceed MaxLineSize.
func WriteJSONL(w io.Writer, events []Event) error {
	bw := bufio.NewWriter(w)
	for i := range events {
		line, err := json.Marshal(&events[i])
		if err != nil {
			return fmt.Errorf("audit: encoding event seq %d: %w", events[i].Seq, err)
		}
		if len(line) > MaxLineSize {
			return fmt.Errorf("audit: event seq %d is %d bytes, over the %d-byte line limit", events[i].Seq, len(line), MaxLineSize)
		}
		line = append(line, '\n')
		if _, err := bw.Write(line); err != nil {
			return fmt.Errorf("audit: writing event seq %d: %w", events[i].Seq, err)
		}
	}
	if err := bw.Flush(); err != nil {
		return fmt.Errorf("audit: writing events: %w", err)
	}
	return nil
}

// ReadJSONL reads at most max events written by WriteJSONL from r. Empty
// lines are skipped; a line longer than MaxLineSize, a line that is not one
// JSON object, an unknown field, or more than max events is an error
// naming the line. max must be positive. ReadJSONL does not verify the
// chain: call Verify on the result.
func ReadJSONL(r io.Reader, max int) ([]Event, error) {
	if max <= 0 {
		return nil, fmt.Errorf("audit: reading events: max must be positive, got %d", max)
	}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64*1024), MaxLineSize+2) // room for "\r\n" handling
	var events []Event
	lineNo := 0
	for sc.Scan() {
		lineNo++
		line := sc.Bytes()
		if len(line) > MaxLineSize {
			return nil, fmt.Errorf("audit: line %d: longer than %d bytes", lineNo, MaxLineSize)
		}
		trimmed := bytes.TrimSpace(line)
		if len(trimmed) == 0 {
			continue
		}
		if len(events) >= max {
			return nil, fmt.Errorf("audit: line %d: %w (limit %d)", lineNo, ErrTooMany, max)
		}
		e, err := decodeLine(trimmed)
		if err != nil {
			return nil, fmt.Errorf("audit: line %d: %w", lineNo, err)
		}
		events = append(events, e)
	}
	if err := sc.Err(); err != nil {
		if errors.Is(err, bufio.ErrTooLong) {
			return nil, fmt.Errorf("audit: line %d: longer than %d bytes", lineNo+1, MaxLineSize)
		}
		return nil, fmt.Errorf("audit: reading events: %w", err)
	}
	return events, nil
}

func decodeLine(line []byte) (Event, error) {
	if line[0] != '{' {
		return Event{}, errors.New("not a JSON object")
	}
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	var e Event
	if err := dec.Decode(&e); err != nil {
		return Event{}, fmt.Errorf("decoding event: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return Event{}, errors.New("trailing data after the JSON object")
	}
	return e, nil
}
