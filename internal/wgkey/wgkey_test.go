package wgkey

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"testing"
)

func TestPrivateRedactedAndRoundTrip(t *testing.T) {
	t.Parallel()
	p, err := NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	txt, _ := p.MarshalText()
	for _, s := range []string{fmt.Sprint(p), fmt.Sprintf("%v %+v", p, p), p.String()} {
		if strings.Contains(s, string(txt)) || strings.Contains(s, p.UAPIHex()) {
			t.Fatalf("key leaked in %q", s)
		}
	}
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("x", "key", p)
	if strings.Contains(buf.String(), string(txt)) || !strings.Contains(buf.String(), "redacted") {
		t.Fatalf("log leaked key: %s", buf.String())
	}
	var q Private
	if err := q.UnmarshalText(txt); err != nil || !q.Equal(p) {
		t.Fatalf("round trip: %v", err)
	}
	if q.Public() != p.Public() || p.Public().IsZero() {
		t.Fatal("public mismatch")
	}
}

func TestParsePublicRejectsBadInput(t *testing.T) {
	t.Parallel()
	for _, in := range []string{"", "abc", strings.Repeat("A", 43) + "=", "!!!!"} {
		if _, err := ParsePublic(in); err == nil {
			t.Errorf("ParsePublic(%q) accepted", in)
		}
	}
	p, _ := NewPrivate(nil)
	b, _ := json.Marshal(p.Public())
	var got Public
	if err := json.Unmarshal(b, &got); err != nil || got != p.Public() {
		t.Fatalf("json round trip: %v", err)
	}
}
