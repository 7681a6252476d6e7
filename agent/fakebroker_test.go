package agent

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/tls"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/agent/tunnel"
	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/posture"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

const (
	fakeDeviceID   = "dev-1"
	fakeConfirmURL = "https://broker.test/confirm/abc"
)

// fakeBroker is a small hand-written broker: TLS 1.3 requiring the device
// certificate, enrollment, posture with nonces, device events (long-poll),
// request lookup and grant activation.
type fakeBroker struct {
	t      *testing.T
	srv    *httptest.Server
	caFile string
	userCA ssh.Signer
	hostCA ssh.Signer
	gwKey  wgkey.Public

	enrollTTL time.Duration

	mu          sync.Mutex
	devicePub   ed25519.PublicKey
	events      []wire.Event
	changed     chan struct{}
	nonces      map[string]bool
	reports     []posture.Report
	requests    map[string]wire.Request
	expires     map[string]time.Time
	activations map[string]wire.ActivateRequest
}

func newFakeBroker(t *testing.T) *fakeBroker {
	t.Helper()
	userCA, err := sshca.NewKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	hostCA, err := sshca.NewKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	gw, err := wgkey.NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	fb := &fakeBroker{
		t: t, userCA: userCA, hostCA: hostCA, gwKey: gw.Public(),
		enrollTTL:   10 * time.Minute,
		changed:     make(chan struct{}),
		nonces:      make(map[string]bool),
		requests:    make(map[string]wire.Request),
		expires:     make(map[string]time.Time),
		activations: make(map[string]wire.ActivateRequest),
	}
	mux := http.NewServeMux()
	mux.HandleFunc("POST /v1/enroll", fb.enroll)
	mux.HandleFunc("GET /v1/events", fb.authed(fb.eventsHandler))
	mux.HandleFunc("POST /v1/posture/nonce", fb.authed(fb.nonce))
	mux.HandleFunc("POST /v1/posture", fb.authed(fb.posture))
	mux.HandleFunc("GET /v1/requests/{id}", fb.authed(fb.request))
	mux.HandleFunc("POST /v1/grants/{id}/activate", fb.authed(fb.activate))
	fb.srv = httptest.NewUnstartedServer(mux)
	fb.srv.TLS = &tls.Config{ClientAuth: tls.RequireAnyClientCert, MinVersion: tls.VersionTLS13}
	fb.srv.StartTLS()
	t.Cleanup(fb.srv.Close)
	fb.caFile = filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(fb.caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: fb.srv.Certificate().Raw}), 0o644); err != nil {
		t.Fatal(err)
	}
	return fb
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}

func writeErr(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, wire.Error{Error: msg, Code: code})
}

func (fb *fakeBroker) enroll(w http.ResponseWriter, r *http.Request) {
	pub, err := devicekey.FromConnectionState(r.TLS)
	if err != nil {
		writeErr(w, 401, "unauthenticated", err.Error())
		return
	}
	var req wire.EnrollRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil || req.User == "" {
		writeErr(w, 400, "bad_request", "bad enroll request")
		return
	}
	fb.mu.Lock()
	fb.devicePub = pub
	fb.mu.Unlock()
	writeJSON(w, 200, wire.EnrollResponse{DeviceID: fakeDeviceID, ConfirmURL: fakeConfirmURL, ExpiresAt: time.Now().Add(fb.enrollTTL)})
}

// authed requires the enrolled device's certificate.
func (fb *fakeBroker) authed(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		pub, err := devicekey.FromConnectionState(r.TLS)
		fb.mu.Lock()
		ok := err == nil && fb.devicePub != nil && fb.devicePub.Equal(pub)
		fb.mu.Unlock()
		if !ok {
			writeErr(w, 401, "unauthenticated", "unknown device")
			return
		}
		h(w, r)
	}
}

// publish appends a device event and wakes long-polls.
func (fb *fakeBroker) publish(typ, request, reason string) {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	fb.events = append(fb.events, wire.Event{Seq: int64(len(fb.events) + 1), Type: typ, Request: request, Reason: reason, Time: time.Now()})
	close(fb.changed)
	fb.changed = make(chan struct{})
}

func (fb *fakeBroker) confirm() { fb.publish(wire.EventDeviceConfirmed, "", "") }

// grant issues a granted request for the device.
func (fb *fakeBroker) grant(id string, expires time.Time) {
	fb.mu.Lock()
	fb.requests[id] = wire.Request{ID: id, Device: fakeDeviceID, Target: "db-prod", State: "granted", GrantEnds: expires}
	fb.expires[id] = expires
	fb.mu.Unlock()
	fb.publish(wire.EventGrantIssued, id, "")
}

// end ends a grant, like a revoke.
func (fb *fakeBroker) end(id, reason string) {
	fb.setState(id, "ended", reason)
	fb.publish(wire.EventGrantEnded, id, reason)
}

func (fb *fakeBroker) setState(id, state, reason string) {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	r := fb.requests[id]
	r.ID, r.Device, r.State, r.EndReason = id, fakeDeviceID, state, reason
	fb.requests[id] = r
}

func (fb *fakeBroker) eventsHandler(w http.ResponseWriter, r *http.Request) {
	after, err := strconv.ParseInt(r.URL.Query().Get("after"), 10, 64)
	if err != nil {
		writeErr(w, 400, "bad_request", "bad after")
		return
	}
	wait, err := time.ParseDuration(r.URL.Query().Get("wait"))
	if err != nil {
		writeErr(w, 400, "bad_request", "bad wait")
		return
	}
	timer := time.NewTimer(wait)
	defer timer.Stop()
	for {
		fb.mu.Lock()
		var out []wire.Event
		for _, e := range fb.events {
			if e.Seq > after {
				out = append(out, e)
			}
		}
		changed := fb.changed
		fb.mu.Unlock()
		if len(out) > 0 {
			writeJSON(w, 200, wire.Events{Events: out, Next: out[len(out)-1].Seq})
			return
		}
		select {
		case <-changed:
		case <-timer.C:
			writeJSON(w, 200, wire.Events{Events: []wire.Event{}, Next: after})
			return
		case <-r.Context().Done():
			return
		}
	}
}

func (fb *fakeBroker) nonce(w http.ResponseWriter, _ *http.Request) {
	fb.mu.Lock()
	n := fmt.Sprintf("nonce-%d", len(fb.nonces)+1)
	fb.nonces[n] = true
	fb.mu.Unlock()
	writeJSON(w, 200, wire.PostureNonce{Nonce: n, ExpiresAt: time.Now().Add(time.Minute)})
}

func (fb *fakeBroker) posture(w http.ResponseWriter, r *http.Request) {
	var s wire.PostureSubmit
	if err := json.NewDecoder(r.Body).Decode(&s); err != nil {
		writeErr(w, 400, "bad_request", err.Error())
		return
	}
	var peek posture.Report
	if err := json.Unmarshal(s.Report, &peek); err != nil {
		writeErr(w, 400, "bad_request", err.Error())
		return
	}
	fb.mu.Lock()
	defer fb.mu.Unlock()
	if !fb.nonces[peek.Nonce] {
		writeErr(w, 400, "bad_request", "unknown or used nonce")
		return
	}
	delete(fb.nonces, peek.Nonce)
	rep, err := posture.Verify(fb.devicePub, posture.Signed{Report: s.Report, Signature: s.Signature}, posture.VerifyOptions{Nonce: peek.Nonce})
	if err != nil {
		writeErr(w, 400, "bad_request", err.Error())
		return
	}
	if rep.Device != fakeDeviceID {
		writeErr(w, 400, "bad_request", "wrong device "+rep.Device)
		return
	}
	fb.reports = append(fb.reports, rep)
	writeJSON(w, 200, wire.PostureResult{Accepted: true, CollectedAt: rep.CollectedAt})
}

func (fb *fakeBroker) reportCount() int {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	return len(fb.reports)
}

func (fb *fakeBroker) request(w http.ResponseWriter, r *http.Request) {
	fb.mu.Lock()
	req, ok := fb.requests[r.PathValue("id")]
	fb.mu.Unlock()
	if !ok {
		writeErr(w, 404, "not_found", "no request "+r.PathValue("id"))
		return
	}
	writeJSON(w, 200, req)
}

func (fb *fakeBroker) activate(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("id")
	var req wire.ActivateRequest
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		writeErr(w, 400, "bad_request", err.Error())
		return
	}
	fb.mu.Lock()
	st := fb.requests[id]
	expires := fb.expires[id]
	fb.activations[id] = req
	fb.mu.Unlock()
	if st.State != "granted" {
		writeErr(w, 409, "conflict", "grant "+id+" is not active")
		return
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(req.SSHPublicKey))
	if err != nil {
		writeErr(w, 400, "bad_request", err.Error())
		return
	}
	cert := &ssh.Certificate{
		Key: pub, Serial: 1, CertType: ssh.UserCert, KeyId: "grant " + id,
		ValidPrincipals: []string{"root"},
		ValidAfter:      uint64(time.Now().Add(-time.Minute).Unix()),
		ValidBefore:     uint64(expires.Unix()),
		Permissions:     ssh.Permissions{CriticalOptions: map[string]string{"source-address": "100.64.0.2/32"}, Extensions: map[string]string{"permit-pty": ""}},
	}
	if err := cert.SignCert(rand.Reader, fb.userCA); err != nil {
		writeErr(w, 500, "internal", err.Error())
		return
	}
	writeJSON(w, 200, wire.Activation{
		Request: id, Target: "db-prod", Protocol: "ssh", Login: "root",
		TunnelAddress: "100.64.0.2", GatewayPublicKey: fb.gwKey.String(), GatewayEndpoint: "127.0.0.1:51820",
		Destination: "100.80.0.1:22", SSHCertificate: sshca.AuthorizedKey(cert),
		HostCAKeys: []string{sshca.AuthorizedKey(fb.hostCA.PublicKey())}, HostKeyAlias: "db-prod",
		ExpiresAt: expires,
	})
}

func (fb *fakeBroker) activation(id string) wire.ActivateRequest {
	fb.mu.Lock()
	defer fb.mu.Unlock()
	return fb.activations[id]
}

// fakeCollector reports a fixed posture.
type fakeCollector struct{}

func (fakeCollector) Collect(context.Context) (posture.Report, error) {
	return posture.Report{Hostname: "ws", OS: "Debian 12", Kernel: "6.1.0", ScreenLock: posture.ScreenLockUnknown, AgentVersion: "test", CollectedAt: time.Now().UTC()}, nil
}

// fakeTunnel stands in for a WireGuard tunnel: it records its config and
// listens on a real loopback port. DialContext behaves like the gateway: the
// destination given to Listen connects, hangPort hangs until ctx ends and
// every other port is refused with ECONNREFUSED, as a kernel dial would be.
type fakeTunnel struct {
	cfg    tunnel.Config
	mu     sync.Mutex
	lns    []net.Listener
	dst    netip.AddrPort   // guarded by mu; the destination given to Listen
	dials  []netip.AddrPort // guarded by mu
	closed chan struct{}
	once   sync.Once
}

// hangPort is the port a fakeTunnel dial never gets an answer from.
const hangPort = 9

func (f *fakeTunnel) Listen(local string, dst netip.AddrPort) (net.Addr, error) {
	ln, err := net.Listen("tcp", local)
	if err != nil {
		return nil, err
	}
	f.mu.Lock()
	f.lns = append(f.lns, ln)
	f.dst = dst
	f.mu.Unlock()
	return ln.Addr(), nil
}

func (f *fakeTunnel) DialContext(ctx context.Context, dst netip.AddrPort) (net.Conn, error) {
	select {
	case <-f.closed:
		return nil, tunnel.ErrClosed
	default:
	}
	f.mu.Lock()
	f.dials = append(f.dials, dst)
	granted := f.dst
	f.mu.Unlock()
	switch {
	case dst == granted:
		c, far := net.Pipe()
		far.Close()
		return c, nil
	case dst.Port() == hangPort:
		<-ctx.Done()
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: ctx.Err()}
	default:
		return nil, &net.OpError{Op: "dial", Net: "tcp", Addr: net.TCPAddrFromAddrPort(dst), Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	}
}

// dialed returns the destinations dialed so far.
func (f *fakeTunnel) dialed() []netip.AddrPort {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]netip.AddrPort(nil), f.dials...)
}

func (f *fakeTunnel) Drain(ctx context.Context) bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, ln := range f.lns {
		ln.Close()
	}
	return true
}

func (f *fakeTunnel) Close() error {
	f.once.Do(func() {
		f.mu.Lock()
		for _, ln := range f.lns {
			ln.Close()
		}
		f.mu.Unlock()
		close(f.closed)
	})
	return nil
}

// tunnels collects every fake tunnel an agent makes.
type tunnels struct {
	made chan *fakeTunnel
}

func newTunnels() *tunnels { return &tunnels{made: make(chan *fakeTunnel, 16)} }

func (ts *tunnels) New(cfg tunnel.Config) (Tunnel, error) {
	f := &fakeTunnel{cfg: cfg, closed: make(chan struct{})}
	ts.made <- f
	return f, nil
}

// syncWriter is an io.Writer safe for concurrent use that signals when the
// confirmation link has been printed.
type syncWriter struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	linkOut chan struct{}
	once    sync.Once
}

func newSyncWriter() *syncWriter { return &syncWriter{linkOut: make(chan struct{})} }

func (s *syncWriter) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n, err := s.buf.Write(p)
	if bytes.Contains(s.buf.Bytes(), []byte(fakeConfirmURL)) {
		s.once.Do(func() { close(s.linkOut) })
	}
	return n, err
}

func (s *syncWriter) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.buf.String()
}

// shortTempDir returns a directory with a path short enough for a unix socket.
func shortTempDir(t *testing.T) string {
	t.Helper()
	d, err := os.MkdirTemp("", "pha")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// eventually polls cond until it holds or a bounded deadline passes.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func discardLogger() *slog.Logger { return slog.New(slog.DiscardHandler) }
