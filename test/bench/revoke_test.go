package bench

import (
	"math"
	"net"
	"slices"
	"sync"
	"testing"
	"time"
)

// revokeFlows is how many live connections one grant has when it is revoked.
const revokeFlows = 4

// BenchmarkRevokeFlowsClosed measures revoke → all flows closed through the
// gateway's flow cut: a grant's agent tunnel carries revokeFlows live
// connections from a user's tool (each has just completed a round trip to
// the target and is blocked reading), then gateway.RemovePeer, what the
// service calls when a grant ends, cuts them; the latency runs from that
// call until the tool's last connection has seen its end. Every iteration
// is a fresh grant (fresh agent key and tunnel); the store transaction of
// the revoke itself is not included. ns/op is the whole grant cycle; the
// figures are p50-ms, p99-ms and max-ms of the cut.
func BenchmarkRevokeFlowsClosed(b *testing.B) {
	checkGoroutines(b)
	gw := newGateway(b, newTarget(b))
	var lat []time.Duration
	for b.Loop() {
		u, pub, local := newAgent(b, gw)
		conns := make([]net.Conn, revokeFlows)
		for i := range conns {
			c, err := net.Dial("tcp", local)
			if err != nil {
				b.Fatal(err)
			}
			conns[i] = c
			if err := bulk(c, opUp, 1); err != nil {
				b.Fatalf("flow %d: %v", i, err)
			}
		}
		var wg sync.WaitGroup
		ended := make([]time.Time, len(conns))
		for i, c := range conns {
			wg.Go(func() {
				// The target never sends unasked, so Read returns only
				// when the flow ends.
				_, _ = c.Read(make([]byte, 1))
				ended[i] = time.Now()
			})
		}
		start := time.Now()
		if err := gw.RemovePeer(pub); err != nil {
			b.Fatal(err)
		}
		cutDone := make(chan struct{})
		go func() { wg.Wait(); close(cutDone) }()
		select {
		case <-cutDone:
		case <-time.After(10 * time.Second):
			for _, c := range conns {
				_ = c.Close()
			}
			<-cutDone
			b.Fatal("flows still open 10s after RemovePeer")
		}
		last := start
		for _, t := range ended {
			if t.After(last) {
				last = t
			}
		}
		lat = append(lat, last.Sub(start))
		for _, c := range conns {
			_ = c.Close()
		}
		_ = u.Close()
	}
	slices.Sort(lat)
	// q is the nearest-rank percentile in milliseconds.
	q := func(p float64) float64 {
		i := max(0, int(math.Ceil(p*float64(len(lat))))-1)
		return float64(lat[i]) / float64(time.Millisecond)
	}
	b.ReportMetric(q(0.50), "p50-ms")
	b.ReportMetric(q(0.99), "p99-ms")
	b.ReportMetric(q(1), "max-ms")
}
