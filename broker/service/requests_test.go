package service

import (
	"testing"
	"time"
)

func TestShortDuration(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   time.Duration
		want string
	}{
		{45 * time.Minute, "45m"},
		{time.Hour, "1h"},
		{90 * time.Minute, "1h30m"},
		{20 * time.Second, "20s"},
		{time.Hour + 5*time.Second, "1h0m5s"},
	}
	for _, tt := range tests {
		if got := shortDuration(tt.in); got != tt.want {
			t.Errorf("shortDuration(%v) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestGrantViewHashIgnoresReportTime(t *testing.T) {
	t.Parallel()
	v := GrantView{Request: "r-1", Posture: []string{"os: Debian"}, PostureAt: time.Unix(100, 0)}
	w := v
	w.PostureAt = time.Unix(160, 0)
	if v.Hash() != w.Hash() {
		t.Error("a fresher report with the same facts changed the committed view")
	}
	w.Posture = []string{"os: Windows"}
	if v.Hash() == w.Hash() {
		t.Error("changed posture facts did not change the committed view")
	}
}
