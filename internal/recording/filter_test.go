package recording

import (
	"strings"
	"testing"
)

func TestControlStringFilter(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		in   []string // events, fed in order
		want string
	}{
		{"ok/plain", []string{"hello\r\n"}, "hello\r\n"},
		{"ok/csi-kept", []string{"\x1b[31mred\x1b[0m \x1b[2K"}, "\x1b[31mred\x1b[0m \x1b[2K"},
		{"drop/osc52-clipboard-bel", []string{"a\x1b]52;c;cm0gLXJmIC8=\x07b"}, "ab"},
		{"drop/osc-title-st", []string{"a\x1b]0;owned\x1b\\b"}, "ab"},
		{"drop/dcs", []string{"a\x1bPq#0;2;0;0;0\x1b\\b"}, "ab"},
		{"drop/apc-pm-sos", []string{"\x1b_x\x1b\\1\x1b^y\x1b\\2\x1bXz\x1b\\3"}, "123"},
		{"drop/c1-osc", []string{"a\u009d0;t\u009cb"}, "ab"},
		{"drop/split-across-events", []string{"a\x1b", "]52;c;Zm9v", "\x07b"}, "ab"},
		{"ok/esc-then-text", []string{"\x1b", "7x"}, "\x1b7x"},
		{"ok/unterminated-gives-up", []string{"\x1b]" + strings.Repeat("A", maxControlString+10) + "tail"}, strings.Repeat("A", 9) + "tail"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var f controlStringFilter
			var got strings.Builder
			for _, ev := range tt.in {
				got.WriteString(f.apply(ev))
			}
			if got.String() != tt.want {
				t.Errorf("got %.80q (%d bytes), want %.80q", got.String(), got.Len(), tt.want)
			}
		})
	}
}
