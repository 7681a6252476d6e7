package cli

import (
	"bufio"
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
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
		usage:   "[--file EVENTS.jsonl] [--witness CHECKPOINTS.jsonl] [--audit-key KEY]",
		summary: "check the audit log's hash chain and signed checkpoints",
		help: "Fetches every audit event from the broker (or reads a JSON-lines export) and\n" +
			"checks that the chain starts at seq 1 and has no edited, dropped, reordered or\n" +
			"inserted event. Then it checks the broker's newest signed checkpoint, and with\n" +
			"--witness the newest checkpoint in a witness file (the broker's --audit-witness):\n" +
			"a checkpoint proves that no event up to its seq was dropped or re-hashed. The\n" +
			"checkpoint key comes from the broker unless pinned with --audit-key (base64).\n" +
			"Exits 1 naming the first bad seq.",
	}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		file := fs.String("file", "", "verify this JSON-lines export instead of the broker's log")
		witness := fs.String("witness", "", "also check the newest checkpoint in this witness `file`")
		keyB64 := fs.String("audit-key", "", "the checkpoint signing `key` (base64 Ed25519); default: the broker's")
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos); err != nil {
			return err
		}
		// Check what is cheap to check before reading a whole log.
		if *keyB64 != "" {
			if _, err := checkpointKey(e, nil, *keyB64); err != nil {
				return err
			}
		}
		if *witness != "" {
			if _, err := readWitness(*witness); err != nil {
				return err
			}
		}
		var events []audit.Event
		var cl *client.Client
		if *file != "" {
			events, err = readAuditFile(*file)
		} else if cl, err = e.client(); err == nil {
			events, err = fetchAudit(e, cl)
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
		return verifyCheckpoints(e, cl, events, *witness, *keyB64)
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
	if len(events) == 0 {
		// Every log starts with broker.started: an empty export proves
		// nothing and is most likely the wrong file.
		return nil, fmt.Errorf("%s holds no audit events", path)
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

// verifyCheckpoints checks the broker's newest checkpoint (when talking to
// the broker) and the newest one in the witness file against events.
func verifyCheckpoints(e *env, cl *client.Client, events []audit.Event, witness, keyB64 string) error {
	type named struct {
		from string
		cp   audit.Checkpoint
	}
	var cps []named
	if cl != nil {
		w, err := cl.AuditCheckpoint(e.ctx)
		var ae *client.APIError
		switch {
		case errors.As(err, &ae) && ae.Status == 404:
			fmt.Fprintf(e.stdout, "audit: the broker has no signed checkpoint yet\n")
		case err != nil:
			return fmt.Errorf("fetching the audit checkpoint: %w", err)
		default:
			cps = append(cps, named{"broker", audit.Checkpoint{Seq: w.Seq, Hash: w.Hash, Time: w.Time, KeyID: w.KeyID, Signature: w.Signature}})
		}
	}
	if witness != "" {
		all, err := readWitness(witness)
		if err != nil {
			return err
		}
		// Every witnessed checkpoint must hold, not just the newest: a
		// rewritten log re-signed later still contradicts the older ones.
		for _, cp := range all {
			cps = append(cps, named{"witness", cp})
		}
	}
	if witness == "" {
		fmt.Fprintf(e.stderr, "audit: warning: no witness file given (--witness): nothing outside the broker proves that the newest events were not cut off or the chain re-hashed\n")
	}
	if len(cps) == 0 {
		return nil
	}
	pub, err := checkpointKey(e, cl, keyB64)
	if err != nil {
		return err
	}
	matched := map[string]int{}
	var newest = map[string]audit.Checkpoint{}
	for _, c := range cps {
		err := audit.VerifyCheckpoint(pub, c.cp, events)
		switch {
		case err == nil:
			matched[c.from]++
			if c.cp.Seq >= newest[c.from].Seq {
				newest[c.from] = c.cp
			}
			continue
		case errors.Is(err, audit.ErrCheckpointMissing):
			last := int64(0)
			if len(events) > 0 {
				last = events[len(events)-1].Seq
			}
			fmt.Fprintf(e.stdout, "audit: verification FAILED at seq %d: the log ends at seq %d but a signed %s checkpoint covers seq %d: events were dropped\n",
				last+1, last, c.from, c.cp.Seq)
		case errors.Is(err, audit.ErrCheckpointMismatch):
			fmt.Fprintf(e.stdout, "audit: verification FAILED at seq %d: the event differs from the signed %s checkpoint: the chain was rewritten\n", c.cp.Seq, c.from)
		default:
			fmt.Fprintf(e.stdout, "audit: verification FAILED: %s checkpoint at seq %d: %v\n", c.from, c.cp.Seq, err)
		}
		return &exitError{code: 1}
	}
	for _, from := range []string{"broker", "witness"} {
		if cp, ok := newest[from]; ok {
			fmt.Fprintf(e.stdout, "audit: %d %s checkpoint(s) match, newest at seq %d (key %s, %s)\n", matched[from], from, cp.Seq, cp.KeyID, cp.Time.UTC().Format("2006-01-02 15:04:05 UTC"))
		}
	}
	return nil
}

// checkpointKey returns the pinned key, or the broker's.
func checkpointKey(e *env, cl *client.Client, keyB64 string) (ed25519.PublicKey, error) {
	if keyB64 == "" && cl != nil {
		ca, err := cl.CA(e.ctx)
		if err != nil {
			return nil, fmt.Errorf("fetching the checkpoint key: %w", err)
		}
		if len(ca.AuditKeys) == 0 {
			return nil, errors.New("the broker publishes no checkpoint key; pin one with --audit-key")
		}
		keyB64 = ca.AuditKeys[0]
	}
	if keyB64 == "" {
		return nil, errors.New("checking a witness file without the broker needs --audit-key")
	}
	b, err := base64.StdEncoding.DecodeString(keyB64)
	if err != nil || len(b) != ed25519.PublicKeySize {
		return nil, fmt.Errorf("--audit-key: want a base64 Ed25519 public key")
	}
	return ed25519.PublicKey(b), nil
}

// readWitness reads every checkpoint of a witness file.
func readWitness(path string) ([]audit.Checkpoint, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("reading witness file: %w", err)
	}
	defer f.Close()
	var out []audit.Checkpoint
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 64<<10)
	line := 0
	for sc.Scan() {
		line++
		if len(bytes.TrimSpace(sc.Bytes())) == 0 {
			continue
		}
		var cp audit.Checkpoint
		if err := json.Unmarshal(sc.Bytes(), &cp); err != nil {
			return nil, fmt.Errorf("witness file line %d: %w", line, err)
		}
		if len(out) >= maxAuditEvents {
			return nil, fmt.Errorf("witness file has more than %d checkpoints", maxAuditEvents)
		}
		out = append(out, cp)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading witness file: %w", err)
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("witness file %s has no checkpoint", path)
	}
	return out, nil
}
