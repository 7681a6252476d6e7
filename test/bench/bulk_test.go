package bench

import (
	"slices"
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
// ratio (medians, see below). Raw TCP targets are spliced, not recorded.
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
			// Per request pair: the time of each path. Other work on the
			// machine hits one request or the other, so the figures are
			// medians: MiB/s of the median request of each path, and the
			// median over pairs of the pinhole/bare throughput ratio.
			var tPinhole, tBare, ratios []float64
			i := 0
			for b.Loop() {
				var dp, db time.Duration
				// Alternate which path goes first.
				for j := range 2 {
					start := time.Now()
					if (i+j)%2 == 0 {
						if err := bulk(pinhole, dir.op, bulkChunk); err != nil {
							b.Fatalf("pinhole: %v", err)
						}
						dp = time.Since(start)
					} else {
						if err := bulk(bare, dir.op, bulkChunk); err != nil {
							b.Fatalf("bare: %v", err)
						}
						db = time.Since(start)
					}
				}
				tPinhole = append(tPinhole, dp.Seconds())
				tBare = append(tBare, db.Seconds())
				ratios = append(ratios, db.Seconds()/dp.Seconds())
				i++
			}
			const mib = float64(bulkChunk) / (1 << 20)
			b.ReportMetric(mib/median(tPinhole), "pinhole-MiB/s")
			b.ReportMetric(mib/median(tBare), "bare-MiB/s")
			b.ReportMetric(median(ratios), "ratio")
		})
	}
}

func median(v []float64) float64 {
	v = slices.Clone(v)
	slices.Sort(v)
	if n := len(v); n%2 == 0 {
		return (v[n/2-1] + v[n/2]) / 2
	}
	return v[len(v)/2]
}
