package agent

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// enroll runs Enroll against fb, confirming the device once the link is out.
func enroll(t *testing.T, fb *fakeBroker, dir string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	out := newSyncWriter()
	errc := make(chan error, 1)
	go func() {
		errc <- Enroll(ctx, Config{StateDir: dir, Collector: fakeCollector{}}, fb.srv.URL, fb.caFile, "alice", out)
	}()
	select {
	case <-out.linkOut:
		fb.confirm()
	case err := <-errc:
		t.Fatalf("Enroll returned before printing the link: %v", err)
	}
	if err := <-errc; err != nil {
		t.Fatalf("Enroll: %v", err)
	}
	return out.String()
}

func TestEnroll(t *testing.T) {
	t.Parallel()
	fb := newFakeBroker(t)
	dir := filepath.Join(shortTempDir(t), "state")
	out := enroll(t, fb, dir)

	want := "Open this link and confirm with your security key:\n  " + fakeConfirmURL + "\n" +
		"enrolled: this workstation (dev-1) is bound to alice; posture report accepted\n"
	if out != want {
		t.Errorf("output:\n%s\nwant:\n%s", out, want)
	}
	if n := fb.reportCount(); n != 1 {
		t.Errorf("posture reports = %d, want 1", n)
	}
	enr, err := loadEnrollment(dir)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(enr, enrollment{BrokerURL: fb.srv.URL, DeviceID: fakeDeviceID, User: "alice"}); diff != "" {
		t.Errorf("agent.json (-got +want):\n%s", diff)
	}
	for name, mode := range map[string]os.FileMode{deviceKeyFile: 0o600, stateFile: 0o600, brokerCAFile: 0o644, ".": 0o700} {
		fi, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != mode {
			t.Errorf("%s mode = %v, want %v", name, fi.Mode().Perm(), mode)
		}
	}
}

func TestEnrollErrors(t *testing.T) {
	t.Parallel()
	fb := newFakeBroker(t)
	notPEM := filepath.Join(t.TempDir(), "x.pem")
	os.WriteFile(notPEM, []byte("nope"), 0o644)
	tests := []struct {
		name    string
		url     string
		ca      string
		user    string
		wantErr string
	}{
		{"deny/http-url", "http://broker:8443", fb.caFile, "alice", "want https://"},
		{"deny/no-user", fb.srv.URL, fb.caFile, "", "invalid user name"},
		{"deny/user-with-space", fb.srv.URL, fb.caFile, "al ice", "invalid user name"},
		{"deny/missing-ca", fb.srv.URL, filepath.Join(t.TempDir(), "missing.pem"), "alice", "reading broker CA"},
		{"deny/ca-not-pem", fb.srv.URL, notPEM, "alice", "holds no PEM certificate"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := Enroll(t.Context(), Config{StateDir: t.TempDir(), Collector: fakeCollector{}}, tt.url, tt.ca, tt.user, &strings.Builder{})
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Enroll = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

func TestEnrollLinkExpires(t *testing.T) {
	t.Parallel()
	fb := newFakeBroker(t)
	fb.enrollTTL = 200 * time.Millisecond
	err := Enroll(t.Context(), Config{StateDir: t.TempDir(), Collector: fakeCollector{}}, fb.srv.URL, fb.caFile, "alice", &strings.Builder{})
	if err == nil || !strings.Contains(err.Error(), "confirmation link expired") {
		t.Fatalf("Enroll = %v, want the link to expire", err)
	}
}

// runAgent starts an enrolled agent and stops it when the test ends.
func runAgent(t *testing.T, dir string, ts *tunnels) (*client.Client, context.CancelFunc, chan error) {
	t.Helper()
	a, err := New(Config{StateDir: dir, Collector: fakeCollector{}, NewTunnel: ts.New, PostureEvery: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
	})
	c := client.ForAgent(SocketPath(dir))
	eventually(t, "the local API", func() bool {
		_, err := c.LocalStatus(t.Context())
		return err == nil
	})
	return c, cancel, done
}

func TestRunGrantLifecycle(t *testing.T) {
	t.Parallel()
	fb := newFakeBroker(t)
	dir := filepath.Join(shortTempDir(t), "state")
	enroll(t, fb, dir)
	ts := newTunnels()
	c, cancel, done := runAgent(t, dir, ts)
	ctx := t.Context()

	st, err := c.LocalStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(st, wire.LocalStatus{Device: fakeDeviceID, User: "alice", Broker: fb.srv.URL, Tunnels: []wire.Tunnel{}}); diff != "" {
		t.Errorf("status (-got +want):\n%s", diff)
	}
	eventually(t, "the startup posture report", func() bool { return fb.reportCount() >= 2 })

	// A grant brings a tunnel up with fresh keys and files.
	expires := time.Now().Add(time.Hour).Truncate(time.Second).UTC()
	fb.grant("r1", expires)
	tun, err := c.LocalWait(ctx, "r1", 30*time.Second)
	if err != nil {
		t.Fatalf("LocalWait: %v", err)
	}
	ft := <-ts.made
	gdir := filepath.Join(dir, grantsDir, "r1")
	wantTun := wire.Tunnel{
		Request: "r1", Target: "db-prod", Protocol: "ssh", Login: "root", Local: tun.Local, ExpiresAt: expires,
		KeyFile: filepath.Join(gdir, grantKeyFile), CertFile: filepath.Join(gdir, grantCertFile),
		KnownHostsFile: filepath.Join(gdir, knownHostsFile), HostKeyAlias: "db-prod",
	}
	if diff := cmp.Diff(tun, wantTun); diff != "" {
		t.Errorf("tunnel (-got +want):\n%s", diff)
	}
	if _, err := netip.ParseAddrPort(tun.Local); err != nil || !strings.HasPrefix(tun.Local, "127.0.0.1:") {
		t.Errorf("local = %q, want 127.0.0.1:PORT", tun.Local)
	}
	if conn, err := net.Dial("tcp", tun.Local); err != nil {
		t.Errorf("dialing the local port: %v", err)
	} else {
		conn.Close()
	}
	checkTunnelConfig(t, fb, ft)
	checkGrantFiles(t, fb, wantTun)

	st, _ = c.LocalStatus(ctx)
	if diff := cmp.Diff(st.Tunnels, []wire.Tunnel{wantTun}); diff != "" {
		t.Errorf("status tunnels (-got +want):\n%s", diff)
	}

	// Revoking ends the tunnel and deletes the key files.
	fb.end("r1", "revoked by bob")
	<-ft.closed
	eventually(t, "grant files removed", func() bool {
		_, err := os.Stat(gdir)
		return errors.Is(err, os.ErrNotExist)
	})
	_, err = c.LocalWait(ctx, "r1", 30*time.Second)
	wantRefused(t, err, "grant r1 ended: revoked by bob")
	if st, _ := c.LocalStatus(ctx); len(st.Tunnels) != 0 {
		t.Errorf("tunnels after revoke = %v", st.Tunnels)
	}

	// A request closed before a grant is refused with the broker's reason.
	fb.setState("r2", "pending", "")
	waitErr := make(chan error, 1)
	go func() {
		_, err := c.LocalWait(ctx, "r2", 30*time.Second)
		waitErr <- err
	}()
	fb.publish(wire.EventRequestClosed, "r2", "denied by bob")
	wantRefused(t, <-waitErr, "request r2 closed: denied by bob")

	// A request the broker already decided is refused at once.
	fb.setState("r3", "expired", "no approval in time")
	_, err = c.LocalWait(ctx, "r3", 30*time.Second)
	wantRefused(t, err, "request r3 expired: no approval in time")

	// An unknown request is the broker's 404.
	_, err = c.LocalWait(ctx, "nope", 30*time.Second)
	var ae *client.APIError
	if !errors.As(err, &ae) || ae.Status != 404 {
		t.Errorf("LocalWait(unknown) = %v, want a 404", err)
	}

	// The local timer ends a grant at ExpiresAt even without an event.
	fb.grant("r4", time.Now().Add(300*time.Millisecond))
	if _, err := c.LocalWait(ctx, "r4", 30*time.Second); err != nil {
		t.Fatalf("LocalWait(r4): %v", err)
	}
	ft4 := <-ts.made
	<-ft4.closed
	_, err = c.LocalWait(ctx, "r4", 30*time.Second)
	wantRefused(t, err, "request r4 expired: the grant expired")

	// A grant whose activation the broker refuses fails with its reason.
	fb.setState("r9", "pending", "")
	fb.publish(wire.EventGrantIssued, "r9", "")
	_, err = c.LocalWait(ctx, "r9", 30*time.Second)
	wantRefused(t, err, "request r9 failed: the broker refused activation: grant r9 is not active")

	// Stopping the agent tears live tunnels down and removes their files.
	fb.grant("r5", time.Now().Add(time.Hour))
	if _, err := c.LocalWait(ctx, "r5", 30*time.Second); err != nil {
		t.Fatalf("LocalWait(r5): %v", err)
	}
	ft5 := <-ts.made
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v, want nil", err)
	}
	done <- nil // for the cleanup
	select {
	case <-ft5.closed:
	default:
		t.Error("tunnel still open after Run returned")
	}
	if _, err := os.Stat(filepath.Join(dir, grantsDir, "r5")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("grant files left after Run returned: %v", err)
	}
	if _, err := os.Stat(SocketPath(dir)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("socket left after Run returned: %v", err)
	}
}

func wantRefused(t *testing.T, err error, msg string) {
	t.Helper()
	var ae *client.APIError
	if !errors.As(err, &ae) || ae.Code != "refused" || ae.Message != msg {
		t.Errorf("error = %#v, want refused %q", err, msg)
	}
}

// checkTunnelConfig compares the tunnel config with what the agent sent the
// broker and what the broker answered.
func checkTunnelConfig(t *testing.T, fb *fakeBroker, ft *fakeTunnel) {
	t.Helper()
	act := fb.activation("r1")
	if got := ft.cfg.PrivateKey.Public().String(); got != act.WireGuardPublicKey {
		t.Errorf("tunnel key %s, activated with %s", got, act.WireGuardPublicKey)
	}
	want := struct {
		Address   netip.Addr
		Peer      wgkey.Public
		Endpoint  netip.AddrPort
		AllowedIP netip.Prefix
	}{netip.MustParseAddr("100.64.0.2"), fb.gwKey, netip.MustParseAddrPort("127.0.0.1:51820"), netip.MustParsePrefix("100.80.0.1/32")}
	got := want
	got.Address, got.Peer, got.Endpoint, got.AllowedIP = ft.cfg.Address, ft.cfg.Peer, ft.cfg.Endpoint, ft.cfg.AllowedIP
	if got != want {
		t.Errorf("tunnel config = %+v, want %+v", got, want)
	}
}

// checkGrantFiles checks the grant's key, certificate and known_hosts.
func checkGrantFiles(t *testing.T, fb *fakeBroker, tun wire.Tunnel) {
	t.Helper()
	for _, p := range []string{tun.KeyFile, tun.CertFile, tun.KnownHostsFile} {
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s mode = %v, want 0600", p, fi.Mode().Perm())
		}
	}
	keyPEM, _ := os.ReadFile(tun.KeyFile)
	signer, err := ssh.ParsePrivateKey(keyPEM)
	if err != nil {
		t.Fatalf("key file: %v", err)
	}
	if got, want := sshca.AuthorizedKey(signer.PublicKey()), fb.activation("r1").SSHPublicKey; got != want {
		t.Errorf("key file holds %s, activated with %s", got, want)
	}
	certLine, _ := os.ReadFile(tun.CertFile)
	pub, _, _, _, err := ssh.ParseAuthorizedKey(certLine)
	if err != nil {
		t.Fatalf("cert file: %v", err)
	}
	if cert, ok := pub.(*ssh.Certificate); !ok || cert.KeyId != "grant r1" {
		t.Errorf("cert file holds %T %v", pub, pub)
	}
	kh, _ := os.ReadFile(tun.KnownHostsFile)
	if got, want := string(kh), "@cert-authority db-prod "+sshca.AuthorizedKey(fb.hostCA.PublicKey())+"\n"; got != want {
		t.Errorf("known_hosts = %q, want %q", got, want)
	}
}

func TestRunBrokerDown(t *testing.T) {
	t.Parallel()
	fb := newFakeBroker(t)
	dir := filepath.Join(shortTempDir(t), "state")
	enroll(t, fb, dir)
	fb.srv.Close()
	// Leftover grant files from a crash are removed at start.
	stale := filepath.Join(dir, grantsDir, "old")
	os.MkdirAll(stale, 0o700)
	os.WriteFile(filepath.Join(stale, grantKeyFile), []byte("secret"), 0o600)

	c, cancel, done := runAgent(t, dir, newTunnels())
	if _, err := os.Stat(stale); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale grant files kept: %v", err)
	}
	st, err := c.LocalStatus(t.Context())
	if err != nil || st.Device != fakeDeviceID {
		t.Errorf("status = %+v, %v", st, err)
	}
	_, err = c.LocalWait(t.Context(), "r1", 100*time.Millisecond)
	var ae *client.APIError
	if !errors.As(err, &ae) || ae.Code != "timeout" {
		t.Errorf("LocalWait with the broker down = %v, want a timeout", err)
	}
	_, err = c.Device(t.Context())
	if !errors.As(err, &ae) || ae.Code != "broker_unreachable" {
		t.Errorf("forwarded call with the broker down = %v, want broker_unreachable", err)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("Run = %v", err)
	}
	done <- nil
}

func TestNewErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	if _, err := New(Config{}); err == nil {
		t.Error("New without a state directory succeeded")
	}
	if _, err := New(Config{StateDir: dir}); err == nil || !strings.Contains(err.Error(), "not enrolled") {
		t.Errorf("New on an empty state directory = %v", err)
	}
	os.WriteFile(filepath.Join(dir, stateFile), []byte(`{"broker_url":"http://b","device_id":"d","user":"u"}`), 0o600)
	if _, err := New(Config{StateDir: dir}); err == nil || !strings.Contains(err.Error(), "https") {
		t.Errorf("New with an http broker = %v", err)
	}
	os.WriteFile(filepath.Join(dir, stateFile), []byte(`{"broker_url":"https://b","device_id":"d","user":"u","extra":1}`), 0o600)
	if _, err := New(Config{StateDir: dir}); err == nil {
		t.Error("New with an unknown agent.json field succeeded")
	}
}
