package main

import (
	"context"
	"strings"
	"testing"
)

func TestUsageErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantErrHas string
	}{
		{"no-command", nil, 2, "usage:"},
		{"unknown-command", []string{"start"}, 2, `unknown command "start"`},
		{"enroll-missing-broker", []string{"enroll", "--ca", "c", "--user", "u"}, 2, "flag --broker is required"},
		{"enroll-missing-user", []string{"enroll", "--broker", "https://b", "--ca", "c"}, 2, "flag --user is required"},
		{"enroll-unknown-flag", []string{"enroll", "--brokr", "x"}, 2, "flag provided but not defined: -brokr"},
		{"run-bad-interval", []string{"run", "--posture-every", "often"}, 2, `invalid value "often" for flag -posture-every`},
		{"run-short-interval", []string{"run", "--posture-every", "1ms"}, 2, "flag -posture-every: must be at least 1s"},
		{"run-bad-log-level", []string{"run", "--log-level", "loud"}, 2, "flag -log-level"},
		{"run-extra-arg", []string{"run", "now"}, 2, `unexpected argument "now"`},
		{"run-not-enrolled", []string{"run", "--state", "/nonexistent/pinhole"}, 1, "not enrolled"},
		{"help", []string{"help"}, 0, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var out, errOut strings.Builder
			code := run(context.Background(), tt.args, &out, &errOut)
			if code != tt.wantCode || !strings.Contains(errOut.String(), tt.wantErrHas) {
				t.Errorf("exit %d stderr %q; want exit %d and %q", code, errOut.String(), tt.wantCode, tt.wantErrHas)
			}
		})
	}
}
