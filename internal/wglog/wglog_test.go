package wglog

import (
	"bytes"
	"log/slog"
	"strings"
	"testing"
)

func TestLevels(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	l := New(slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelInfo})))
	l.Verbosef("handshake %d", 1)
	l.Errorf("failed %s", "badly")
	out := buf.String()
	if strings.Contains(out, "handshake") {
		t.Errorf("verbose line logged at info level: %q", out)
	}
	if !strings.Contains(out, "failed badly") || !strings.Contains(out, "component=wireguard") || !strings.Contains(out, "level=ERROR") {
		t.Errorf("error line: %q", out)
	}
}
