package localapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// shortTempDir returns a directory with a path short enough for a unix socket.
func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "phl")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// serve starts a Server for cfg on a fresh unix socket and returns an HTTP
// client dialing it. The server stops when the test ends.
func serve(t *testing.T, cfg Config) (string, *http.Client) {
	t.Helper()
	sock := filepath.Join(shortTempDir(t), "agent.sock")
	ln, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- New(cfg).Serve(ctx, ln) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	hc := &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", sock)
		},
	}}
	return sock, hc
}

// fakeBroker echoes what it received as a JSON object.
func fakeBroker(t *testing.T) *httptest.Server {
	t.Helper()
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if r.URL.Path == "/v1/missing" {
			w.WriteHeader(404)
			json.NewEncoder(w).Encode(wire.Error{Error: "no such thing", Code: "not_found"})
			return
		}
		json.NewEncoder(w).Encode(map[string]string{
			"method": r.Method, "path": r.URL.Path, "query": r.URL.RawQuery, "body": string(b),
			"cookie": r.Header.Get("Cookie"),
		})
	}))
	t.Cleanup(srv.Close)
	return srv
}

func TestForward(t *testing.T) {
	t.Parallel()
	broker := fakeBroker(t)
	u, _ := url.Parse(broker.URL)
	_, hc := serve(t, Config{BrokerURL: u, Transport: broker.Client().Transport})

	tests := []struct {
		name       string
		method     string
		path       string
		body       string
		wantStatus int
		want       map[string]string
	}{
		{"ok/get", "GET", "/v1/requests/r1?x=1", "", 200, map[string]string{"method": "GET", "path": "/v1/requests/r1", "query": "x=1", "body": "", "cookie": ""}},
		{"ok/post", "POST", "/v1/requests", `{"target":"db"}`, 200, map[string]string{"method": "POST", "path": "/v1/requests", "query": "", "body": `{"target":"db"}`, "cookie": ""}},
		{"ok/broker-error-passed-through", "GET", "/v1/missing", "", 404, map[string]string{"error": "no such thing", "code": "not_found"}},
		{"deny/method", "DELETE", "/v1/requests/r1", "", 405, map[string]string{"error": "method DELETE is not allowed", "code": "method_not_allowed"}},
		{"deny/body-too-large", "POST", "/v1/requests", strings.Repeat("a", wire.MaxBodyBytes+1), 413, map[string]string{"error": "request body is larger than 65536 bytes", "code": "too_large"}},
		{"deny/unknown-path", "GET", "/admin", "", 404, map[string]string{"error": "no such path GET /admin", "code": "not_found"}},
		{"deny/local-status-post", "POST", "/local/status", "", 405, nil},
		{"deny/local-probe-post", "POST", "/local/probe?target=db", "", 405, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			req, _ := http.NewRequestWithContext(t.Context(), tt.method, "http://agent"+tt.path, strings.NewReader(tt.body))
			req.Header.Set("Cookie", "secret=1")
			resp, err := hc.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			if resp.StatusCode != tt.wantStatus {
				t.Errorf("status = %d, want %d", resp.StatusCode, tt.wantStatus)
			}
			if tt.want == nil {
				return
			}
			var got map[string]string
			if err := json.NewDecoder(resp.Body).Decode(&got); err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(got, tt.want); diff != "" {
				t.Errorf("answer (-got +want):\n%s", diff)
			}
		})
	}
}

func TestForwardUnavailable(t *testing.T) {
	t.Parallel()
	// A broker that is down.
	down := httptest.NewServer(http.NotFoundHandler())
	u, _ := url.Parse(down.URL)
	down.Close()
	tests := []struct {
		name     string
		cfg      Config
		wantCode string
	}{
		{"broker-down", Config{BrokerURL: u, Transport: http.DefaultTransport}, "broker_unreachable"},
		{"no-broker", Config{}, "unavailable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			sock, _ := serve(t, tt.cfg)
			_, err := client.ForAgent(sock).Device(t.Context())
			var ae *client.APIError
			if !errors.As(err, &ae) || ae.Code != tt.wantCode {
				t.Fatalf("error = %#v, want code %q", err, tt.wantCode)
			}
		})
	}
}

func TestStatus(t *testing.T) {
	t.Parallel()
	exp := time.Date(2026, 5, 1, 13, 0, 0, 0, time.UTC)
	want := wire.LocalStatus{Device: "d1", User: "alice", Broker: "https://b", Tunnels: []wire.Tunnel{{Request: "r1", Target: "db", Local: "127.0.0.1:5000", ExpiresAt: exp}}}
	sock, _ := serve(t, Config{Status: func() wire.LocalStatus { return want }})
	got, err := client.ForAgent(sock).LocalStatus(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(got, want); diff != "" {
		t.Errorf("status (-got +want):\n%s", diff)
	}

	sock, _ = serve(t, Config{Status: func() wire.LocalStatus { return wire.LocalStatus{Device: "d"} }})
	got, err = client.ForAgent(sock).LocalStatus(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if got.Tunnels == nil {
		t.Error("tunnels is null, want []")
	}
}

func TestWait(t *testing.T) {
	t.Parallel()
	tun := wire.Tunnel{Request: "r1", Target: "db", Local: "127.0.0.1:5000"}
	wait := func(ctx context.Context, id string) (wire.Tunnel, error) {
		switch id {
		case "r1":
			return tun, nil
		case "denied":
			return wire.Tunnel{}, &RefusedError{Request: id, State: "denied", Reason: "outside business hours"}
		case "ended":
			return wire.Tunnel{}, &RefusedError{Request: id, State: "ended", Reason: "revoked by bob"}
		case "unknown":
			return wire.Tunnel{}, &client.APIError{Status: 404, Code: "not_found", Message: "no request unknown"}
		case "broken":
			return wire.Tunnel{}, errors.New("dial tcp: connection refused")
		}
		<-ctx.Done()
		return wire.Tunnel{}, ctx.Err()
	}
	sock, _ := serve(t, Config{Wait: wait})
	c := client.ForAgent(sock)
	tests := []struct {
		name    string
		id      string
		timeout time.Duration
		want    wire.Tunnel
		wantErr *client.APIError
	}{
		{"ok/up", "r1", time.Minute, tun, nil},
		{"refused/denied", "denied", 0, wire.Tunnel{}, &client.APIError{Status: 409, Code: "refused", Message: "request denied denied: outside business hours"}},
		{"refused/ended", "ended", 0, wire.Tunnel{}, &client.APIError{Status: 409, Code: "refused", Message: "grant ended ended: revoked by bob"}},
		{"err/broker-answer", "unknown", 0, wire.Tunnel{}, &client.APIError{Status: 404, Code: "not_found", Message: "no request unknown"}},
		{"err/other", "broken", 0, wire.Tunnel{}, &client.APIError{Status: 502, Code: "unavailable", Message: "dial tcp: connection refused"}},
		{"err/timeout", "pending", 20 * time.Millisecond, wire.Tunnel{}, &client.APIError{Status: 504, Code: "timeout", Message: "request pending has no tunnel after 20ms"}},
		{"err/timeout-too-long", "r1", MaxWait + time.Second, wire.Tunnel{}, &client.APIError{Status: 400, Code: "bad_request", Message: `parameter timeout must be a duration between 0 and 10m0s, got "10m1s"`}},
		{"err/no-request", "", 0, wire.Tunnel{}, &client.APIError{Status: 400, Code: "bad_request", Message: "parameter request is required"}},
		{"err/bad-request-id", "a b", 0, wire.Tunnel{}, &client.APIError{Status: 400, Code: "bad_request", Message: "parameter request is not a request ID"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := c.LocalWait(t.Context(), tt.id, tt.timeout)
			if tt.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(got, tt.want); diff != "" {
					t.Errorf("tunnel (-got +want):\n%s", diff)
				}
				return
			}
			var ae *client.APIError
			if !errors.As(err, &ae) {
				t.Fatalf("error = %v, want an APIError", err)
			}
			if diff := cmp.Diff(ae, tt.wantErr); diff != "" {
				t.Errorf("error (-got +want):\n%s", diff)
			}
		})
	}
}

func TestProbe(t *testing.T) {
	t.Parallel()
	type call struct {
		Target  string
		Port    int
		Timeout time.Duration
	}
	calls := make(chan call, 16)
	probe := func(ctx context.Context, target string, port int, timeout time.Duration) (wire.LocalProbe, error) {
		calls <- call{target, port, timeout}
		if _, ok := ctx.Deadline(); !ok {
			return wire.LocalProbe{}, errors.New("no deadline")
		}
		if port == 0 {
			port = 22
		}
		switch target {
		case "db":
			p := wire.LocalProbe{Target: target, Destination: "10.0.0.1:" + strconv.Itoa(port), Port: port, Connected: true}
			if port != 22 {
				p.Connected, p.Error = false, wire.ProbeRefused
			}
			return p, nil
		case "gone":
			return wire.LocalProbe{}, fmt.Errorf("%w to %s", ErrNoTunnel, target)
		case "slow":
			<-ctx.Done()
			return wire.LocalProbe{Target: target, Port: port, Error: wire.ProbeTimedOut}, nil
		}
		return wire.LocalProbe{}, errors.New("tunnel exploded")
	}
	sock, hc := serve(t, Config{Probe: probe})
	c := client.ForAgent(sock)
	long := strings.Repeat("x", MaxTargetLen+1)
	tests := []struct {
		name     string
		target   string
		port     int
		timeout  time.Duration
		want     wire.LocalProbe
		wantCall *call
		wantErr  *client.APIError
	}{
		{name: "ok/default-port-and-timeout", target: "db", want: wire.LocalProbe{Target: "db", Destination: "10.0.0.1:22", Port: 22, Connected: true}, wantCall: &call{"db", 0, DefaultProbeTimeout}},
		{name: "ok/refused", target: "db", port: 5432, timeout: time.Second, want: wire.LocalProbe{Target: "db", Destination: "10.0.0.1:5432", Port: 5432, Error: wire.ProbeRefused}, wantCall: &call{"db", 5432, time.Second}},
		{name: "ok/max-port-and-timeout", target: "db", port: 65535, timeout: MaxProbeTimeout, want: wire.LocalProbe{Target: "db", Destination: "10.0.0.1:65535", Port: 65535, Error: wire.ProbeRefused}, wantCall: &call{"db", 65535, MaxProbeTimeout}},
		{name: "ok/timeout-enforced", target: "slow", port: 22, timeout: 20 * time.Millisecond, want: wire.LocalProbe{Target: "slow", Port: 22, Error: wire.ProbeTimedOut}, wantCall: &call{"slow", 22, 20 * time.Millisecond}},
		{name: "err/no-tunnel", target: "gone", wantErr: &client.APIError{Status: 404, Code: "not_found", Message: "no live tunnel to gone"}},
		{name: "err/other", target: "boom", wantErr: &client.APIError{Status: 502, Code: "unavailable", Message: "tunnel exploded"}},
		{name: "err/port-too-large", target: "db", port: 65536, wantErr: &client.APIError{Status: 400, Code: "bad_request", Message: `parameter port must be a number between 1 and 65535, got "65536"`}},
		{name: "err/port-negative", target: "db", port: -1, wantErr: &client.APIError{Status: 400, Code: "bad_request", Message: `parameter port must be a number between 1 and 65535, got "-1"`}},
		{name: "err/timeout-too-long", target: "db", timeout: MaxProbeTimeout + time.Second, wantErr: &client.APIError{Status: 400, Code: "bad_request", Message: `parameter timeout must be a duration between 0 and 30s, got "31s"`}},
		{name: "err/no-target", target: "", wantErr: &client.APIError{Status: 400, Code: "bad_request", Message: "parameter target is required"}},
		{name: "err/target-too-long", target: long, wantErr: &client.APIError{Status: 400, Code: "bad_request", Message: "parameter target is not a target name (at most 64 printable characters)"}},
		{name: "err/target-with-space", target: "db prod", wantErr: &client.APIError{Status: 400, Code: "bad_request", Message: "parameter target is not a target name (at most 64 printable characters)"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := c.LocalProbe(t.Context(), tt.target, tt.port, tt.timeout)
			var gotCall *call
			select {
			case cl := <-calls:
				gotCall = &cl
			default:
			}
			if tt.wantErr == nil {
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(got, tt.want); diff != "" {
					t.Errorf("probe (-got +want):\n%s", diff)
				}
				if diff := cmp.Diff(gotCall, tt.wantCall); diff != "" {
					t.Errorf("Probe call (-got +want):\n%s", diff)
				}
				return
			}
			var ae *client.APIError
			if !errors.As(err, &ae) {
				t.Fatalf("error = %v, want an APIError", err)
			}
			if diff := cmp.Diff(ae, tt.wantErr); diff != "" {
				t.Errorf("error (-got +want):\n%s", diff)
			}
		})
	}
	t.Run("err/bad-query", func(t *testing.T) {
		for _, q := range []string{"target=db&port=0", "target=db&port=%2B22", "target=db&port=22x", "target=db&timeout=0s", "target=db&timeout=soon", "target=d%00b"} {
			resp, err := hc.Get("http://agent" + wire.PathLocalProbe + "?" + q)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusBadRequest {
				t.Errorf("GET ?%s: status %d, want 400", q, resp.StatusCode)
			}
		}
		select {
		case cl := <-calls:
			t.Errorf("Probe called with %+v for a bad query", cl)
		default:
		}
	})
	t.Run("err/not-configured", func(t *testing.T) {
		sock, _ := serve(t, Config{})
		_, err := client.ForAgent(sock).LocalProbe(t.Context(), "db", 0, 0)
		var ae *client.APIError
		if !errors.As(err, &ae) || ae.Status != 503 || ae.Code != "unavailable" {
			t.Errorf("error = %#v, want 503 unavailable", err)
		}
	})
}

func TestServeStopsPendingWait(t *testing.T) {
	t.Parallel()
	started := make(chan struct{})
	sock := filepath.Join(shortTempDir(t), "agent.sock")
	ln, err := ListenUnix(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- New(Config{Wait: func(ctx context.Context, _ string) (wire.Tunnel, error) {
			close(started)
			<-ctx.Done()
			return wire.Tunnel{}, ctx.Err()
		}}).Serve(ctx, ln)
	}()
	waitErr := make(chan error, 1)
	go func() {
		_, err := client.ForAgent(sock).LocalWait(t.Context(), "r1", MaxWait)
		waitErr <- err
	}()
	<-started
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Serve = %v", err)
	}
	if err := <-waitErr; err == nil {
		t.Error("wait succeeded after shutdown")
	}
	if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left behind: %v", err)
	}
}

func TestListenUnix(t *testing.T) {
	t.Parallel()
	dir := shortTempDir(t)

	t.Run("ok/fresh-0600", func(t *testing.T) {
		p := filepath.Join(dir, "a.sock")
		ln, err := ListenUnix(p)
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("mode = %v, want 0600", fi.Mode().Perm())
		}
		// A second agent on the same socket is refused.
		if ln2, err := ListenUnix(p); err == nil {
			ln2.Close()
			t.Error("second ListenUnix on a live socket succeeded")
		}
	})
	t.Run("ok/stale-socket-removed", func(t *testing.T) {
		p := filepath.Join(dir, "b.sock")
		ln, err := net.Listen("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		ln.(*net.UnixListener).SetUnlinkOnClose(false)
		ln.Close()
		ln, err = ListenUnix(p)
		if err != nil {
			t.Fatalf("ListenUnix over a stale socket: %v", err)
		}
		ln.Close()
	})
	t.Run("deny/regular-file", func(t *testing.T) {
		p := filepath.Join(dir, "c.sock")
		os.WriteFile(p, []byte("x"), 0o600)
		if ln, err := ListenUnix(p); err == nil {
			ln.Close()
			t.Error("ListenUnix replaced a regular file")
		}
		if b, _ := os.ReadFile(p); !bytes.Equal(b, []byte("x")) {
			t.Error("regular file changed")
		}
	})
}

func TestRefusedError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		err  RefusedError
		want string
	}{
		{RefusedError{"r1", "denied", "no"}, "request r1 denied: no"},
		{RefusedError{"r1", "expired", ""}, "request r1 expired"},
		{RefusedError{"r1", "ended", "revoked"}, "grant r1 ended: revoked"},
	}
	for _, tt := range tests {
		if got := tt.err.Error(); got != tt.want {
			t.Errorf("Error() = %q, want %q", got, tt.want)
		}
	}
}

func FuzzParseWait(f *testing.F) {
	f.Add("request=r1&timeout=60s")
	f.Add("request=&timeout=-1s")
	f.Add("request=r%00&timeout=1h")
	f.Add("timeout=9223372036854775807ns&request=x")
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		id, d, err := parseWait(q)
		if err != nil {
			return
		}
		if id == "" || len(id) > maxRequestIDLen || d <= 0 || d > MaxWait {
			t.Fatalf("parseWait(%q) accepted id %q timeout %v", raw, id, d)
		}
	})
}

func FuzzParseProbe(f *testing.F) {
	f.Add("target=db-prod&port=5432&timeout=3s")
	f.Add("target=db")
	f.Add("target=&port=0&timeout=-1s")
	f.Add("target=db&port=65536&timeout=31s")
	f.Add("target=d%00b&port=%2B1")
	f.Add("port=22&timeout=9223372036854775807ns&target=x")
	f.Fuzz(func(t *testing.T, raw string) {
		q, err := url.ParseQuery(raw)
		if err != nil {
			return
		}
		target, port, d, err := parseProbe(q)
		if err != nil {
			return
		}
		if target == "" || len(target) > MaxTargetLen || strings.ContainsAny(target, " \t\r\n\x00") ||
			port < 0 || port > 65535 || d <= 0 || d > MaxProbeTimeout {
			t.Fatalf("parseProbe(%q) accepted target %q port %d timeout %v", raw, target, port, d)
		}
		if q.Get("port") != "" && port == 0 {
			t.Fatalf("parseProbe(%q) accepted port 0", raw)
		}
	})
}
