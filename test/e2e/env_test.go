// Package e2e runs pinhole end to end in one test process against real
// parts: the broker (SQLite, TLS, WebAuthn pages, wireguard-go gateway,
// recording SSH proxy), real agents with userspace WireGuard, a real OpenSSH
// sshd as the target and the real ssh client. Security keys are software
// authenticators.
package e2e

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"sync"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/agent"
	"github.com/pinhole-dev/pinhole/broker"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/posture"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
	"github.com/pinhole-dev/pinhole/test/harness"
)

// requireTool skips when a real tool is missing, except under CI, which
// installs every tool the tests use.
func requireTool(t *testing.T, path string) {
	t.Helper()
	if _, err := exec.LookPath(path); err == nil {
		return
	}
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is not installed; .ci/run must install it", path)
	}
	t.Skipf("%s is not installed", path)
}

type env struct {
	t      *testing.T
	ctx    context.Context
	cfg    broker.Config
	stop   func() // stops the running broker and waits for it
	dir    string
	b      *broker.Broker
	url    string
	caFile string
	hook   *harness.Webhook
	sshd   *harness.SSHD
	echo   string // address of the raw TCP target
	login  string
	people map[string]*harness.Person
}

const testConfig = `targets:
  - name: db-prod
    address: %[1]s
    protocol: ssh
    login: %[2]s
    host_key: %[3]q
  - name: db-tcp
    address: %[4]s
    protocol: tcp
  - name: db-short
    address: %[4]s
    protocol: tcp
  - name: db-strict
    address: %[4]s
    protocol: tcp
roles: [dba, approver, sre]
rules:
  - name: strict-posture
    roles: [dba]
    targets: [db-strict]
    max_ttl: 1h
    approvals: 1
    approver_roles: [approver]
    posture: {max_age: 1m, disk_encryption: true, firewall: true}
  - name: short-links
    roles: [dba]
    targets: [db-short]
    max_ttl: 1h
    approvals: 1
    approver_roles: [approver]
    pending_for: 2s
  - name: dba-prod
    roles: [dba]
    targets: [db-prod, db-tcp]
    max_ttl: 1h
    approvals: 1
    approver_roles: [approver]
    pending_for: 10m
    posture: {max_age: 10m}
  - name: peer-review
    roles: [sre]
    targets: [db-prod]
    max_ttl: 1h
    approvals: 1
    approver_roles: [sre]
`

// newEnv starts a target sshd, a TCP echo target, a webhook and a broker.
func newEnv(t *testing.T) *env {
	t.Helper()
	requireTool(t, harness.SSHDPath)
	ctx, cancel := context.WithCancel(context.Background())
	e := &env{t: t, ctx: ctx, dir: t.TempDir(), people: map[string]*harness.Person{}}
	me, err := user.Current()
	if err != nil {
		t.Fatal(err)
	}
	e.login = me.Username
	if e.sshd, err = harness.NewSSHD(filepath.Join(e.dir, "target")); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.sshd.Close() })
	e.echo = startEcho(t)
	if e.hook, err = harness.StartWebhook(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.hook.Close() })
	cfg := filepath.Join(e.dir, "pinhole.yaml")
	if err := os.WriteFile(cfg, []byte(fmt.Sprintf(testConfig, e.sshd.Addr, e.login, e.sshd.HostKey, e.echo)), 0o600); err != nil {
		t.Fatal(err)
	}
	e.cfg = broker.Config{DataDir: filepath.Join(e.dir, "broker"), ConfigFile: cfg, Listen: "127.0.0.1:0",
		WireGuardPort: 0, NotifyWebhook: e.hook.URL, Logger: testLogger(t), AuditWitness: filepath.Join(e.dir, "witness.jsonl")}
	t.Cleanup(cancel)
	e.startBroker()
	t.Cleanup(func() { e.stop() })
	if err := e.sshd.Start(e.b.UserCAKey()); err != nil {
		t.Fatal(err)
	}
	return e
}

// testLogger discards operational logs unless PINHOLE_TEST_LOG is set.
func testLogger(t *testing.T) *slog.Logger {
	if os.Getenv("PINHOLE_TEST_LOG") == "" {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug})).With("test", t.Name())
}

// startBroker starts a broker on the env's data dir (again, after stop).
func (e *env) startBroker() {
	e.t.Helper()
	ctx, cancel := context.WithCancel(e.ctx)
	b, err := broker.New(ctx, e.cfg)
	if err != nil {
		cancel()
		e.t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- b.Run(ctx) }()
	var once sync.Once
	e.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("broker run: %v", err)
			}
		})
	}
	e.b, e.url, e.caFile = b, b.URL, b.CAFile
	for _, p := range e.people {
		p.SetBroker(e.url)
	}
}

// invite creates a user and registers their security key.
func (e *env) invite(name, role string) *harness.Person {
	e.t.Helper()
	inv, err := e.b.Service().InviteUser(e.ctx, store.User{Name: "root", Role: "admin"}, name, role)
	if err != nil {
		e.t.Fatalf("inviting %s: %v", name, err)
	}
	p, err := harness.NewPerson(name, e.url, e.caFile)
	if err != nil {
		e.t.Fatal(err)
	}
	if err := p.Register(e.ctx, inv.URL); err != nil {
		e.t.Fatalf("%s registering: %v", name, err)
	}
	e.people[name] = p
	return p
}

// enroll enrolls a workstation for p (device confirmed, posture sent) and
// returns its state dir.
func (e *env) enroll(p *harness.Person) string {
	e.t.Helper()
	return e.enrollWith(p.Name, func(link string) {
		if _, err := p.ConfirmDevice(e.ctx, link); err != nil {
			e.t.Fatalf("confirming device: %v", err)
		}
	})
}

// enrollWith enrolls a workstation for user, whose confirmation link
// confirm handles, and returns its state dir.
func (e *env) enrollWith(user string, confirm func(link string)) string {
	e.t.Helper()
	state := filepath.Join(e.dir, user+"-ws")
	var out syncBuffer
	done := make(chan error, 1)
	go func() {
		done <- agent.Enroll(e.ctx, agent.Config{StateDir: state, Collector: fixedPosture{}}, e.url, e.caFile, user, &out)
	}()
	re := regexp.MustCompile(`https://\S+/enroll/\S+`)
	var link string
	waitUntil(e.t, 10*time.Second, "confirmation link", func() bool { link = re.FindString(out.String()); return link != "" })
	confirm(link)
	select {
	case err := <-done:
		if err != nil {
			e.t.Fatalf("enroll: %v\n%s", err, out.String())
		}
	case <-time.After(20 * time.Second):
		e.t.Fatal("enroll did not finish")
	}
	return state
}

// runAgent runs the agent of an enrolled state dir and returns its local API.
func (e *env) runAgent(state string) *client.Client {
	e.t.Helper()
	c, _ := e.startAgent(state)
	return c
}

// startAgent runs the agent of state and returns its local API and a func
// that stops it and waits.
func (e *env) startAgent(state string) (*client.Client, func()) {
	e.t.Helper()
	a, err := agent.New(agent.Config{StateDir: state, Collector: fixedPosture{}, Logger: testLogger(e.t)})
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				e.t.Error("agent did not stop")
			}
		})
	}
	e.t.Cleanup(stop)
	c := client.ForAgent(filepath.Join(state, "agent.sock"))
	waitUntil(e.t, 10*time.Second, "agent socket", func() bool { _, err := c.LocalStatus(e.ctx); return err == nil })
	return c, stop
}

// deviceClient talks to the broker as the device of state.
func (e *env) deviceClient(state string) *client.Client {
	e.t.Helper()
	key, err := devicekey.LoadOrCreate(filepath.Join(state, "device.key"))
	if err != nil {
		e.t.Fatal(err)
	}
	hc, err := client.DeviceHTTPClient(e.caFile, key)
	if err != nil {
		e.t.Fatal(err)
	}
	return client.New(e.url, hc)
}

// approve waits for approver's grant link for request and approves it.
func (e *env) approve(request string, approver *harness.Person) {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	n, err := e.hook.Wait(ctx, request, approver.Name)
	if err != nil {
		e.t.Fatal(err)
	}
	if _, err := approver.Decide(e.ctx, n.URL, true); err != nil {
		e.t.Fatalf("approving %s: %v", request, err)
	}
}

// auditTypes returns the audit events (read as admin through the service).
func (e *env) auditEvents() []audit.Event {
	e.t.Helper()
	evs, err := e.b.Service().AuditEvents(e.ctx, store.User{Name: "root", Role: "admin"}, 0, 1000)
	if err != nil {
		e.t.Fatal(err)
	}
	return evs
}

func waitUntil(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// fixedPosture is a healthy workstation (the real collector is tested in
// agent/posture; CI machines have no disk encryption to report).
type fixedPosture struct{}

func (fixedPosture) Collect(context.Context) (posture.Report, error) {
	return posture.Report{Hostname: "ws-test", OS: "Debian GNU/Linux 12", Kernel: "6.1.0", DiskEncrypted: true, FirewallActive: true,
		ScreenLock: posture.ScreenLockOn, AgentVersion: "test", CollectedAt: time.Now().UTC()}, nil
}

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// startEcho runs a TCP echo server (the raw TCP target).
func startEcho(t *testing.T) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	t.Cleanup(func() { ln.Close(); wg.Wait() })
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() { defer wg.Done(); io.Copy(c, c); c.Close() }()
		}
	}()
	return ln.Addr().String()
}

// sshArgs builds the system ssh command line for a tunnel.
func sshArgs(tun wire.Tunnel, command string) []string {
	_, port, _ := net.SplitHostPort(tun.Local)
	return []string{"-F", "/dev/null", "-p", port, "-i", tun.KeyFile, "-o", "CertificateFile=" + tun.CertFile, "-o", "IdentitiesOnly=yes",
		"-o", "UserKnownHostsFile=" + tun.KnownHostsFile, "-o", "GlobalKnownHostsFile=/dev/null", "-o", "HostKeyAlias=" + tun.HostKeyAlias,
		"-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-l", tun.Login, "127.0.0.1", command}
}
