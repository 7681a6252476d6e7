package e2e

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/pinhole-dev/pinhole/broker"
	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// TestBadAPIBodiesChangeNothing: malformed, oversized or mistyped API bodies
// get a 4xx that names the problem and leave the store as it was.
func TestBadAPIBodiesChangeNothing(t *testing.T) {
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	e.invite("bob", "approver")
	ws := e.enroll(alice)
	key, err := devicekey.LoadOrCreate(filepath.Join(ws, "device.key"))
	if err != nil {
		t.Fatal(err)
	}
	hc, err := client.DeviceHTTPClient(e.caFile, key)
	if err != nil {
		t.Fatal(err)
	}
	before := len(e.auditEvents())
	tests := []struct {
		name, path, body string
		wantStatus       int
		wantErr          string
	}{
		{"bad/not-json", wire.PathRequests, `{"target": "db-prod",`, 400, "not valid JSON"},
		{"bad/empty", wire.PathRequests, ``, 400, "empty"},
		{"bad/unknown-field", wire.PathRequests, `{"target":"db-prod","ttl":"5m","reason":"x","admin":true}`, 400, `unknown field "admin"`},
		{"bad/wrong-type", wire.PathRequests, `{"target":"db-prod","ttl":300,"reason":"x"}`, 400, `field "ttl"`},
		{"bad/trailing", wire.PathRequests, `{"target":"db-prod","ttl":"5m","reason":"x"} {}`, 400, "after the JSON object"},
		{"bad/oversized", wire.PathRequests, `{"target":"db-prod","ttl":"5m","reason":"` + strings.Repeat("a", wire.MaxBodyBytes) + `"}`, 400, "larger than"},
		{"bad/ttl", wire.PathRequests, `{"target":"db-prod","ttl":"forever","reason":"x"}`, 400, `ttl "forever"`},
		{"bad/target-name", wire.PathRequests, `{"target":"` + strings.Repeat("x", 5000) + `","ttl":"5m","reason":"x"}`, 400, "target: name"},
		{"bad/target-chars", wire.PathRequests, `{"target":"db-prod\n","ttl":"5m","reason":"x"}`, 400, "must be letters, digits"},
		{"bad/long-reason", wire.PathRequests, `{"target":"db-prod","ttl":"5m","reason":"` + strings.Repeat("r", 600) + `"}`, 400, "reason is 600 bytes"},
		{"bad/posture-garbage", wire.PathPosture, `{"report":"AAAA","signature":"AAAA"}`, 400, "posture report refused"},
		{"bad/activate-key", "/v1/grants/r-0000000000000000/activate", `{"wireguard_public_key":"nope","ssh_public_key":""}`, 400, "wireguard_public_key"},
		{"bad/unknown-path", "/v1/nothing", `{}`, 404, "no API endpoint"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := hc.Post(e.url+tt.path, "application/json", bytes.NewReader([]byte(tt.body)))
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			b, _ := io.ReadAll(resp.Body)
			var we wire.Error
			json.Unmarshal(b, &we)
			if resp.StatusCode != tt.wantStatus || !strings.Contains(we.Error, tt.wantErr) {
				t.Fatalf("got %d %q, want %d containing %q", resp.StatusCode, we.Error, tt.wantStatus, tt.wantErr)
			}
		})
	}
	// Only the garbage posture report is recorded (as a rejection); nothing else changed.
	after := e.auditEvents()
	var others []string
	for _, ev := range after[before:] {
		if ev.Type != "posture.rejected" {
			others = append(others, ev.Type)
		}
	}
	if len(others) != 0 {
		t.Fatalf("bad input changed the store: new events %v", others)
	}
	// Without a device certificate nothing but /v1/ca answers.
	resp, err := http.Post(e.url+wire.PathRequests, "application/json", strings.NewReader(`{}`))
	if err == nil {
		resp.Body.Close()
		t.Fatal("request without a trusted TLS connection was answered")
	}
}

// TestBadConfigRefusedNamingLine: a config file with an error stops the broker
// with file, line and field, and leaves the existing store untouched.
func TestBadConfigRefusedNamingLine(t *testing.T) {
	e := newEnv(t)
	e.invite("alice", "dba")
	before := len(e.auditEvents())
	bad := filepath.Join(e.dir, "bad.yaml")
	if err := os.WriteFile(bad, []byte("targets:\n  - name: db-prod\n    address: db.example:99999\n    protocol: ssh\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	_, err := broker.New(e.ctx, broker.Config{DataDir: filepath.Join(e.dir, "broker"), ConfigFile: bad, Listen: "127.0.0.1:0"})
	if err == nil || !strings.Contains(err.Error(), "bad.yaml:3: targets[0].address") {
		t.Fatalf("bad config: got %v, want an error naming bad.yaml:3: targets[0].address", err)
	}
	if got := len(e.auditEvents()); got != before {
		t.Fatalf("store changed: %d events, was %d", got, before)
	}
}

// TestSecondBrokerOnSameDataDirRefused: two brokers on one store would each
// hold their own peers, so a revocation on one would not cut the other's.
func TestSecondBrokerOnSameDataDirRefused(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg
	cfg.Listen = "127.0.0.1:0"
	_, err := broker.New(e.ctx, cfg)
	if err == nil || !strings.Contains(err.Error(), "in use by another pinhole-broker") {
		t.Fatalf("second broker on the same data dir: %v", err)
	}
	if _, err := e.b.Service().AuditEvents(e.ctx, store.User{Name: "root", Role: "admin"}, 0, 10); err != nil {
		t.Fatalf("first broker hurt: %v", err)
	}
}

// TestEnrollFloodIsLimited: enrolling needs only a self-made key, so
// attempts are limited per client network.
func TestEnrollFloodIsLimited(t *testing.T) {
	e := newEnv(t)
	e.invite("alice", "dba")
	var last error
	for i := range 12 {
		_, key, _ := ed25519.GenerateKey(nil)
		hc, err := client.DeviceHTTPClient(e.caFile, key)
		if err != nil {
			t.Fatal(err)
		}
		_, last = client.New(e.url, hc).Enroll(e.ctx, wire.EnrollRequest{User: "alice", Hostname: fmt.Sprintf("ws-%d", i)})
		if i < 10 && last != nil {
			t.Fatalf("enrollment %d refused: %v", i, last)
		}
	}
	var ae *client.APIError
	if !errors.As(last, &ae) || ae.Status != http.StatusTooManyRequests {
		t.Fatalf("12th enrollment in a minute: %v, want 429", last)
	}
}
