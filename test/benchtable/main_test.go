package main

import (
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

const sample = `goos: linux
pkg: github.com/pinhole-dev/pinhole/test/bench
BenchmarkBulkTCP/up-2         	      54	  89527931 ns/op	        45.54 bare-MiB/s	        43.85 pinhole-MiB/s	         0.9629 ratio
BenchmarkBulkTCP/down-2       	      22	  99504654 ns/op	        40.00 bare-MiB/s	        20.00 pinhole-MiB/s	         0.5000 ratio
BenchmarkRevokeFlowsClosed-2   	     172	  12118675 ns/op	         5.472 max-ms	         0.4124 p50-ms	         4.979 p99-ms
BenchmarkAuditAppend/serial-2         	    4987	    223737 ns/op	      4470 events/s
BenchmarkAuditAppend/serial-2         	    4987	    223737 ns/op	      4000 events/s
BenchmarkAuditAppend/serial-2         	    4987	    223737 ns/op	      5000 events/s
--- FAIL: BenchmarkPostureIngest
FAIL	github.com/pinhole-dev/pinhole/broker/service	1.2s
`

func TestEvaluate(t *testing.T) {
	t.Parallel()
	res, failures, err := parse(strings.NewReader(sample))
	if err != nil {
		t.Fatal(err)
	}
	if len(failures) != 2 {
		t.Errorf("failures = %q, want the --- FAIL and FAIL lines", failures)
	}
	got := map[string]row{}
	for _, r := range evaluate(res) {
		got[r.figure] = r
	}
	tests := []struct {
		name   string
		figure string
		want   row
	}{
		{"ok/ratio met", "bulk TCP agent→gateway→target, up (raw TCP, spliced)", row{
			measured: "43.9 pinhole-MiB/s", baseline: "45.5 bare-MiB/s", ratio: "0.963×", goal: "≥ 0.9× baseline", met: "yes"}},
		{"ok/ratio missed", "bulk TCP agent→gateway→target, down (raw TCP, spliced)", row{
			measured: "20.0 pinhole-MiB/s", baseline: "40.0 bare-MiB/s", ratio: "0.500×", goal: "≥ 0.9× baseline", met: "no"}},
		{"ok/below goal met", "revoke → all flows closed, p99", row{
			measured: "4.98 p99-ms", baseline: "—", ratio: "—", goal: "< 500 ms", met: "yes"}},
		{"ok/median of three, missed", "audit append (hash chain, durable), 1 caller", row{
			measured: "4470 events/s", baseline: "—", ratio: "—", goal: "≥ 20000 events/s", met: "no"}},
		{"ok/no goal", "revoke → all flows closed, p50", row{
			measured: "0.412 p50-ms", baseline: "—", ratio: "—", goal: "—", met: "—"}},
		{"deny/missing benchmark is not met", "posture ingest (nonce + verify + store)", row{
			measured: "not measured", baseline: "—", ratio: "—", goal: "≥ 2000 reports/s", met: "no"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r, ok := got[tt.figure]
			if !ok {
				t.Fatalf("no row %q", tt.figure)
			}
			tt.want.figure = tt.figure
			if diff := cmp.Diff(r, tt.want, cmp.AllowUnexported(row{})); diff != "" {
				t.Errorf("row (-got +want):\n%s", diff)
			}
		})
	}
}
