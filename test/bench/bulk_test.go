package bench

import (
	"testing"
	"time"
)

// bulkChunk is how much one request moves; the two paths alternate per
// request, so both see the same machine at the same time.
const bulkChunk = 2 << 20

// BenchmarkBulkTCP measures bulk TCP throughput from a user's tool through
// the agent's local listener, the agent's tunnel (agent/tunnel), WireGuard
// over loopback UDP, the broker's gateway (broker/gateway) and its splice to
// a raw TCP target on 127.0.0.1 ("pinhole"), against a bare wireguard-go
// pair with stock netstack on both ends and the target listening inside the
// tunnel ("bare"). Requests alternate between the two paths; "up" is tool
// to target, "down" target to tool. It reports MiB/s of each and their
// ratio. Raw TCP targets are spliced, not recorded.
func BenchmarkBulkTCP(b *testing.B) {
	for _, dir := range []struct {
		name string
		op   byte
	}{{"up", opUp}, {"down", opDown}} {
		b.Run(dir.name, func(b *testing.B) {
			checkGoroutines(b)
			pinhole := newPinhole(b)
			bare := newBare(b)
			// Warm up both paths: handshakes, TCP windows.
			if err := bulk(pinhole, dir.op, 4*bulkChunk); err != nil {
				b.Fatalf("pinhole warm-up: %v", err)
			}
			if err := bulk(bare, dir.op, 4*bulkChunk); err != nil {
				b.Fatalf("bare warm-up: %v", err)
			}
			var tPinhole, tBare time.Duration
			i := 0
			for b.Loop() {
				// Alternate which path goes first.
				for j := range 2 {
					start := time.Now()
					if (i+j)%2 == 0 {
						if err := bulk(pinhole, dir.op, bulkChunk); err != nil {
							b.Fatalf("pinhole: %v", err)
						}
						tPinhole += time.Since(start)
					} else {
						if err := bulk(bare, dir.op, bulkChunk); err != nil {
							b.Fatalf("bare: %v", err)
						}
						tBare += time.Since(start)
					}
				}
				i++
			}
			mib := float64(b.N) * bulkChunk / (1 << 20)
			p, r := mib/tPinhole.Seconds(), mib/tBare.Seconds()
			b.ReportMetric(p, "pinhole-MiB/s")
			b.ReportMetric(r, "bare-MiB/s")
			b.ReportMetric(p/r, "ratio")
		})
	}
}
