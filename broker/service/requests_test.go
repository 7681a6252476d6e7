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
