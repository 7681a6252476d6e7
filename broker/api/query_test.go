package api

import (
	"math"
	"net/url"
	"strings"
	"testing"
)

func TestQueryInt(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		query   string
		lo, hi  int64
		want    int64
		wantErr string
	}{
		{name: "ok/absent", query: "", lo: 1, hi: 1000, want: 0},
		{name: "ok/in_range", query: "limit=500", lo: 1, hi: 1000, want: 500},
		{name: "ok/upper_bound", query: "limit=1000", lo: 1, hi: 1000, want: 1000},
		{name: "ok/unbounded", query: "limit=9223372036854775807", lo: 0, hi: math.MaxInt64, want: math.MaxInt64},
		{name: "deny/zero", query: "limit=0", lo: 1, hi: 1000, wantErr: "limit: want an integer from 1 to 1000"},
		{name: "deny/too_big", query: "limit=1001", lo: 1, hi: 1000, wantErr: "limit: want an integer from 1 to 1000"},
		{name: "deny/negative", query: "limit=-5", lo: 0, hi: math.MaxInt64, wantErr: "limit: want an integer of at least 0"},
		{name: "deny/not_a_number", query: "limit=ten", lo: 1, hi: 1000, wantErr: "limit: want an integer"},
		{name: "deny/overflow", query: "limit=99999999999999999999", lo: 0, hi: math.MaxInt64, wantErr: "limit: want an integer"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			q, err := url.ParseQuery(tc.query)
			if err != nil {
				t.Fatal(err)
			}
			got, err := queryInt(q, "limit", tc.lo, tc.hi)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("queryInt(%q) = %d, %v; want error containing %q", tc.query, got, err, tc.wantErr)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Fatalf("queryInt(%q) = %d, %v; want %d", tc.query, got, err, tc.want)
			}
		})
	}
}
