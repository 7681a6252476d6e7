package client

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// seen is what the fake server observed of one call.
type seen struct {
	Method string
	Path   string
	Query  string
	Body   string
}

// recorder answers every call with answer and records it.
func recorder(t *testing.T, status int, answer string) (*httptest.Server, chan seen) {
	t.Helper()
	ch := make(chan seen, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		ch <- seen{Method: r.Method, Path: r.URL.EscapedPath(), Query: r.URL.RawQuery, Body: string(b)}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(status)
		io.WriteString(w, answer)
	}))
	t.Cleanup(srv.Close)
	return srv, ch
}

func TestMethods(t *testing.T) {
	t.Parallel()
	ts := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	tests := []struct {
		name   string
		answer string
		call   func(context.Context, *Client) (any, error)
		want   seen
		got    any
	}{
		{
			name:   "ok/ca",
			answer: `{"user_ca_keys":["u"],"host_ca_keys":["h"]}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.CA(ctx) },
			want:   seen{Method: "GET", Path: "/v1/ca"},
			got:    wire.CA{UserCAKeys: []string{"u"}, HostCAKeys: []string{"h"}},
		},
		{
			name:   "ok/enroll",
			answer: `{"device_id":"d1","confirm_url":"https://b/c","expires_at":"2026-05-01T12:00:00Z"}`,
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.Enroll(ctx, wire.EnrollRequest{User: "alice", Hostname: "ws"})
			},
			want: seen{Method: "POST", Path: "/v1/enroll", Body: `{"user":"alice","hostname":"ws"}`},
			got:  wire.EnrollResponse{DeviceID: "d1", ConfirmURL: "https://b/c", ExpiresAt: ts},
		},
		{
			name:   "ok/device",
			answer: `{"id":"d1","user":"alice","state":"active"}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.Device(ctx) },
			want:   seen{Method: "GET", Path: "/v1/device"},
			got:    wire.Device{ID: "d1", User: "alice", State: "active"},
		},
		{
			name:   "ok/posture-nonce",
			answer: `{"nonce":"n1"}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.PostureNonce(ctx) },
			want:   seen{Method: "POST", Path: "/v1/posture/nonce", Body: `{}`},
			got:    wire.PostureNonce{Nonce: "n1"},
		},
		{
			name:   "ok/posture",
			answer: `{"accepted":true}`,
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.SubmitPosture(ctx, wire.PostureSubmit{Report: []byte("r"), Signature: []byte("s")})
			},
			want: seen{Method: "POST", Path: "/v1/posture", Body: `{"report":"cg==","signature":"cw=="}`},
			got:  wire.PostureResult{Accepted: true},
		},
		{
			name:   "ok/create-request",
			answer: `{"id":"r1","state":"pending","required_approvals":2}`,
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.CreateRequest(ctx, wire.CreateRequest{Target: "db", TTL: "45m", Reason: "why"})
			},
			want: seen{Method: "POST", Path: "/v1/requests", Body: `{"target":"db","ttl":"45m","reason":"why"}`},
			got:  wire.Request{ID: "r1", State: "pending", RequiredApprovals: 2},
		},
		{
			name:   "ok/request-id-escaped",
			answer: `{"id":"a/b"}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.Request(ctx, "a/b") },
			want:   seen{Method: "GET", Path: "/v1/requests/a%2Fb"},
			got:    wire.Request{ID: "a/b"},
		},
		{
			name:   "ok/events",
			answer: `{"events":[{"seq":4,"type":"grant.issued","request":"r1","time":"2026-05-01T12:00:00Z"}],"next":4}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.Events(ctx, 3, 25*time.Second) },
			want:   seen{Method: "GET", Path: "/v1/events", Query: "after=3&wait=25s"},
			got:    wire.Events{Events: []wire.Event{{Seq: 4, Type: "grant.issued", Request: "r1", Time: ts}}, Next: 4},
		},
		{
			name:   "ok/activate",
			answer: `{"request":"r1","destination":"10.0.0.1:22"}`,
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.Activate(ctx, "r1", wire.ActivateRequest{WireGuardPublicKey: "wg", SSHPublicKey: "ssh"})
			},
			want: seen{Method: "POST", Path: "/v1/grants/r1/activate", Body: `{"wireguard_public_key":"wg","ssh_public_key":"ssh"}`},
			got:  wire.Activation{Request: "r1", Destination: "10.0.0.1:22"},
		},
		{
			name:   "ok/revoke",
			answer: `{"id":"r1","state":"ended"}`,
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.Revoke(ctx, "r1", wire.RevokeRequest{Reason: "done"})
			},
			want: seen{Method: "POST", Path: "/v1/grants/r1/revoke", Body: `{"reason":"done"}`},
			got:  wire.Request{ID: "r1", State: "ended"},
		},
		{
			name:   "ok/invite",
			answer: `{"user":"bob","confirm_url":"https://b/admin/invite/x"}`,
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.InviteUser(ctx, wire.InviteUser{Name: "bob", Role: "dba"})
			},
			want: seen{Method: "POST", Path: "/v1/admin/users", Body: `{"name":"bob","role":"dba"}`},
			got:  wire.Invite{User: "bob", ConfirmURL: "https://b/admin/invite/x"},
		},
		{
			name:   "ok/audit",
			answer: `{"events":[{"seq":1}],"next":1,"more":false}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.AuditEvents(ctx, 0, 500) },
			want:   seen{Method: "GET", Path: "/v1/audit/events", Query: "after=0&limit=500"},
			got:    wire.AuditPage{Events: []json.RawMessage{json.RawMessage(`{"seq":1}`)}, Next: 1},
		},
		{
			name:   "ok/recordings",
			answer: `[{"id":"rec1","size":10}]`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.Recordings(ctx) },
			want:   seen{Method: "GET", Path: "/v1/recordings"},
			got:    []wire.Recording{{ID: "rec1", Size: 10}},
		},
		{
			name:   "ok/local-status",
			answer: `{"device":"d1","user":"alice","tunnels":[]}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.LocalStatus(ctx) },
			want:   seen{Method: "GET", Path: "/local/status"},
			got:    wire.LocalStatus{Device: "d1", User: "alice", Tunnels: []wire.Tunnel{}},
		},
		{
			name:   "ok/local-wait",
			answer: `{"request":"r1","local":"127.0.0.1:4000"}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.LocalWait(ctx, "r1", time.Minute) },
			want:   seen{Method: "GET", Path: "/local/wait", Query: "request=r1&timeout=1m0s"},
			got:    wire.Tunnel{Request: "r1", Local: "127.0.0.1:4000"},
		},
		{
			name:   "ok/local-probe",
			answer: `{"target":"db","destination":"10.0.0.1:5432","port":5432,"connected":false,"error":"connection refused"}`,
			call: func(ctx context.Context, c *Client) (any, error) {
				return c.LocalProbe(ctx, "db", 5432, 3*time.Second)
			},
			want: seen{Method: "GET", Path: "/local/probe", Query: "port=5432&target=db&timeout=3s"},
			got:  wire.LocalProbe{Target: "db", Destination: "10.0.0.1:5432", Port: 5432, Error: wire.ProbeRefused},
		},
		{
			name:   "ok/local-probe-defaults",
			answer: `{"target":"db prod","destination":"10.0.0.1:22","port":22,"connected":true}`,
			call:   func(ctx context.Context, c *Client) (any, error) { return c.LocalProbe(ctx, "db prod", 0, 0) },
			want:   seen{Method: "GET", Path: "/local/probe", Query: "target=db+prod"},
			got:    wire.LocalProbe{Target: "db prod", Destination: "10.0.0.1:22", Port: 22, Connected: true},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv, ch := recorder(t, http.StatusOK, tt.answer)
			got, err := tt.call(t.Context(), New(srv.URL+"/", srv.Client()))
			if err != nil {
				t.Fatalf("call: %v", err)
			}
			if diff := cmp.Diff(got, tt.got); diff != "" {
				t.Errorf("answer (-got +want):\n%s", diff)
			}
			if diff := cmp.Diff(<-ch, tt.want); diff != "" {
				t.Errorf("request (-got +want):\n%s", diff)
			}
		})
	}
}

func TestAPIError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		status int
		body   string
		want   APIError
	}{
		{"wire-error", 403, `{"error":"target db-prod needs posture","code":"policy"}`, APIError{403, "policy", "target db-prod needs posture"}},
		{"wire-error-no-code", 409, `{"error":"grant ended"}`, APIError{409, "http_409", "grant ended"}},
		{"plain-text", 502, "bad gateway\n", APIError{502, "http_502", "bad gateway (HTTP 502)"}},
		{"empty", 404, "", APIError{404, "http_404", "Not Found (HTTP 404)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			srv, _ := recorder(t, tt.status, tt.body)
			_, err := New(srv.URL, nil).Device(t.Context())
			var ae *APIError
			if !errors.As(err, &ae) {
				t.Fatalf("error %v is not an *APIError", err)
			}
			if diff := cmp.Diff(*ae, tt.want); diff != "" {
				t.Errorf("APIError (-got +want):\n%s", diff)
			}
			if ae.Error() != tt.want.Message {
				t.Errorf("Error() = %q, want %q", ae.Error(), tt.want.Message)
			}
		})
	}
}

func TestResponseTooLarge(t *testing.T) {
	t.Parallel()
	big := `{"id":"` + strings.Repeat("x", MaxResponseBytes) + `"}`
	srv, _ := recorder(t, 200, big)
	_, err := New(srv.URL, nil).Device(t.Context())
	if !errors.Is(err, ErrTooLarge) {
		t.Fatalf("error = %v, want ErrTooLarge", err)
	}
}

func TestRecordingCast(t *testing.T) {
	t.Parallel()
	srv, ch := recorder(t, 200, "{\"version\":2}\n[0.1,\"o\",\"hi\"]\n")
	rc, err := New(srv.URL, nil).RecordingCast(t.Context(), "rec1")
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	b, err := io.ReadAll(rc)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := string(b), "{\"version\":2}\n[0.1,\"o\",\"hi\"]\n"; got != want {
		t.Errorf("cast = %q, want %q", got, want)
	}
	if got := (<-ch).Path; got != "/v1/recordings/rec1/cast" {
		t.Errorf("path = %q", got)
	}
}

func TestBoundedBody(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		data    string
		max     int64
		wantErr bool
	}{
		{"ok/under", "abc", 4, false},
		{"ok/exact", "abcd", 4, false},
		{"err/over", "abcde", 4, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			b := &boundedBody{rc: io.NopCloser(iotest1(tt.data)), left: tt.max, max: tt.max}
			_, err := io.ReadAll(b)
			if got := errors.Is(err, ErrTooLarge); got != tt.wantErr {
				t.Errorf("err = %v, wantErr %v", err, tt.wantErr)
			}
		})
	}
}

// iotest1 returns a reader that yields one byte per Read.
func iotest1(s string) io.Reader { return &oneByte{s: s} }

type oneByte struct{ s string }

func (o *oneByte) Read(p []byte) (int, error) {
	if o.s == "" {
		return 0, io.EOF
	}
	if len(p) == 0 {
		return 0, nil
	}
	p[0] = o.s[0]
	o.s = o.s[1:]
	return 1, nil
}

// shortTempDir returns a directory with a path short enough for a unix socket.
func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "phc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

func TestForAgent(t *testing.T) {
	t.Parallel()
	sock := filepath.Join(shortTempDir(t), "agent.sock")
	ln, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Host != "pinhole-agent" || r.URL.Path != wire.PathLocalStatus {
			http.Error(w, `{"error":"unexpected","code":"bad_request"}`, 400)
			return
		}
		io.WriteString(w, `{"device":"d1","user":"alice","broker":"https://b"}`)
	})}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })

	c := ForAgent(sock)
	got, err := c.LocalStatus(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(got, wire.LocalStatus{Device: "d1", User: "alice", Broker: "https://b"}); diff != "" {
		t.Errorf("status (-got +want):\n%s", diff)
	}

	_, err = ForAgent(filepath.Join(shortTempDir(t), "missing.sock")).LocalStatus(t.Context())
	if err == nil {
		t.Fatal("LocalStatus on a missing socket succeeded")
	}
}

// tlsBroker starts a TLS 1.3 server requiring a client certificate that
// answers with the fingerprint of the device key it saw.
func tlsBroker(t *testing.T) (*httptest.Server, string) {
	t.Helper()
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		pub, err := devicekey.FromConnectionState(r.TLS)
		if err != nil {
			http.Error(w, `{"error":"no device","code":"unauthenticated"}`, 401)
			return
		}
		json.NewEncoder(w).Encode(wire.Device{ID: "d1", Fingerprint: devicekey.Fingerprint(pub), State: tls.VersionName(r.TLS.Version)})
	}))
	srv.TLS = &tls.Config{ClientAuth: tls.RequireAnyClientCert}
	srv.StartTLS()
	t.Cleanup(srv.Close)
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	if err := os.WriteFile(caFile, pemBytes, 0o644); err != nil {
		t.Fatal(err)
	}
	return srv, caFile
}

func TestDeviceHTTPClient(t *testing.T) {
	t.Parallel()
	srv, caFile := tlsBroker(t)
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	hc, err := DeviceHTTPClient(caFile, key)
	if err != nil {
		t.Fatal(err)
	}
	d, err := New(srv.URL, hc).Device(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	want := wire.Device{ID: "d1", Fingerprint: devicekey.Fingerprint(key.Public().(ed25519.PublicKey)), State: "TLS 1.3"}
	if diff := cmp.Diff(d, want); diff != "" {
		t.Errorf("device (-got +want):\n%s", diff)
	}

	// A broker whose certificate is not in the CA file is refused.
	other := httptest.NewUnstartedServer(http.NotFoundHandler())
	other.TLS = &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}}
	other.StartTLS()
	t.Cleanup(other.Close)
	if _, err := New(other.URL, hc).Device(t.Context()); err == nil {
		t.Error("call to a broker signed by another CA succeeded")
	}
}

// selfSigned makes a server certificate for 127.0.0.1 that no test trusts.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	_, priv, _ := ed25519.GenerateKey(rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7),
		Subject:      pkix.Name{CommonName: "other"},
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, priv.Public(), priv)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: priv}
}

func TestDeviceHTTPClientErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	notPEM := filepath.Join(dir, "bad.pem")
	os.WriteFile(notPEM, []byte("not a certificate"), 0o644)
	tooBig := filepath.Join(dir, "big.pem")
	os.WriteFile(tooBig, bytes.Repeat([]byte("a"), maxCAFileBytes+1), 0o644)
	_, caFile := tlsBroker(t)
	tests := []struct {
		name   string
		caFile string
		key    ed25519.PrivateKey
	}{
		{"missing-ca", filepath.Join(dir, "missing.pem"), key},
		{"not-pem", notPEM, key},
		{"too-big", tooBig, key},
		{"bad-key", caFile, ed25519.PrivateKey{1, 2, 3}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if _, err := DeviceHTTPClient(tt.caFile, tt.key); err == nil {
				t.Error("DeviceHTTPClient succeeded")
			}
		})
	}
}

func TestCertSourceRefresh(t *testing.T) {
	t.Parallel()
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cs := &certSource{key: key, now: func() time.Time { return now }}
	a, err := cs.get()
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(time.Minute)
	b, _ := cs.get()
	if a != b {
		t.Error("certificate remade after a minute")
	}
	now = now.Add(certRefresh)
	c, _ := cs.get()
	if a == c {
		t.Error("certificate not remade after the refresh interval")
	}
}

func TestDefaultPaths(t *testing.T) {
	// Not parallel: sets environment variables.
	t.Setenv("PINHOLE_STATE", "/s")
	t.Setenv("PINHOLE_AGENT_SOCKET", "")
	if d, _ := DefaultStateDir(); d != "/s" {
		t.Errorf("DefaultStateDir = %q", d)
	}
	if s, _ := DefaultAgentSocket(); s != "/s/agent.sock" {
		t.Errorf("DefaultAgentSocket = %q", s)
	}
	t.Setenv("PINHOLE_AGENT_SOCKET", "/x.sock")
	if s, _ := DefaultAgentSocket(); s != "/x.sock" {
		t.Errorf("DefaultAgentSocket = %q", s)
	}
	t.Setenv("PINHOLE_STATE", "")
	t.Setenv("HOME", "/home/u")
	if d, _ := DefaultStateDir(); d != "/home/u/.local/state/pinhole" {
		t.Errorf("DefaultStateDir = %q", d)
	}
}
