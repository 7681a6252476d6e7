package cli

import (
	"context"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

var (
	t0      = time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	expires = time.Date(2026, 5, 1, 12, 45, 0, 0, time.UTC)
)

// fakeAgent answers the local API and the forwarded broker API.
type fakeAgent struct {
	audit      []audit.Event
	checkpoint *audit.Checkpoint // served at /v1/audit/checkpoint when set
	auditKey   ed25519.PublicKey // published at /v1/ca when set

	mu      sync.Mutex
	created []wire.CreateRequest
	revoked []wire.RevokeRequest
	probes  []string // raw queries of /local/probe
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func (f *fakeAgent) handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/requests", func(w http.ResponseWriter, r *http.Request) {
		var req wire.CreateRequest
		json.NewDecoder(r.Body).Decode(&req)
		f.mu.Lock()
		f.created = append(f.created, req)
		f.mu.Unlock()
		switch req.Target {
		case "db-prod":
			writeJSON(w, 200, wire.Request{ID: "r1", Target: req.Target, State: "pending", RequiredApprovals: 2})
		case "web":
			writeJSON(w, 200, wire.Request{ID: "r-tcp", Target: req.Target, State: "pending", RequiredApprovals: 1})
		case "db-denied":
			writeJSON(w, 200, wire.Request{ID: "r-denied", Target: req.Target, State: "pending", RequiredApprovals: 1})
		case "db-slow":
			writeJSON(w, 200, wire.Request{ID: "r-slow", Target: req.Target, State: "pending", RequiredApprovals: 1})
		case "closed":
			writeJSON(w, 200, wire.Request{ID: "r-closed", Target: req.Target, State: "denied", EndReason: "target is in maintenance"})
		default:
			writeJSON(w, 403, wire.Error{Error: "role dba may not request " + req.Target, Code: "policy"})
		}
	})
	mux.HandleFunc("GET /local/wait", func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Query().Get("request") {
		case "r1":
			writeJSON(w, 200, wire.Tunnel{Request: "r1", Target: "db-prod", Protocol: "ssh", Local: "127.0.0.1:40001", ExpiresAt: expires})
		case "r-tcp":
			writeJSON(w, 200, wire.Tunnel{Request: "r-tcp", Target: "web", Protocol: "tcp", Local: "127.0.0.1:40002", ExpiresAt: expires})
		case "r-denied":
			writeJSON(w, 409, wire.Error{Error: "request r-denied denied: outside business hours", Code: "refused"})
		default:
			writeJSON(w, 504, wire.Error{Error: "no tunnel yet", Code: "timeout"})
		}
	})
	mux.HandleFunc("GET /local/status", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, wire.LocalStatus{Device: "dev-1", User: "alice", Broker: "https://broker:8443", Tunnels: []wire.Tunnel{
			{Request: "r1", Target: "db-prod", Protocol: "ssh", Login: "postgres", Local: "127.0.0.1:40001", ExpiresAt: time.Now().Add(time.Hour).Truncate(time.Hour),
				KeyFile: "/s/grants/r1/id_ed25519", CertFile: "/s/grants/r1/id_ed25519-cert.pub", KnownHostsFile: "/s/grants/r1/known_hosts", HostKeyAlias: "db-prod.internal"},
			{Request: "r0", Target: "db-old", Protocol: "ssh", Local: "127.0.0.1:40000", ExpiresAt: time.Now().Add(-time.Minute)},
			{Request: "r-tcp", Target: "web", Protocol: "tcp", Local: "127.0.0.1:40002", ExpiresAt: time.Now().Add(time.Hour)},
		}})
	})
	mux.HandleFunc("GET /local/probe", func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		f.mu.Lock()
		f.probes = append(f.probes, r.URL.RawQuery)
		f.mu.Unlock()
		target := q.Get("target")
		if target != "db-prod" {
			writeJSON(w, 404, wire.Error{Error: "no live tunnel to " + target, Code: "not_found"})
			return
		}
		port := 22
		if p := q.Get("port"); p != "" {
			port, _ = strconv.Atoi(p)
		}
		p := wire.LocalProbe{Target: target, Destination: fmt.Sprintf("100.80.0.1:%d", port), Port: port}
		switch port {
		case 22:
			p.Connected = true
		case 9:
			p.Error = wire.ProbeTimedOut
		case 23:
			p.Error = "connection refused on the granted port: the gateway could not reach the target, or the grant just ended"
		case 24:
			// A malformed answer: neither connected nor a reason.
		default:
			p.Error = wire.ProbeRefused
		}
		writeJSON(w, 200, p)
	})
	mux.HandleFunc("POST /v1/grants/{id}/revoke", func(w http.ResponseWriter, r *http.Request) {
		var req wire.RevokeRequest
		json.NewDecoder(r.Body).Decode(&req)
		f.mu.Lock()
		f.revoked = append(f.revoked, req)
		f.mu.Unlock()
		if r.PathValue("id") != "r1" {
			writeJSON(w, 404, wire.Error{Error: "no request " + r.PathValue("id"), Code: "not_found"})
			return
		}
		writeJSON(w, 200, wire.Request{ID: "r1", State: "ended", EndReason: req.Reason})
	})
	mux.HandleFunc("POST /v1/admin/users", func(w http.ResponseWriter, r *http.Request) {
		var req wire.InviteUser
		json.NewDecoder(r.Body).Decode(&req)
		if req.Role != "dba" {
			writeJSON(w, 400, wire.Error{Error: "unknown role " + req.Role, Code: "bad_request"})
			return
		}
		writeJSON(w, 200, wire.Invite{User: req.Name, ConfirmURL: "https://broker:8443/admin/invite/tok", ExpiresAt: expires})
	})
	mux.HandleFunc("GET /v1/audit/checkpoint", func(w http.ResponseWriter, r *http.Request) {
		if f.checkpoint == nil {
			writeJSON(w, 404, wire.Error{Error: "the audit log has no checkpoint", Code: "not_found"})
			return
		}
		cp := f.checkpoint
		writeJSON(w, 200, wire.Checkpoint{Seq: cp.Seq, Hash: cp.Hash, Time: cp.Time, KeyID: cp.KeyID, Signature: cp.Signature})
	})
	mux.HandleFunc("GET /v1/ca", func(w http.ResponseWriter, r *http.Request) {
		ca := wire.CA{}
		if f.auditKey != nil {
			ca.AuditKeys = []string{base64.StdEncoding.EncodeToString(f.auditKey)}
		}
		writeJSON(w, 200, ca)
	})
	mux.HandleFunc("GET /v1/audit/events", func(w http.ResponseWriter, r *http.Request) {
		after, _ := strconv.ParseInt(r.URL.Query().Get("after"), 10, 64)
		limit, _ := strconv.Atoi(r.URL.Query().Get("limit"))
		limit = min(limit, 3) // small pages exercise paging
		var page wire.AuditPage
		page.Events = []json.RawMessage{}
		page.Next = after
		for _, e := range f.audit {
			if e.Seq <= after {
				continue
			}
			if len(page.Events) == limit {
				page.More = true
				break
			}
			b, _ := json.Marshal(e)
			page.Events = append(page.Events, b)
			page.Next = e.Seq
		}
		writeJSON(w, 200, page)
	})
	mux.HandleFunc("GET /v1/recordings", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, 200, []wire.Recording{{ID: "rec1", Request: "r1", User: "alice", Target: "db-prod", Kind: "ssh", Started: t0, Ended: t0.Add(90 * time.Second), Size: 1234}})
	})
	mux.HandleFunc("GET /v1/recordings/{id}/cast", func(w http.ResponseWriter, r *http.Request) {
		if r.PathValue("id") != "rec1" {
			writeJSON(w, 404, wire.Error{Error: "no recording " + r.PathValue("id"), Code: "not_found"})
			return
		}
		fmt.Fprint(w, "{\"version\":2,\"width\":80,\"height\":24}\n[0.5,\"o\",\"hello \"]\n[1.0,\"o\",\"world\\r\\n\"]\n")
	})
	return mux
}

// serve starts f on a unix socket and returns its path.
func (f *fakeAgent) serve(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "phcli")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: f.handler()}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return sock
}

// chain returns n sealed audit events.
func chain(n int) []audit.Event {
	var out []audit.Event
	prev := audit.GenesisHash
	for i := 1; i <= n; i++ {
		e := audit.Seal(prev, audit.Event{Seq: int64(i), Time: t0.Add(time.Duration(i) * time.Second), Type: audit.TypeRequestCreated, Actor: "alice", Request: fmt.Sprintf("r%d", i)})
		out = append(out, e)
		prev = e.Hash
	}
	return out
}

// run runs Main and returns its status and output.
func run(t *testing.T, args ...string) (int, string, string) {
	t.Helper()
	var stdout, stderr strings.Builder
	code := Main(context.Background(), args, strings.NewReader(""), &stdout, &stderr)
	return code, stdout.String(), stderr.String()
}

func TestCommands(t *testing.T) {
	t.Parallel()
	good := chain(7)
	tampered := chain(7)
	tampered[4].Actor = "mallory"
	dropped := append(append([]audit.Event{}, good[:3]...), good[4:]...)

	std := (&fakeAgent{audit: good}).serve(t)
	bad := (&fakeAgent{audit: tampered}).serve(t)
	gap := (&fakeAgent{audit: dropped}).serve(t)
	headless := (&fakeAgent{audit: good[2:]}).serve(t)
	empty := (&fakeAgent{}).serve(t)
	head := good[6]

	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    string // exact stdout, unless wantOutHas is set
		wantOutHas string
		wantErrHas string
	}{
		{
			name:     "ok/request-wait",
			args:     []string{"--agent", std, "request", "db-prod", "--for", "45m", "--reason", "INC-4821 vacuum"},
			wantOut:  "request r1: waiting for 2 approval(s)\ngranted until 12:45:00 UTC\ntunnel: 127.0.0.1:40001  (connect: pinhole ssh db-prod)\n",
			wantCode: 0,
		},
		{
			name:    "ok/request-flags-first",
			args:    []string{"request", "--agent", std, "--reason=x", "--for=1h", "db-prod"},
			wantOut: "request r1: waiting for 2 approval(s)\ngranted until 12:45:00 UTC\ntunnel: 127.0.0.1:40001  (connect: pinhole ssh db-prod)\n",
		},
		{
			name:    "ok/request-tcp",
			args:    []string{"--agent", std, "request", "web", "--for", "10m", "--reason", "x"},
			wantOut: "request r-tcp: waiting for 1 approval(s)\ngranted until 12:45:00 UTC\ntunnel: 127.0.0.1:40002\n",
		},
		{
			name:    "ok/request-no-wait",
			args:    []string{"--agent", std, "request", "db-prod", "--for", "45m", "--reason", "x", "--wait=false"},
			wantOut: "request r1: waiting for 2 approval(s)\n",
		},
		{
			name:       "refused/denied-while-waiting",
			args:       []string{"--agent", std, "request", "db-denied", "--for", "45m", "--reason", "x"},
			wantCode:   1,
			wantOut:    "request r-denied: waiting for 1 approval(s)\n",
			wantErrHas: "pinhole: request r-denied denied: outside business hours\n",
		},
		{
			name:       "refused/closed-at-once",
			args:       []string{"--agent", std, "request", "closed", "--for", "45m", "--reason", "x"},
			wantCode:   1,
			wantErrHas: "pinhole: request r-closed denied: target is in maintenance\n",
		},
		{
			name:       "refused/policy",
			args:       []string{"--agent", std, "request", "secret-db", "--for", "45m", "--reason", "x"},
			wantCode:   1,
			wantErrHas: "pinhole: request for secret-db: role dba may not request secret-db\n",
		},
		{
			name:       "err/request-timeout",
			args:       []string{"--agent", std, "request", "db-slow", "--for", "45m", "--reason", "x", "--timeout", "50ms"},
			wantCode:   1,
			wantOut:    "request r-slow: waiting for 1 approval(s)\n",
			wantErrHas: "no tunnel after 50ms",
		},
		{
			name:       "usage/request-missing-for",
			args:       []string{"--agent", std, "request", "db-prod", "--reason", "x"},
			wantCode:   2,
			wantErrHas: "pinhole request: flag --for is required",
		},
		{
			name:       "usage/request-for-without-unit",
			args:       []string{"--agent", std, "request", "db-prod", "--for", "10", "--reason", "x"},
			wantCode:   2,
			wantErrHas: "want a duration with a unit, like 45m",
		},
		{
			name:       "usage/request-missing-reason",
			args:       []string{"--agent", std, "request", "db-prod", "--for", "1h"},
			wantCode:   2,
			wantErrHas: "flag --reason is required",
		},
		{
			name:       "usage/request-bad-duration",
			args:       []string{"--agent", std, "request", "db-prod", "--for", "soon", "--reason", "x"},
			wantCode:   2,
			wantErrHas: `invalid value "soon" for flag -for`,
		},
		{
			name:       "usage/request-unknown-flag",
			args:       []string{"--agent", std, "request", "db-prod", "--ttl", "1h"},
			wantCode:   2,
			wantErrHas: "flag provided but not defined: -ttl",
		},
		{
			name:       "usage/request-no-target",
			args:       []string{"--agent", std, "request", "--for", "1h", "--reason", "x"},
			wantCode:   2,
			wantErrHas: "missing TARGET",
		},
		{
			name:       "usage/request-two-targets",
			args:       []string{"--agent", std, "request", "a", "b", "--for", "1h", "--reason", "x"},
			wantCode:   2,
			wantErrHas: `unexpected argument "b"`,
		},
		{
			name:       "ok/status",
			args:       []string{"--agent", std, "status"},
			wantOutHas: "device:  dev-1\nuser:    alice\nbroker:  https://broker:8443\ntunnels:\n  REQUEST  TARGET   PROTOCOL  LOCAL            UNTIL (UTC)\n  r1       db-prod  ssh       127.0.0.1:40001  ",
		},
		{
			name:    "ok/revoke",
			args:    []string{"--agent", std, "revoke", "r1", "--reason", "done early"},
			wantOut: "request r1: ended\n",
		},
		{
			name:       "err/revoke-unknown",
			args:       []string{"--agent", std, "revoke", "r7"},
			wantCode:   1,
			wantErrHas: "pinhole: revoking r7: no request r7\n",
		},
		{
			name:       "usage/revoke-no-id",
			args:       []string{"--agent", std, "revoke"},
			wantCode:   2,
			wantErrHas: "pinhole revoke: missing ID\nusage: pinhole revoke ID [--reason TEXT]\n",
		},
		{
			name:    "ok/probe-granted-port",
			args:    []string{"--agent", std, "probe", "db-prod"},
			wantOut: "probe db-prod port 22: connected (granted)\n",
		},
		{
			name:    "ok/probe-port",
			args:    []string{"--agent", std, "probe", "--port", "22", "db-prod", "--timeout", "1s"},
			wantOut: "probe db-prod port 22: connected (granted)\n",
		},
		{
			name:     "refused/probe-not-granted",
			args:     []string{"--agent", std, "probe", "db-prod", "--port", "5432"},
			wantCode: 1,
			wantOut:  "probe db-prod port 5432: refused by the gateway (not granted)\n",
		},
		{
			name:     "fail/probe-timeout",
			args:     []string{"--agent", std, "probe", "db-prod", "--port", "9", "--timeout", "500ms"},
			wantCode: 1,
			wantOut:  "probe db-prod port 9: no answer within 500ms (timed out: is the gateway reachable?)\n",
		},
		{
			name:     "fail/probe-granted-port-refused",
			args:     []string{"--agent", std, "probe", "db-prod", "--port", "23"},
			wantCode: 1,
			wantOut:  "probe db-prod port 23: failed: connection refused on the granted port: the gateway could not reach the target, or the grant just ended\n",
		},
		{
			name:     "fail/probe-no-reason",
			args:     []string{"--agent", std, "probe", "db-prod", "--port", "24"},
			wantCode: 1,
			wantOut:  "probe db-prod port 24: failed: the agent gave no reason\n",
		},
		{
			name:       "err/probe-no-tunnel",
			args:       []string{"--agent", std, "probe", "db-staging"},
			wantCode:   1,
			wantErrHas: "pinhole: probe db-staging: no live tunnel to db-staging; ask for one with: pinhole request db-staging --for 30m --reason TEXT\n",
		},
		{
			name:       "usage/probe-no-target",
			args:       []string{"--agent", std, "probe", "--port", "22"},
			wantCode:   2,
			wantErrHas: "pinhole probe: missing TARGET\nusage: pinhole probe TARGET [--port N] [--timeout 3s]\n",
		},
		{
			name:       "usage/probe-two-targets",
			args:       []string{"--agent", std, "probe", "a", "b"},
			wantCode:   2,
			wantErrHas: `unexpected argument "b"`,
		},
		{
			name:       "usage/probe-port-too-large",
			args:       []string{"--agent", std, "probe", "db-prod", "--port", "70000"},
			wantCode:   2,
			wantErrHas: "flag --port must be between 1 and 65535, got 70000",
		},
		{
			name:       "usage/probe-port-negative",
			args:       []string{"--agent", std, "probe", "db-prod", "--port", "-1"},
			wantCode:   2,
			wantErrHas: "flag --port must be between 1 and 65535, got -1",
		},
		{
			name:       "usage/probe-port-not-a-number",
			args:       []string{"--agent", std, "probe", "db-prod", "--port", "ssh"},
			wantCode:   2,
			wantErrHas: `invalid value "ssh" for flag -port`,
		},
		{
			name:       "usage/probe-timeout-too-long",
			args:       []string{"--agent", std, "probe", "db-prod", "--timeout", "1m"},
			wantCode:   2,
			wantErrHas: "flag --timeout must be between 0 and 30s, got 1m0s",
		},
		{
			name:       "usage/probe-timeout-zero",
			args:       []string{"--agent", std, "probe", "db-prod", "--timeout", "0s"},
			wantCode:   2,
			wantErrHas: "flag --timeout must be between 0 and 30s, got 0s",
		},
		{
			name:       "usage/probe-target-too-long",
			args:       []string{"--agent", std, "probe", strings.Repeat("x", 65)},
			wantCode:   2,
			wantErrHas: "TARGET is longer than 64 bytes",
		},
		{
			name:       "ok/help-probe",
			args:       []string{"help", "probe"},
			wantOutHas: "usage: pinhole probe TARGET [--port N] [--timeout 3s]\n\nCheck whether a port is reachable through a target's live tunnel.\n",
		},
		{
			name:       "ok/help-lists-probe",
			args:       []string{"help"},
			wantOutHas: "  probe       check whether a port is reachable through a target's live tunnel\n",
		},
		{
			name:    "ok/admin-user-add",
			args:    []string{"--agent", std, "admin", "user", "add", "bob", "--role", "dba"},
			wantOut: "confirm the invite for bob (role dba) with your security key, by 2026-05-01 12:45:00 UTC:\n  https://broker:8443/admin/invite/tok\nthat page then shows bob's one-time invite link\n",
		},
		{
			name:       "err/admin-bad-role",
			args:       []string{"--agent", std, "admin", "user", "add", "bob", "--role", "king"},
			wantCode:   1,
			wantErrHas: "pinhole: adding user bob: unknown role king\n",
		},
		{
			name:       "usage/admin-no-role",
			args:       []string{"--agent", std, "admin", "user", "add", "bob"},
			wantCode:   2,
			wantErrHas: "pinhole admin user add: flag --role is required",
		},
		{
			name:       "usage/admin-unknown-sub",
			args:       []string{"--agent", std, "admin", "group"},
			wantCode:   2,
			wantErrHas: `pinhole admin: unknown command "admin group"`,
		},
		{
			name:       "usage/admin-missing-sub",
			args:       []string{"--agent", std, "admin", "user"},
			wantCode:   2,
			wantErrHas: "pinhole admin user: missing subcommand",
		},
		{
			name:    "ok/audit-verify",
			args:    []string{"--agent", std, "audit", "verify"},
			wantOut: fmt.Sprintf("audit: 7 events verified; head seq 7 hash %s\naudit: the broker has no signed checkpoint yet\n", head.Hash),
		},
		{
			name:    "ok/audit-verify-empty",
			args:    []string{"--agent", empty, "audit", "verify"},
			wantOut: fmt.Sprintf("audit: 0 events verified; head seq 0 hash %s\naudit: the broker has no signed checkpoint yet\n", audit.GenesisHash),
		},
		{
			name:     "fail/audit-verify-tampered",
			args:     []string{"--agent", bad, "audit", "verify"},
			wantCode: 1,
			wantOut:  "audit: verification FAILED at seq 5: hash does not match the event's contents\n",
		},
		{
			name:     "fail/audit-verify-dropped",
			args:     []string{"--agent", gap, "audit", "verify"},
			wantCode: 1,
			wantOut:  "audit: verification FAILED at seq 5: out of sequence: want seq 4 after seq 3\n",
		},
		{
			name:     "fail/audit-verify-head-cut",
			args:     []string{"--agent", headless, "audit", "verify"},
			wantCode: 1,
			wantOut:  "audit: verification FAILED at seq 3: the log does not start at seq 1: earlier events are missing\n",
		},
		{
			name:    "ok/recordings",
			args:    []string{"--agent", std, "recordings"},
			wantOut: "ID    REQUEST  USER   TARGET   KIND  STARTED (UTC)        DURATION  SIZE\nrec1  r1       alice  db-prod  ssh   2026-05-01 12:00:00  1m30s     1234\n",
		},
		{
			name:    "ok/play",
			args:    []string{"--agent", std, "play", "rec1", "--speed", "1000", "--max-idle", "1ms"},
			wantOut: "hello world\r\n",
		},
		{
			name:       "err/play-unknown",
			args:       []string{"--agent", std, "play", "rec9"},
			wantCode:   1,
			wantErrHas: "pinhole: recording rec9: no recording rec9\n",
		},
		{
			name:       "usage/play-bad-speed",
			args:       []string{"--agent", std, "play", "rec1", "--speed", "0"},
			wantCode:   2,
			wantErrHas: "flag --speed must be a positive number",
		},
		{
			name:       "usage/unknown-command",
			args:       []string{"frobnicate"},
			wantCode:   2,
			wantErrHas: "pinhole: unknown command \"frobnicate\"\nRun 'pinhole help' for usage.\n",
		},
		{
			name:       "usage/unknown-global-flag",
			args:       []string{"--agnet", "x", "status"},
			wantCode:   2,
			wantErrHas: "pinhole: flag provided but not defined: -agnet",
		},
		{
			name:       "usage/no-command",
			args:       nil,
			wantCode:   2,
			wantErrHas: "usage: pinhole [--agent SOCK] COMMAND [ARGS]",
		},
		{
			name:       "ok/help",
			args:       []string{"help"},
			wantOutHas: "Commands:\n  request     ask for access to a target and wait for its tunnel\n",
		},
		{
			name:       "ok/help-command",
			args:       []string{"help", "request"},
			wantOutHas: "usage: pinhole request TARGET --for DURATION --reason TEXT [--wait=true] [--timeout 10m]\n",
		},
		{
			name:       "ok/command-dash-h",
			args:       []string{"audit", "verify", "-h"},
			wantOutHas: "  -file string\n",
		},
		{
			name:       "ok/help-group",
			args:       []string{"help", "admin"},
			wantOutHas: "usage: pinhole admin SUBCOMMAND\n",
		},
		{
			name:       "usage/help-unknown",
			args:       []string{"help", "nope"},
			wantCode:   2,
			wantErrHas: `unknown command "nope"`,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			code, out, errOut := run(t, tt.args...)
			if code != tt.wantCode {
				t.Errorf("exit = %d, want %d\nstdout: %s\nstderr: %s", code, tt.wantCode, out, errOut)
			}
			switch {
			case tt.wantOutHas != "":
				if !strings.Contains(out, tt.wantOutHas) {
					t.Errorf("stdout:\n%s\nwant it to contain:\n%s", out, tt.wantOutHas)
				}
			case out != tt.wantOut:
				t.Errorf("stdout:\n%q\nwant:\n%q", out, tt.wantOut)
			}
			if !strings.Contains(errOut, tt.wantErrHas) {
				t.Errorf("stderr:\n%s\nwant it to contain:\n%s", errOut, tt.wantErrHas)
			}
		})
	}
}

func TestRequestSendsTTLAndReason(t *testing.T) {
	t.Parallel()
	f := &fakeAgent{}
	sock := f.serve(t)
	if code, _, errOut := run(t, "--agent", sock, "request", "db-prod", "--for", "45m", "--reason", "INC-4821", "--wait=false"); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	if code, _, errOut := run(t, "--agent", sock, "revoke", "r1", "--reason", "done"); code != 0 {
		t.Fatalf("exit %d: %s", code, errOut)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if got, want := f.created, []wire.CreateRequest{{Target: "db-prod", TTL: "45m0s", Reason: "INC-4821"}}; len(got) != 1 || got[0] != want[0] {
		t.Errorf("created %+v, want %+v", got, want)
	}
	if len(f.revoked) != 1 || f.revoked[0].Reason != "done" {
		t.Errorf("revoked %+v", f.revoked)
	}
}

func TestProbeSendsParameters(t *testing.T) {
	t.Parallel()
	f := &fakeAgent{}
	sock := f.serve(t)
	for _, args := range [][]string{
		{"probe", "db-prod"},
		{"probe", "db-prod", "--port", "5432", "--timeout", "10s"},
	} {
		run(t, append([]string{"--agent", sock}, args...)...)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	want := []string{"target=db-prod&timeout=3s", "port=5432&target=db-prod&timeout=10s"}
	if len(f.probes) != len(want) || f.probes[0] != want[0] || f.probes[1] != want[1] {
		t.Errorf("probe queries %q, want %q", f.probes, want)
	}
}

func TestAuditVerifyFile(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name string, events []audit.Event) string {
		p := filepath.Join(dir, name)
		f, err := os.Create(p)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if err := audit.WriteJSONL(f, events); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := chain(4)
	reordered := []audit.Event{good[0], good[2], good[1], good[3]}
	tests := []struct {
		name       string
		file       string
		wantCode   int
		wantOut    string
		wantErrHas string
	}{
		{"ok/file", write("good.jsonl", good), 0, fmt.Sprintf("audit: 4 events verified; head seq 4 hash %s\n", good[3].Hash), ""},
		{"fail/reordered", write("reordered.jsonl", reordered), 1, "audit: verification FAILED at seq 3: out of sequence: want seq 2 after seq 1\n", ""},
		{"err/missing-file", filepath.Join(dir, "missing.jsonl"), 1, "", "no such file"},
		{"err/empty-file", write("empty.jsonl", nil), 1, "", "holds no audit events"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			code, out, errOut := run(t, "audit", "verify", "--file", tt.file)
			if code != tt.wantCode || out != tt.wantOut || !strings.Contains(errOut, tt.wantErrHas) {
				t.Errorf("exit %d stdout %q stderr %q; want exit %d stdout %q stderr containing %q", code, out, errOut, tt.wantCode, tt.wantOut, tt.wantErrHas)
			}
		})
	}
}

func TestSSH(t *testing.T) {
	t.Parallel()
	sock := (&fakeAgent{}).serve(t)
	// A stand-in ssh that prints its arguments and exits 3.
	fake := filepath.Join(t.TempDir(), "ssh")
	if err := os.WriteFile(fake, []byte("#!/bin/sh\nprintf '%s\\n' \"$@\"\nexit 3\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	wantArgs := strings.Join([]string{
		"-F", "/dev/null", "-p", "40001", "-i", "/s/grants/r1/id_ed25519",
		"-o", "CertificateFile=/s/grants/r1/id_ed25519-cert.pub", "-o", "IdentitiesOnly=yes",
		"-o", "UserKnownHostsFile=/s/grants/r1/known_hosts", "-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "HostKeyAlias=db-prod.internal", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
		"-l", "postgres", "--", "127.0.0.1",
	}, "\n") + "\n"
	tests := []struct {
		name       string
		args       []string
		wantCode   int
		wantOut    string
		wantErrHas string
	}{
		{"ok/interactive", []string{"--agent", sock, "ssh", "--ssh", fake, "db-prod"}, 3, wantArgs, ""},
		{"ok/command", []string{"--agent", sock, "ssh", "--ssh", fake, "db-prod", "ls", "-la"}, 3, wantArgs + "ls\n-la\n", ""},
		{"ok/command-after-dashes", []string{"--agent", sock, "ssh", "--ssh", fake, "db-prod", "--", "ls", "-la"}, 3, wantArgs + "ls\n-la\n", ""},
		{"err/no-tunnel", []string{"--agent", sock, "ssh", "--ssh", fake, "db-staging"}, 1, "", "no live tunnel to db-staging"},
		{"err/expired-tunnel", []string{"--agent", sock, "ssh", "--ssh", fake, "db-old"}, 1, "", "no live tunnel to db-old"},
		{"err/tcp-target", []string{"--agent", sock, "ssh", "--ssh", fake, "web"}, 1, "", "web is a tcp target, not ssh: connect your client to 127.0.0.1:40002"},
		{"err/no-ssh-binary", []string{"--agent", sock, "ssh", "--ssh", filepath.Join(t.TempDir(), "nope"), "db-prod"}, 1, "", "running "},
		{"usage/no-target", []string{"--agent", sock, "ssh"}, 2, "", "missing TARGET"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			code, out, errOut := run(t, tt.args...)
			if code != tt.wantCode || out != tt.wantOut || !strings.Contains(errOut, tt.wantErrHas) {
				t.Errorf("exit %d stdout %q stderr %q; want exit %d stdout %q stderr containing %q", code, out, errOut, tt.wantCode, tt.wantOut, tt.wantErrHas)
			}
		})
	}
}

func TestAgentUnreachable(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(t.TempDir(), "none.sock")
	code, _, errOut := run(t, "--agent", sock, "status")
	if code != 1 || !strings.Contains(errOut, "cannot reach the pinhole agent at "+sock) {
		t.Errorf("exit %d stderr %q", code, errOut)
	}
}

func TestAuditExportThenVerify(t *testing.T) {
	t.Parallel()
	f := &fakeAgent{audit: chain(7)}
	sock := f.serve(t)
	out := filepath.Join(t.TempDir(), "events.jsonl")
	if code, _, errOut := run(t, "--agent", sock, "audit", "export", "--out", out); code != 0 {
		t.Fatalf("export: exit %d: %s", code, errOut)
	}
	if fi, err := os.Stat(out); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("export file: %v %v", fi.Mode(), err)
	}
	code, stdout, _ := run(t, "audit", "verify", "--file", out)
	if code != 0 || !strings.Contains(stdout, "7 events verified") {
		t.Fatalf("verify export: exit %d %q", code, stdout)
	}
	if code, _, errOut := run(t, "--agent", sock, "audit", "export", "--out", out); code == 0 || !strings.Contains(errOut, "exists") {
		t.Fatalf("export over an existing file: exit %d %q", code, errOut)
	}
}

func TestAuditVerifyCheckpoints(t *testing.T) {
	t.Parallel()
	pub, priv, _ := ed25519.GenerateKey(nil)
	events := chain(7)
	cp6 := audit.SignCheckpoint(priv, events[5], t0.Add(time.Hour))
	// A chain rewritten from seq 2 on and re-hashed: consistent, but not what was signed.
	rewritten := append([]audit.Event(nil), events[:1]...)
	for _, ev := range events[1:] {
		ev.Actor = "mallory"
		rewritten = append(rewritten, audit.Seal(rewritten[len(rewritten)-1].Hash, ev))
	}
	dir := t.TempDir()
	witness := filepath.Join(dir, "witness.jsonl")
	cp7 := audit.SignCheckpoint(priv, events[6], t0.Add(2*time.Hour))
	var lines []byte
	for _, cp := range []audit.Checkpoint{cp6, cp7} {
		b, _ := json.Marshal(cp)
		lines = append(append(lines, b...), '\n')
	}
	os.WriteFile(witness, lines, 0o600)
	export := filepath.Join(dir, "events.jsonl")
	ef, _ := os.Create(export)
	audit.WriteJSONL(ef, events[:6])
	ef.Close()

	tests := []struct {
		name     string
		agent    *fakeAgent
		extra    []string
		wantCode int
		wantOut  string
	}{
		{"ok/matches", &fakeAgent{audit: events, checkpoint: &cp6, auditKey: pub}, nil, 0, "1 broker checkpoint(s) match, newest at seq 6"},
		{"fail/tail-cut", &fakeAgent{audit: events[:5], checkpoint: &cp6, auditKey: pub}, nil, 1, "FAILED at seq 6: the log ends at seq 5 but a signed broker checkpoint covers seq 6: events were dropped"},
		{"fail/rehashed", &fakeAgent{audit: rewritten, checkpoint: &cp6, auditKey: pub}, nil, 1, "FAILED at seq 6: the event differs from the signed broker checkpoint"},
		{"fail/witness-sees-cut", &fakeAgent{audit: events[:6], checkpoint: &cp6, auditKey: pub}, []string{"--witness", witness}, 1, "signed witness checkpoint covers seq 7"},
		{"fail/other-key", &fakeAgent{audit: events, checkpoint: &cp6, auditKey: func() ed25519.PublicKey { p, _, _ := ed25519.GenerateKey(nil); return p }()}, nil, 1, "FAILED: broker checkpoint at seq 6"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			sock := tt.agent.serve(t)
			code, out, errOut := run(t, append([]string{"--agent", sock, "audit", "verify"}, tt.extra...)...)
			if code != tt.wantCode || !strings.Contains(out, tt.wantOut) {
				t.Errorf("exit %d stdout %q stderr %q; want exit %d and %q", code, out, errOut, tt.wantCode, tt.wantOut)
			}
		})
	}
	// A rewritten log that was re-signed later still contradicts the older
	// witnessed checkpoint.
	resigned := filepath.Join(dir, "resigned.jsonl")
	cpOld := audit.SignCheckpoint(priv, events[5], t0.Add(time.Hour))
	cpNew := audit.SignCheckpoint(priv, rewritten[6], t0.Add(3*time.Hour))
	var rl []byte
	for _, cp := range []audit.Checkpoint{cpOld, cpNew} {
		b, _ := json.Marshal(cp)
		rl = append(append(rl, b...), '\n')
	}
	os.WriteFile(resigned, rl, 0o600)
	sock := (&fakeAgent{audit: rewritten, checkpoint: &cpNew, auditKey: pub}).serve(t)
	if code, out, _ := run(t, "--agent", sock, "audit", "verify", "--witness", resigned); code != 1 || !strings.Contains(out, "FAILED at seq 6") {
		t.Errorf("re-signed rewrite vs an older witnessed checkpoint: exit %d %q", code, out)
	}

	// An export checked offline against the witness, with a pinned key.
	code, out, _ := run(t, "audit", "verify", "--file", export, "--witness", witness, "--audit-key", base64.StdEncoding.EncodeToString(pub))
	if code != 1 || !strings.Contains(out, "covers seq 7") {
		t.Errorf("offline export vs witness: exit %d %q", code, out)
	}
	code, _, errOut := run(t, "audit", "verify", "--file", export, "--witness", witness)
	if code == 0 || !strings.Contains(errOut, "--audit-key") {
		t.Errorf("offline witness check without a key: exit %d %q", code, errOut)
	}
}
