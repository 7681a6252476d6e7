package audit

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
)

var update = flag.Bool("update", false, "rewrite golden files under testdata")

var t0 = time.Date(2026, 3, 14, 9, 26, 53, 589793238, time.UTC)

// goldenEvents are fixed events whose canonical encodings and sealed chain
// are kept under testdata. They must never change: the encoding is stored.
func goldenEvents() []Event {
	return []Event{
		{Seq: 1, Time: t0, Type: TypeBrokerStarted, Actor: "system", Details: map[string]string{"version": "1.0.0"}},
		{Seq: 2, Time: t0.Add(time.Second).In(time.FixedZone("CET", 3600)), Type: TypeRequestCreated, Actor: "alice",
			Device: "dev-1", Src: "192.0.2.7", Target: "db-prod", Request: "req-1",
			Details: map[string]string{"reason": "INC-4821 vacuum\nline two", "ttl": "45m", "a=b": "1:2", "": "empty key"}},
		{Seq: 3, Time: time.Date(2026, 3, 14, 9, 27, 0, 0, time.UTC), Type: TypeGrantIssued, Actor: "bob", Request: "req-1",
			Grant: "grant-1", Target: "db-prod", Details: map[string]string{}},
		{Seq: 4, Time: time.Date(2026, 3, 14, 9, 28, 0, 1000, time.UTC), Type: TypeFlowDenied, Src: "100.64.0.2",
			Target: "10.0.4.12:5432", Details: map[string]string{"ünïcödé": "✓"}},
	}
}

func sealAll(events []Event) []Event {
	out := make([]Event, len(events))
	prev := GenesisHash
	for i, e := range events {
		out[i] = Seal(prev, e)
		prev = out[i].Hash
	}
	return out
}

func golden(t *testing.T, name string, got []byte) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, got, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("reading golden file (run go test -update to create it): %v", err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("%s differs from golden file (-want +got):\n%s", name, cmp.Diff(string(want), string(got)))
	}
}

func TestCanonicalGolden(t *testing.T) {
	var all bytes.Buffer
	for _, e := range sealAll(goldenEvents()) {
		all.Write(Canonical(e))
		all.WriteString("----\n")
	}
	golden(t, "canonical.golden", all.Bytes())

	var chain bytes.Buffer
	if err := WriteJSONL(&chain, sealAll(goldenEvents())); err != nil {
		t.Fatal(err)
	}
	golden(t, "chain.golden.jsonl", chain.Bytes())

	// The stored chain must still read back and verify.
	events, err := ReadJSONL(bytes.NewReader(chain.Bytes()), 100)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(events); err != nil {
		t.Fatal(err)
	}
}

func TestCanonicalIgnoresHashZoneAndNilDetails(t *testing.T) {
	t.Parallel()
	a := Event{Seq: 7, Time: t0, Type: "x", PrevHash: GenesisHash}
	b := a
	b.Hash = "something"
	b.Time = t0.In(time.FixedZone("X", -7*3600))
	b.Details = map[string]string{}
	if !bytes.Equal(Canonical(a), Canonical(b)) {
		t.Errorf("Canonical differs:\n%s\n%s", Canonical(a), Canonical(b))
	}
	// Values that would collide under naive concatenation must not.
	c := a
	c.Actor, c.Device = "ab", ""
	d := a
	d.Actor, d.Device = "a", "b"
	if bytes.Equal(Canonical(c), Canonical(d)) {
		t.Error("Canonical is ambiguous across field boundaries")
	}
	e := a
	e.Details = map[string]string{"k": "v=1"}
	f := a
	f.Details = map[string]string{"k=v": "1"}
	if bytes.Equal(Canonical(e), Canonical(f)) {
		t.Error("Canonical is ambiguous across details keys and values")
	}
}

func TestVerify(t *testing.T) {
	t.Parallel()
	base := func() []Event {
		var evs []Event
		for i := int64(1); i <= 6; i++ {
			evs = append(evs, Event{Seq: i, Time: t0.Add(time.Duration(i) * time.Second), Type: TypeFlowAllowed,
				Actor: "alice", Details: map[string]string{"n": string(rune('a' + i))}})
		}
		return sealAll(evs)
	}
	// reseal re-seals events from index i on, as an attacker without a
	// checkpoint could.
	reseal := func(evs []Event, from int) []Event {
		prev := GenesisHash
		if from > 0 {
			prev = evs[from-1].Hash
		}
		for i := from; i < len(evs); i++ {
			evs[i] = Seal(prev, evs[i])
			prev = evs[i].Hash
		}
		return evs
	}
	tests := []struct {
		name    string
		mutate  func([]Event) []Event
		wantSeq int64 // 0 = valid
		reason  string
	}{
		{name: "ok/full chain", mutate: func(e []Event) []Event { return e }},
		{name: "ok/empty", mutate: func([]Event) []Event { return nil }},
		{name: "ok/excerpt from seq 3", mutate: func(e []Event) []Event { return e[2:] }},
		{name: "ok/truncated tail (needs a checkpoint)", mutate: func(e []Event) []Event { return e[:4] }},
		{name: "edit/actor", mutate: func(e []Event) []Event { e[2].Actor = "mallory"; return e }, wantSeq: 3, reason: "hash does not match"},
		{name: "edit/details value", mutate: func(e []Event) []Event { e[3].Details = map[string]string{"n": "z"}; return e }, wantSeq: 4, reason: "hash does not match"},
		{name: "edit/time", mutate: func(e []Event) []Event { e[5].Time = e[5].Time.Add(time.Nanosecond); return e }, wantSeq: 6, reason: "hash does not match"},
		{name: "edit/resealed breaks next link", mutate: func(e []Event) []Event {
			e[2].Actor = "mallory"
			e[2] = Seal(e[2].PrevHash, e[2])
			return e
		}, wantSeq: 4, reason: "prev_hash does not match the hash of seq 3"},
		{name: "edit/prev_hash of first", mutate: func(e []Event) []Event { e[0] = Seal(strings.Repeat("1", 64), e[0]); return e }, wantSeq: 1, reason: "genesis"},
		{name: "drop/middle", mutate: func(e []Event) []Event { return append(e[:2], e[3:]...) }, wantSeq: 4, reason: "want seq 3 after seq 2"},
		{name: "drop/first", mutate: func(e []Event) []Event { return e[1:] }},
		{name: "drop/middle renumbered and resealed is caught by checkpoint only", mutate: func(e []Event) []Event {
			e = append(e[:2], e[3:]...)
			for i := 2; i < len(e); i++ {
				e[i].Seq--
			}
			return reseal(e, 2)
		}},
		{name: "drop/middle renumbered, not resealed", mutate: func(e []Event) []Event {
			e = append(e[:2], e[3:]...)
			for i := 2; i < len(e); i++ {
				e[i].Seq--
			}
			return e
		}, wantSeq: 3, reason: "prev_hash does not match the hash of seq 2"},
		{name: "reorder/swap", mutate: func(e []Event) []Event { e[2], e[3] = e[3], e[2]; return e }, wantSeq: 4, reason: "want seq 3"},
		{name: "reorder/swap seqs too", mutate: func(e []Event) []Event {
			e[2], e[3] = e[3], e[2]
			e[2].Seq, e[3].Seq = 3, 4
			return e
		}, wantSeq: 3, reason: "hash does not match"},
		{name: "insert/duplicate", mutate: func(e []Event) []Event {
			return append(e[:3], append([]Event{e[2]}, e[3:]...)...)
		}, wantSeq: 3, reason: "want seq 4"},
		{name: "insert/forged event sealed onto seq 2", mutate: func(e []Event) []Event {
			forged := Seal(e[1].Hash, Event{Seq: 3, Time: t0, Type: TypeGrantIssued, Actor: "mallory"})
			return append(e[:2], append([]Event{forged}, e[2:]...)...)
		}, wantSeq: 3, reason: "want seq 4 after seq 3"},
		{name: "hash/truncated", mutate: func(e []Event) []Event { e[4].Hash = e[4].Hash[:63]; return e }, wantSeq: 5, reason: "not 64 lower-case hex"},
		{name: "hash/upper case", mutate: func(e []Event) []Event { e[1].Hash = strings.ToUpper(e[1].Hash); return e }, wantSeq: 2, reason: "not 64 lower-case hex"},
		{name: "hash/empty", mutate: func(e []Event) []Event { e[0].Hash = ""; return e }, wantSeq: 1, reason: "not 64 lower-case hex"},
		{name: "seq/zero", mutate: func(e []Event) []Event { e[0].Seq = 0; return e }, wantSeq: 0, reason: "positive"},
		{name: "seq/negative start", mutate: func(e []Event) []Event { e[0].Seq = -1; return e[:1] }, wantSeq: -1, reason: "positive"},
		{name: "excerpt/bad prev_hash", mutate: func(e []Event) []Event { e[2].PrevHash = "x"; return e[2:] }, wantSeq: 3, reason: "prev_hash is not"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := Verify(tt.mutate(base()))
			if tt.reason == "" {
				if err != nil {
					t.Fatalf("Verify = %v, want nil", err)
				}
				return
			}
			var ve *VerifyError
			if !errors.As(err, &ve) {
				t.Fatalf("Verify = %v, want *VerifyError", err)
			}
			if ve.Seq != tt.wantSeq || !strings.Contains(ve.Reason, tt.reason) {
				t.Errorf("Verify = seq %d %q, want seq %d containing %q", ve.Seq, ve.Reason, tt.wantSeq, tt.reason)
			}
			if want := "audit: event seq "; !strings.HasPrefix(err.Error(), want) {
				t.Errorf("Error() = %q, want prefix %q", err, want)
			}
		})
	}
}

func TestCheckpoint(t *testing.T) {
	t.Parallel()
	pub, priv, err := ed25519.GenerateKey(bytes.NewReader(bytes.Repeat([]byte{7}, 64)))
	if err != nil {
		t.Fatal(err)
	}
	otherPub, _, err := ed25519.GenerateKey(bytes.NewReader(bytes.Repeat([]byte{9}, 64)))
	if err != nil {
		t.Fatal(err)
	}
	chain := sealAll(goldenEvents())
	now := time.Date(2026, 3, 14, 10, 0, 0, 0, time.FixedZone("CET", 3600))
	cp := SignCheckpoint(priv, chain[2], now)
	if cp.Seq != 3 || cp.Hash != chain[2].Hash || cp.KeyID != KeyID(pub) || !cp.Time.Equal(now) {
		t.Fatalf("SignCheckpoint = %+v", cp)
	}
	tests := []struct {
		name    string
		pub     ed25519.PublicKey
		cp      func(Checkpoint) Checkpoint
		events  []Event
		wantErr error
	}{
		{name: "ok/full chain", pub: pub, cp: id, events: chain},
		{name: "ok/chain ends at checkpoint", pub: pub, cp: id, events: chain[:3]},
		{name: "ok/excerpt", pub: pub, cp: id, events: chain[2:]},
		{name: "deny/tail cut before checkpoint", pub: pub, cp: id, events: chain[:2], wantErr: ErrCheckpointMissing},
		{name: "deny/no events", pub: pub, cp: id, events: nil, wantErr: ErrCheckpointMissing},
		{name: "deny/event rewritten", pub: pub, cp: id, events: func() []Event {
			c := sealAll(goldenEvents())
			c[2].Actor = "mallory"
			return sealAll(c)
		}(), wantErr: ErrCheckpointMismatch},
		{name: "deny/other key", pub: otherPub, cp: id, events: chain, wantErr: ErrCheckpointSignature},
		{name: "deny/short key", pub: pub[:5], cp: id, events: chain, wantErr: ErrCheckpointSignature},
		{name: "deny/seq changed", pub: pub, cp: func(c Checkpoint) Checkpoint { c.Seq = 2; return c }, events: chain, wantErr: ErrCheckpointSignature},
		{name: "deny/hash changed", pub: pub, cp: func(c Checkpoint) Checkpoint { c.Hash = chain[1].Hash; return c }, events: chain, wantErr: ErrCheckpointSignature},
		{name: "deny/time changed", pub: pub, cp: func(c Checkpoint) Checkpoint { c.Time = c.Time.Add(time.Second); return c }, events: chain, wantErr: ErrCheckpointSignature},
		{name: "deny/key id changed", pub: pub, cp: func(c Checkpoint) Checkpoint { c.KeyID = "0123456789abcdef"; return c }, events: chain, wantErr: ErrCheckpointSignature},
		{name: "deny/signature flipped", pub: pub, cp: func(c Checkpoint) Checkpoint {
			c.Signature = bytes.Clone(c.Signature)
			c.Signature[0] ^= 1
			return c
		}, events: chain, wantErr: ErrCheckpointSignature},
		{name: "deny/signature truncated", pub: pub, cp: func(c Checkpoint) Checkpoint { c.Signature = c.Signature[:10]; return c }, events: chain, wantErr: ErrCheckpointSignature},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := VerifyCheckpoint(tt.pub, tt.cp(cp), tt.events)
			if !errors.Is(err, tt.wantErr) || (tt.wantErr == nil) != (err == nil) {
				t.Errorf("VerifyCheckpoint = %v, want %v", err, tt.wantErr)
			}
		})
	}
}

func id(c Checkpoint) Checkpoint { return c }

func TestJSONL(t *testing.T) {
	t.Parallel()
	chain := sealAll(goldenEvents())
	var buf bytes.Buffer
	if err := WriteJSONL(&buf, chain); err != nil {
		t.Fatal(err)
	}
	got, err := ReadJSONL(bytes.NewReader(buf.Bytes()), len(chain))
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(got); err != nil {
		t.Fatalf("Verify after round trip: %v", err)
	}
	if diff := cmp.Diff(chain, got, cmpopts.EquateEmpty(), cmp.Comparer(func(a, b time.Time) bool { return a.Equal(b) })); diff != "" {
		t.Errorf("round trip (-want +got):\n%s", diff)
	}

	valid := buf.String()
	bad := []struct {
		name, in string
		max      int
		want     string
	}{
		{name: "too many", in: valid, max: 3, want: "line 4: audit: too many events"},
		{name: "max zero", in: valid, max: 0, want: "max must be positive"},
		{name: "unknown field", in: `{"seq":1,"bogus":2}` + "\n", max: 5, want: `line 1: decoding event: json: unknown field "bogus"`},
		{name: "not an object", in: "\n[1]\n", max: 5, want: "line 2: not a JSON object"},
		{name: "null", in: "null\n", max: 5, want: "line 1: not a JSON object"},
		{name: "trailing data", in: `{"seq":1} {"seq":2}`, max: 5, want: "line 1: trailing data"},
		{name: "wrong type", in: `{"seq":"1"}`, max: 5, want: "line 1: decoding event"},
		{name: "too long", in: `{"type":"` + strings.Repeat("a", MaxLineSize) + `"}`, max: 5, want: "line 1: longer than 1048576 bytes"},
		{name: "way too long", in: "\n" + strings.Repeat("a", 3*MaxLineSize), max: 5, want: "line 2: longer than 1048576 bytes"},
	}
	for _, tt := range bad {
		t.Run("bad/"+tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := ReadJSONL(strings.NewReader(tt.in), tt.max)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("ReadJSONL = %v, want error containing %q", err, tt.want)
			}
		})
	}
	if _, err := ReadJSONL(strings.NewReader(valid), 3); !errors.Is(err, ErrTooMany) {
		t.Errorf("ReadJSONL over max = %v, want ErrTooMany", err)
	}

	t.Run("ok/blank lines and CRLF", func(t *testing.T) {
		t.Parallel()
		in := "\n" + strings.ReplaceAll(valid, "\n", "\r\n\n")
		got, err := ReadJSONL(strings.NewReader(in), 10)
		if err != nil || len(got) != len(chain) {
			t.Fatalf("ReadJSONL = %d events, %v", len(got), err)
		}
	})
	t.Run("bad/oversized event on write", func(t *testing.T) {
		t.Parallel()
		big := []Event{{Seq: 1, Type: strings.Repeat("x", MaxLineSize)}}
		if err := WriteJSONL(&bytes.Buffer{}, big); err == nil || !strings.Contains(err.Error(), "line limit") {
			t.Errorf("WriteJSONL = %v, want line limit error", err)
		}
	})
}

func FuzzReadJSONL(f *testing.F) {
	var buf bytes.Buffer
	if err := WriteJSONL(&buf, sealAll(goldenEvents())); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes())
	f.Add([]byte(`{"seq":1,"time":"2026-01-01T00:00:00Z","type":"x","prev_hash":"","hash":""}`))
	f.Add([]byte("null\n{}\n[]\n\"x\"\n"))
	f.Add([]byte(`{"seq":1,"details":{"a":"b"}} trailing`))
	f.Add([]byte(`{"time":"10000-01-01T00:00:00Z"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		events, err := ReadJSONL(bytes.NewReader(data), 1000)
		if err != nil {
			return
		}
		_ = Verify(events)
		var out bytes.Buffer
		if err := WriteJSONL(&out, events); err != nil {
			return
		}
		again, err := ReadJSONL(&out, 1000)
		if err != nil {
			t.Fatalf("re-reading written events: %v", err)
		}
		if len(again) != len(events) {
			t.Fatalf("re-read %d events, wrote %d", len(again), len(events))
		}
		// Hashes survive the round trip: what Verify accepted stays accepted.
		if (Verify(events) == nil) != (Verify(again) == nil) {
			t.Fatalf("Verify changed across a JSONL round trip")
		}
	})
}

func FuzzVerify(f *testing.F) {
	var buf bytes.Buffer
	if err := WriteJSONL(&buf, sealAll(goldenEvents())); err != nil {
		f.Fatal(err)
	}
	f.Add(buf.Bytes(), uint16(0), byte(0))
	f.Add(buf.Bytes(), uint16(300), byte('x'))
	f.Add([]byte(`{"seq":-9223372036854775808}`+"\n"+`{"seq":9223372036854775807}`), uint16(1), byte(1))
	f.Fuzz(func(t *testing.T, data []byte, pos uint16, b byte) {
		events, err := ReadJSONL(bytes.NewReader(data), 1000)
		if err != nil || len(events) == 0 {
			return
		}
		wasValid := Verify(events) == nil
		// Flip one byte of one event's canonical fields through its Type;
		// a valid chain must then fail to verify.
		i := int(pos) % len(events)
		events[i].Type += string(rune(b))
		err = Verify(events)
		if wasValid && err == nil {
			t.Fatalf("Verify accepted an edited event %d", i)
		}
		var ve *VerifyError
		if err != nil && !errors.As(err, &ve) {
			t.Fatalf("Verify returned %T, want *VerifyError", err)
		}
	})
}

// TestSealSurvivesJSON: an event sealed with bytes that are not UTF-8 in any
// field verifies after a JSON round trip, and Seal leaves the caller's
// Details alone.
func TestSealSurvivesJSON(t *testing.T) {
	t.Parallel()
	details := map[string]string{"command": "true # \xff\xfe", "k\x80": "v"}
	e := Seal(GenesisHash, Event{Seq: 1, Time: t0, Type: "session.started", Actor: "al\xc3", Target: "db", Details: details})
	if details["command"] != "true # \xff\xfe" {
		t.Error("Seal modified the caller's Details")
	}
	if e.Actor != "al\uFFFD" || e.Details["command"] != "true # \uFFFD" || e.Details["k\uFFFD"] != "v" {
		t.Errorf("sealed event not repaired: %+v", e)
	}
	var buf bytes.Buffer
	if err := WriteJSONL(&buf, []Event{e}); err != nil {
		t.Fatal(err)
	}
	back, err := ReadJSONL(&buf, 10)
	if err != nil {
		t.Fatal(err)
	}
	if err := Verify(back); err != nil {
		t.Fatalf("after a JSON round trip: %v", err)
	}
}
