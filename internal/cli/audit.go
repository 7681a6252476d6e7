package cli

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/client"
)

// Bounds of `pinhole audit verify`.
const (
	// maxAuditEvents bounds how many events are verified in one run.
	maxAuditEvents = 10_000_000
	auditPageSize  = 1000
)

// errVerifyFailed marks a failed verification, already reported.
var errVerifyFailed = errors.New("audit verification failed")

func auditVerifyCmd() *command {
	c := &command{
		name:    "verify",
		usage:   "[--file EVENTS.jsonl]",
		summary: "check the audit log's hash chain",
		help: "Fetches every audit event from the broker (or reads a JSON-lines export) and\n" +
			"checks that the chain starts at seq 1 and has no edited, dropped, reordered or\n" +
			"inserted event. Exits 1 naming the first bad seq.",
	}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		file := fs.String("file", "", "verify this JSON-lines export instead of the broker's log")
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos); err != nil {
			return err
		}
		var events []audit.Event
		if *file != "" {
			events, err = readAuditFile(*file)
		} else {
			var cl *client.Client
			if cl, err = e.client(); err == nil {
				events, err = fetchAudit(e, cl)
			}
		}
		if err != nil {
			return err
		}
		if err := verifyChain(events); err != nil {
			var ve *audit.VerifyError
			if errors.As(err, &ve) {
				fmt.Fprintf(e.stdout, "audit: verification FAILED at seq %d: %s\n", ve.Seq, ve.Reason)
				return &exitError{code: 1}
			}
			return err
		}
		head := audit.Event{Hash: audit.GenesisHash}
		if len(events) > 0 {
			head = events[len(events)-1]
		}
		fmt.Fprintf(e.stdout, "audit: %d events verified; head seq %d hash %s\n", len(events), head.Seq, head.Hash)
		return nil
	}
	return c
}

// verifyChain checks a complete log: it must start at seq 1, then
// audit.Verify checks every link.
func verifyChain(events []audit.Event) error {
	if len(events) > 0 && events[0].Seq != 1 {
		return &audit.VerifyError{Seq: events[0].Seq, Reason: "the log does not start at seq 1: earlier events are missing"}
	}
	return audit.Verify(events)
}

func readAuditFile(path string) ([]audit.Event, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading audit events: %w", err)
	}
	defer f.Close()
	events, err := audit.ReadJSONL(f, maxAuditEvents)
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", path, err)
	}
	return events, nil
}

// fetchAudit reads every page of the broker's audit log.
func fetchAudit(e *env, cl *client.Client) ([]audit.Event, error) {
	var (
		events []audit.Event
		after  int64
	)
	for {
		page, err := cl.AuditEvents(e.ctx, after, auditPageSize)
		if err != nil {
			return nil, fmt.Errorf("fetching audit events after seq %d: %w", after, err)
		}
		if len(events)+len(page.Events) > maxAuditEvents {
			return nil, fmt.Errorf("the audit log has more than %d events; verify an export with --file in parts", maxAuditEvents)
		}
		for _, raw := range page.Events {
			ev, err := decodeEvent(raw)
			if err != nil {
				return nil, fmt.Errorf("audit event after seq %d: %w", after, err)
			}
			events = append(events, ev)
		}
		if !page.More {
			return events, nil
		}
		if page.Next <= after {
			return nil, fmt.Errorf("the broker's audit page after seq %d does not advance", after)
		}
		after = page.Next
	}
}

// decodeEvent decodes one event strictly: an unknown field would not be
// covered by the hash, so it is refused.
func decodeEvent(raw json.RawMessage) (audit.Event, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.DisallowUnknownFields()
	var ev audit.Event
	if err := dec.Decode(&ev); err != nil {
		return audit.Event{}, fmt.Errorf("decoding: %w", err)
	}
	if _, err := dec.Token(); !errors.Is(err, io.EOF) {
		return audit.Event{}, errors.New("trailing data after the event")
	}
	return ev, nil
}

func auditExportCmd() *command {
	c := &command{
		name:    "export",
		usage:   "[--out EVENTS.jsonl]",
		summary: "write the audit log as JSON lines",
		help: "Fetches every audit event from the broker and writes them as JSON lines, one\n" +
			"event a line, to --out (created 0600) or to standard output. `pinhole audit verify\n" +
			"--file` checks such an export without the broker.",
	}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		out := fs.String("out", "", "write to this `file` (created 0600, must not exist) instead of standard output")
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos); err != nil {
			return err
		}
		cl, err := e.client()
		if err != nil {
			return err
		}
		events, err := fetchAudit(e, cl)
		if err != nil {
			return err
		}
		w := e.stdout
		if *out != "" {
			f, err := os.OpenFile(*out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return fmt.Errorf("creating export: %w", err)
			}
			defer f.Close()
			w = f
		}
		if err := audit.WriteJSONL(w, events); err != nil {
			return fmt.Errorf("writing export: %w", err)
		}
		if *out != "" {
			fmt.Fprintf(e.stderr, "audit: %d events written to %s\n", len(events), *out)
		}
		return nil
	}
	return c
}
