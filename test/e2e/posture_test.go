package e2e

import (
	"context"
	"crypto/ed25519"
	"errors"
	"net/http"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/posture"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// TestRequestNeedsFreshSignedPosture: a device with no posture report, with
// a report older than the rule allows, or with a report failing the rule's
// requirements is refused with a reason that says which; a replayed report
// is refused.
func TestRequestNeedsFreshSignedPosture(t *testing.T) {
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	e.invite("bob", "approver")

	// Enroll by hand (no posture report yet).
	_, key, _ := ed25519.GenerateKey(nil)
	hc, err := client.DeviceHTTPClient(e.caFile, key)
	if err != nil {
		t.Fatal(err)
	}
	dc := client.New(e.url, hc)
	enr, err := dc.Enroll(e.ctx, wire.EnrollRequest{User: "alice", Hostname: "ws-bare"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := alice.ConfirmDevice(e.ctx, enr.ConfirmURL); err != nil {
		t.Fatal(err)
	}
	refused := func(target, want string) {
		t.Helper()
		_, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: target, TTL: "10m", Reason: "INC-9 posture"})
		var ae *client.APIError
		if !errors.As(err, &ae) || ae.Status != http.StatusForbidden || !strings.Contains(ae.Message, want) {
			t.Fatalf("request for %s: got %v, want 403 containing %q", target, err, want)
		}
	}
	refused("db-prod", "no signed posture report")

	submit := func(r posture.Report) error {
		n, err := dc.PostureNonce(e.ctx)
		if err != nil {
			return err
		}
		r.Device, r.Nonce = enr.DeviceID, n.Nonce
		s, err := posture.Sign(key, r)
		if err != nil {
			return err
		}
		_, err = dc.SubmitPosture(e.ctx, wire.PostureSubmit{Report: s.Report, Signature: s.Signature})
		if err != nil {
			return err
		}
		// Replaying the very same signed report is refused.
		if _, err := dc.SubmitPosture(e.ctx, wire.PostureSubmit{Report: s.Report, Signature: s.Signature}); err == nil {
			t.Fatal("a replayed posture report was accepted")
		}
		return nil
	}
	report := func(age time.Duration, disk, fw bool) posture.Report {
		return posture.Report{Hostname: "ws-bare", OS: "Debian", Kernel: "6.1", DiskEncrypted: disk, FirewallActive: fw,
			ScreenLock: posture.ScreenLockOn, AgentVersion: "test", CollectedAt: time.Now().Add(-age).UTC()}
	}

	// A report five minutes old: fine for db-prod (10m), too old for db-strict (1m).
	if err := submit(report(5*time.Minute, true, true)); err != nil {
		t.Fatal(err)
	}
	refused("db-strict", "old")
	if _, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: "10m", Reason: "INC-9 posture"}); err != nil {
		t.Fatalf("db-prod with a 5m-old report: %v", err)
	}

	// Fresh, but without disk encryption.
	if err := submit(report(0, false, true)); err != nil {
		t.Fatal(err)
	}
	refused("db-strict", "disk encryption")

	// A report signed by another key is refused.
	_, other, _ := ed25519.GenerateKey(nil)
	n, _ := dc.PostureNonce(context.Background())
	r := report(0, true, true)
	r.Device, r.Nonce = enr.DeviceID, n.Nonce
	s, _ := posture.Sign(other, r)
	if _, err := dc.SubmitPosture(e.ctx, wire.PostureSubmit{Report: s.Report, Signature: s.Signature}); err == nil ||
		!regexp.MustCompile(`(?i)signature`).MatchString(err.Error()) {
		t.Fatalf("report signed by another key: %v", err)
	}
}
