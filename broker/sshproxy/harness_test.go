package sshproxy_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/broker/sshproxy"
	"github.com/pinhole-dev/pinhole/internal/recording"
	"github.com/pinhole-dev/pinhole/internal/sshca"
)

const sshdPath = "/usr/sbin/sshd"

// requireSSHD skips the test when OpenSSH's sshd is not installed, unless
// the CI environment variable is set.
func requireSSHD(t *testing.T) {
	t.Helper()
	if _, err := os.Stat(sshdPath); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("sshd is required in CI: %v", err)
		}
		t.Skipf("%s not installed", sshdPath)
	}
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil {
		t.Fatalf("creating sshd privilege separation dir: %v", err)
	}
}

// lockedBuffer is a bytes.Buffer safe for concurrent use.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// event is one Config.Event call.
type event struct {
	typ     string
	info    sshproxy.SessionInfo
	details map[string]string
}

// eventLog collects events and lets tests wait for them.
type eventLog struct {
	mu     sync.Mutex
	events []event
	notify chan struct{}
}

func newEventLog() *eventLog { return &eventLog{notify: make(chan struct{}, 1)} }

func (l *eventLog) add(_ context.Context, typ string, s sshproxy.SessionInfo, details map[string]string) {
	l.mu.Lock()
	l.events = append(l.events, event{typ: typ, info: s, details: details})
	l.mu.Unlock()
	select {
	case l.notify <- struct{}{}:
	default:
	}
}

func (l *eventLog) find(typ string) (event, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, e := range l.events {
		if e.typ == typ {
			return e, true
		}
	}
	return event{}, false
}

// wait waits (bounded) for an event of type typ.
func (l *eventLog) wait(t *testing.T, typ string) event {
	t.Helper()
	deadline := time.NewTimer(10 * time.Second)
	defer deadline.Stop()
	for {
		if e, ok := l.find(typ); ok {
			return e
		}
		select {
		case <-l.notify:
		case <-deadline.C:
			l.mu.Lock()
			defer l.mu.Unlock()
			t.Fatalf("no %s event; got %+v", typ, l.events)
		}
	}
}

// recordings keeps the recordings the proxy opens, in memory.
type recordings struct {
	mu    sync.Mutex
	bufs  map[string]*lockedBuffer
	infos []sshproxy.SessionInfo
}

func (r *recordings) open(_ context.Context, s sshproxy.SessionInfo) (sshproxy.Recording, error) {
	buf := &lockedBuffer{}
	r.mu.Lock()
	r.bufs[s.ID] = buf
	r.infos = append(r.infos, s)
	r.mu.Unlock()
	return recording.NewCastWriter(buf, recording.CastHeader{
		Width: s.Width, Height: s.Height, Command: s.Command, Env: map[string]string{"TERM": s.Term},
		Grant: s.GrantID, User: s.Requester, Target: s.Target, Session: s.ID,
	}, nil, 1<<20)
}

func (r *recordings) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.infos)
}

// only returns the one recording made so far.
func (r *recordings) only(t *testing.T) (sshproxy.SessionInfo, *lockedBuffer) {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.infos) != 1 {
		t.Fatalf("%d recordings, want 1", len(r.infos))
	}
	return r.infos[0], r.bufs[r.infos[0].ID]
}

// env is one proxy in front of one real sshd (started per connection in
// inetd mode), with its CAs, keys and a loopback listener for users.
type env struct {
	t          *testing.T
	dir        string
	userCA     ssh.Signer
	hostCA     ssh.Signer
	sshdHost   ssh.Signer
	proxy      *sshproxy.Proxy
	events     *eventLog
	recs       *recordings
	target     sshproxy.Target
	addr       string
	dials      atomic.Int32
	sshdStderr lockedBuffer

	mu    sync.Mutex
	procs []*exec.Cmd
}

// envOptions change the proxy's configuration for one test.
type envOptions struct {
	checkGrant    func(ctx context.Context, grantID string) error
	openRecording func(ctx context.Context, s sshproxy.SessionInfo) (sshproxy.Recording, error)
	target        func(*env, *sshproxy.Target)
	sftp          bool // Config.UnrecordedSFTP
}

func mustSigner(t *testing.T) (ssh.Signer, ed25519.PrivateKey) {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ssh.NewSignerFromSigner(priv)
	if err != nil {
		t.Fatal(err)
	}
	return s, priv
}

func writeFile(t *testing.T, path, content string, mode os.FileMode) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), mode); err != nil {
		t.Fatal(err)
	}
}

func writePrivateKey(t *testing.T, path string, priv ed25519.PrivateKey) {
	t.Helper()
	block, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, path, string(pem.EncodeToMemory(block)), 0o600)
}

func newEnv(t *testing.T, o envOptions) *env {
	t.Helper()
	requireSSHD(t)
	e := &env{t: t, dir: t.TempDir(), events: newEventLog(), recs: &recordings{bufs: map[string]*lockedBuffer{}}}
	e.userCA, _ = mustSigner(t)
	e.hostCA, _ = mustSigner(t)
	var hostPriv ed25519.PrivateKey
	e.sshdHost, hostPriv = mustSigner(t)

	// The real sshd: trusts the user CA for root, presents a host cert.
	now := time.Now()
	writePrivateKey(t, filepath.Join(e.dir, "host"), hostPriv)
	hostCert, err := sshca.IssueHost(nil, e.hostCA, sshca.HostCert{
		Key: e.sshdHost.PublicKey(), KeyID: "sshd db-prod", Principals: []string{"db-prod"},
		ValidAfter: now.Add(-time.Hour), ValidBefore: now.Add(time.Hour),
	})
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(e.dir, "host-cert.pub"), sshca.AuthorizedKey(hostCert)+"\n", 0o644)
	writeFile(t, filepath.Join(e.dir, "user_ca.pub"), sshca.AuthorizedKey(e.userCA.PublicKey())+"\n", 0o644)
	if err := os.Mkdir(filepath.Join(e.dir, "principals"), 0o755); err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(e.dir, "principals", "root"), "root\n", 0o644)
	writeFile(t, filepath.Join(e.dir, "sshd_config"), strings.Join([]string{
		"HostKey " + filepath.Join(e.dir, "host"),
		"HostCertificate " + filepath.Join(e.dir, "host-cert.pub"),
		"PidFile none",
		"UsePAM no",
		"StrictModes no",
		"UseDNS no",
		"PermitRootLogin prohibit-password",
		"AuthenticationMethods publickey",
		"PubkeyAuthentication yes",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"AuthorizedKeysFile none",
		"TrustedUserCAKeys " + filepath.Join(e.dir, "user_ca.pub"),
		"AuthorizedPrincipalsFile " + filepath.Join(e.dir, "principals", "%u"),
		"AcceptEnv PINHOLE_*",
		"PrintMotd no",
		"PrintLastLog no",
		"LogLevel VERBOSE",
		"Subsystem sftp internal-sftp",
		"",
	}, "\n"), 0o644)

	// The proxy.
	proxyKey, _ := mustSigner(t)
	proxyCert, err := sshca.IssueHost(nil, e.hostCA, sshca.HostCert{
		Key: proxyKey.PublicKey(), KeyID: "proxy db-prod", Principals: []string{"db-prod"},
		ValidAfter: now.Add(-time.Hour), ValidBefore: now.Add(time.Hour),
	})
	if err != nil {
		t.Fatal(err)
	}
	proxyHost, err := sshca.CertSigner(proxyCert, proxyKey)
	if err != nil {
		t.Fatal(err)
	}
	cfg := sshproxy.Config{
		UserCAs:        func() []ssh.PublicKey { return []ssh.PublicKey{e.userCA.PublicKey()} },
		CheckGrant:     func(context.Context, string) error { return nil },
		UpstreamSigner: e.upstreamSigner,
		OpenRecording:  e.recs.open,
		Event:          e.events.add,
		UnrecordedSFTP: o.sftp,
	}
	if o.checkGrant != nil {
		cfg.CheckGrant = o.checkGrant
	}
	if o.openRecording != nil {
		cfg.OpenRecording = o.openRecording
	}
	e.proxy, err = sshproxy.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.target = sshproxy.Target{
		GrantID: "g-1", Requester: "alice", Name: "db-prod", Login: "root",
		Source:          netip.MustParseAddr("127.0.0.1"),
		HostSigner:      proxyHost,
		Dial:            e.dialSSHD,
		UpstreamHostKey: sshca.AuthorizedKey(e.sshdHost.PublicKey()),
		Ends:            now.Add(time.Hour),
	}
	if o.target != nil {
		o.target(e, &e.target)
	}
	e.serve()
	t.Cleanup(e.killSSHDs)
	return e
}

// upstreamSigner mints a short-lived certificate from the user CA, like the
// broker does per upstream connection.
func (e *env) upstreamSigner(context.Context, sshproxy.Target) (ssh.Signer, error) {
	key, err := sshca.NewKey(nil)
	if err != nil {
		return nil, err
	}
	now := time.Now()
	cert, err := sshca.IssueUser(nil, e.userCA, sshca.UserCert{
		Key: key.PublicKey(), KeyID: "pinhole proxy for g-1", Principals: []string{"root"},
		ValidAfter: now.Add(-time.Minute), ValidBefore: now.Add(5 * time.Minute), PermitPTY: true,
	})
	if err != nil {
		return nil, err
	}
	return sshca.CertSigner(cert, key)
}

// dialSSHD runs one sshd in inetd mode on one end of a socket pair.
func (e *env) dialSSHD(ctx context.Context) (net.Conn, error) {
	e.dials.Add(1)
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("socketpair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "proxy-side"), os.NewFile(uintptr(fds[1]), "sshd-side")
	defer ours.Close()
	defer theirs.Close()
	cmd := exec.Command(sshdPath, "-i", "-e", "-f", filepath.Join(e.dir, "sshd_config"))
	cmd.Stdin, cmd.Stdout, cmd.Stderr = theirs, theirs, &e.sshdStderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	cmd.WaitDelay = 2 * time.Second
	e.mu.Lock()
	if err := cmd.Start(); err != nil {
		e.mu.Unlock()
		return nil, fmt.Errorf("starting sshd: %w", err)
	}
	e.procs = append(e.procs, cmd)
	e.mu.Unlock()
	return net.FileConn(ours)
}

func (e *env) killSSHDs() {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, cmd := range e.procs {
		// The whole group: sshd's privilege-separated children and the
		// user's commands too.
		_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
		_ = cmd.Wait()
	}
	if e.t.Failed() {
		e.t.Logf("sshd stderr:\n%s", e.sshdStderr.String())
	}
}

// serve accepts user connections on a loopback listener and hands them to
// the proxy until the test ends; cleanup checks every HandleConn returned.
func (e *env) serve() {
	t := e.t
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = ln.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { e.proxy.HandleConn(ctx, c, e.target) })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		cancel()
		done := make(chan struct{})
		go func() {
			wg.Wait()
			close(done)
		}()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Error("HandleConn did not return after the test")
		}
	})
}

// userCert describes the certificate a test user presents.
type userCert struct {
	ca         ssh.Signer // nil: the env's user CA
	principals []string   // nil: root
	sources    []string   // nil: 127.0.0.1/32; empty non-nil: none
	after      time.Duration
	before     time.Duration
	noPTY      bool
}

func (e *env) userSigner(c userCert) (ssh.Signer, ed25519.PrivateKey) {
	t := e.t
	t.Helper()
	key, priv := mustSigner(t)
	ca := c.ca
	if ca == nil {
		ca = e.userCA
	}
	principals := c.principals
	if principals == nil {
		principals = []string{"root"}
	}
	var prefixes []netip.Prefix
	if c.sources == nil {
		prefixes = []netip.Prefix{netip.MustParsePrefix("127.0.0.1/32")}
	}
	for _, s := range c.sources {
		prefixes = append(prefixes, netip.MustParsePrefix(s))
	}
	if c.after == 0 {
		c.after = -time.Minute
	}
	if c.before == 0 {
		c.before = time.Hour
	}
	now := time.Now()
	cert, err := sshca.IssueUser(nil, ca, sshca.UserCert{
		Key: key.PublicKey(), KeyID: "grant=g-1 user=alice", Serial: 1, Principals: principals,
		SourceAddresses: prefixes, ValidAfter: now.Add(c.after), ValidBefore: now.Add(c.before), PermitPTY: !c.noPTY,
	})
	if err != nil {
		t.Fatal(err)
	}
	s, err := sshca.CertSigner(cert, key)
	if err != nil {
		t.Fatal(err)
	}
	return s, priv
}

// connect logs in to the proxy as user with signer.
func (e *env) connect(signer ssh.Signer, user string) (*ssh.Client, error) {
	hostCA := e.hostCA.PublicKey().Marshal()
	checker := &ssh.CertChecker{IsHostAuthority: func(auth ssh.PublicKey, _ string) bool {
		return bytes.Equal(auth.Marshal(), hostCA)
	}}
	nc, err := net.DialTimeout("tcp", e.addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	cc, chans, reqs, err := ssh.NewClientConn(nc, "db-prod:22", &ssh.ClientConfig{
		User: user, Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)}, HostKeyCallback: checker.CheckHostKey,
	})
	if err != nil {
		nc.Close()
		return nil, err
	}
	return ssh.NewClient(cc, chans, reqs), nil
}

// mustConnect logs in with a default valid certificate.
func (e *env) mustConnect() *ssh.Client {
	e.t.Helper()
	s, _ := e.userSigner(userCert{})
	c, err := e.connect(s, "root")
	if err != nil {
		e.t.Fatalf("connecting to the proxy: %v", err)
	}
	e.t.Cleanup(func() { c.Close() })
	return c
}

// runResult is what a session produced.
type runResult struct {
	stdout, stderr string
	exit           int // -1: no exit status
	signal         string
	err            error
}

func run(c *ssh.Client, cmd string, setup func(*ssh.Session)) runResult {
	s, err := c.NewSession()
	if err != nil {
		return runResult{err: err, exit: -1}
	}
	defer s.Close()
	var out, errOut lockedBuffer
	s.Stdout, s.Stderr = &out, &errOut
	if setup != nil {
		setup(s)
	}
	err = s.Run(cmd)
	r := runResult{stdout: out.String(), stderr: errOut.String(), exit: 0}
	var ee *ssh.ExitError
	var missing *ssh.ExitMissingError
	switch {
	case errors.As(err, &ee):
		r.exit, r.signal = ee.ExitStatus(), ee.Signal()
	case errors.As(err, &missing):
		r.exit = -1
	case err != nil:
		r.exit, r.err = -1, err
	}
	return r
}

// castEvents parses a recording.
func castEvents(t *testing.T, buf *lockedBuffer) (recording.CastHeader, []recording.CastEvent) {
	t.Helper()
	h, events, err := recording.ReadCast(strings.NewReader(buf.String()), 1<<20)
	if err != nil {
		t.Fatalf("recording is not valid asciicast: %v\n%s", err, buf.String())
	}
	return h, events
}

func outputOf(events []recording.CastEvent) string {
	var b strings.Builder
	for _, e := range events {
		if e.Code == "o" {
			b.WriteString(e.Data)
		}
	}
	return b.String()
}

func hasEvent(events []recording.CastEvent, code, data string) bool {
	return slices.ContainsFunc(events, func(e recording.CastEvent) bool { return e.Code == code && e.Data == data })
}
