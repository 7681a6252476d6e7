package service_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/broker/service"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/posture"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// flowEvent is shaped like the flow.allowed event AuthorizeFlow writes for
// every connection through the tunnel, the most frequent event there is.
func flowEvent(i int) audit.Event {
	return audit.Event{
		Type: audit.TypeFlowAllowed, Actor: "alice", Device: "dev-0123456789abcdef",
		Src: fmt.Sprintf("100.96.0.2:%d", 40000+i%20000), Target: "db-prod",
		Request: "req-0123456789abcdef", Grant: "req-0123456789abcdef",
		Details: map[string]string{"destination": "10.0.0.5:5432"},
	}
}

// BenchmarkAuditAppend measures Service.Audit: one durable SQLite
// transaction per event that reads the chain head, seals the event onto
// the hash chain and inserts it, which is how the broker appends events
// that come with no other state change (flow decisions). "serial" is one
// caller; "parallel" is GOMAXPROCS callers at once, as concurrent flow
// decisions are.
func BenchmarkAuditAppend(b *testing.B) {
	b.Run("serial", func(b *testing.B) {
		svc, _ := service.NewTestService(b)
		ctx := context.Background()
		i := 0
		for b.Loop() {
			if err := svc.Audit(ctx, flowEvent(i)); err != nil {
				b.Fatal(err)
			}
			i++
		}
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	})
	b.Run("parallel", func(b *testing.B) {
		svc, _ := service.NewTestService(b)
		ctx := context.Background()
		var n atomic.Int64
		b.ResetTimer()
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				if err := svc.Audit(ctx, flowEvent(int(n.Add(1)))); err != nil {
					b.Error(err)
					return
				}
			}
		})
		b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "events/s")
	})
	// Not a broker path: 64 events per transaction straight through the
	// store, to show what the chain and SQLite cost without one fsync per
	// event (the ceiling a group commit could reach).
	b.Run("batch64", func(b *testing.B) {
		_, st := service.NewTestService(b)
		ctx := context.Background()
		const batch = 64
		i := 0
		for b.Loop() {
			err := st.Update(ctx, func(tx store.Tx) error {
				for range batch {
					e := flowEvent(i)
					e.Time = time.Now()
					if _, err := tx.AppendAudit(ctx, e); err != nil {
						return err
					}
					i++
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		}
		b.ReportMetric(float64(b.N*batch)/b.Elapsed().Seconds(), "events/s")
	})
}

// benchDevices enrolls n active devices of one user directly in the store
// and returns their IDs and private keys.
func benchDevices(b *testing.B, st store.Store, n int) ([]store.Device, []ed25519.PrivateKey) {
	b.Helper()
	devs := make([]store.Device, n)
	keys := make([]ed25519.PrivateKey, n)
	now := time.Now().UTC()
	err := st.Update(b.Context(), func(tx store.Tx) error {
		handle := make([]byte, 32)
		if _, err := rand.Read(handle); err != nil {
			return err
		}
		if err := tx.CreateUser(b.Context(), store.User{Name: "alice", Role: "dba", WebAuthnID: handle, CreatedAt: now}); err != nil {
			return err
		}
		for i := range devs {
			pub, priv, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				return err
			}
			devs[i] = store.Device{ID: fmt.Sprintf("dev-%016x", i), User: "alice", Hostname: fmt.Sprintf("ws-%d", i),
				PublicKey: pub, State: store.DeviceActive, CreatedAt: now, ConfirmedAt: now}
			keys[i] = priv
			if err := tx.CreateDevice(b.Context(), devs[i]); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		b.Fatal(err)
	}
	return devs, keys
}

// BenchmarkPostureIngest measures what the broker does per posture report,
// as the agent drives it: issue a single-use nonce (PostureNonce, one
// durable transaction), then SubmitPosture (verify signature, schema and
// freshness, take the nonce, check it is newer than the last report, store
// it and append posture.accepted, one durable transaction). Reports rotate
// over 16 devices. Signing is the agent's work and is not timed; the HTTP
// layer in front of the service is not included.
func BenchmarkPostureIngest(b *testing.B) {
	svc, st := service.NewTestService(b)
	devs, keys := benchDevices(b, st, 16)
	ctx := context.Background()
	i := 0
	for b.Loop() {
		d, k := devs[i%len(devs)], keys[i%len(devs)]
		i++
		n, err := svc.PostureNonce(ctx, d)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		s, err := posture.Sign(k, posture.Report{
			Device: d.ID, Hostname: d.Hostname, OS: "Debian GNU/Linux 12 (bookworm)", Kernel: "6.1.0-18-amd64",
			DiskEncrypted: true, FirewallActive: true, ScreenLock: posture.ScreenLockOn, AgentVersion: "0.1.0",
			CollectedAt: time.Now().UTC(), Nonce: n.Nonce,
		})
		if err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
		res, err := svc.SubmitPosture(ctx, d, wire.PostureSubmit{Report: s.Report, Signature: s.Signature})
		if err != nil {
			b.Fatal(err)
		}
		if !res.Accepted {
			b.Fatalf("report %d not accepted: %+v", i, res)
		}
	}
	b.ReportMetric(float64(b.N)/b.Elapsed().Seconds(), "reports/s")
}
