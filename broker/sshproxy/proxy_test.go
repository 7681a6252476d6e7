package sshproxy_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/broker/sshproxy"
	"github.com/pinhole-dev/pinhole/internal/recording"
	"github.com/pinhole-dev/pinhole/internal/sshca"
)

var _ sshproxy.Recording = (*recording.CastWriter)(nil)

func TestNewRequiresCallbacks(t *testing.T) {
	t.Parallel()
	ok := sshproxy.Config{
		UserCAs:        func() []ssh.PublicKey { return nil },
		CheckGrant:     func(context.Context, string) error { return nil },
		UpstreamSigner: func(context.Context, sshproxy.Target) (ssh.Signer, error) { return nil, nil },
		OpenRecording:  func(context.Context, sshproxy.SessionInfo) (sshproxy.Recording, error) { return nil, nil },
	}
	tests := []struct {
		name string
		mod  func(*sshproxy.Config)
		ok   bool
	}{
		{name: "ok/all-set", mod: func(*sshproxy.Config) {}, ok: true},
		{name: "deny/no-user-cas", mod: func(c *sshproxy.Config) { c.UserCAs = nil }},
		{name: "deny/no-check-grant", mod: func(c *sshproxy.Config) { c.CheckGrant = nil }},
		{name: "deny/no-upstream-signer", mod: func(c *sshproxy.Config) { c.UpstreamSigner = nil }},
		{name: "deny/no-open-recording", mod: func(c *sshproxy.Config) { c.OpenRecording = nil }},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			cfg := ok
			tt.mod(&cfg)
			_, err := sshproxy.New(cfg)
			if (err == nil) != tt.ok {
				t.Fatalf("New error = %v, want ok=%v", err, tt.ok)
			}
		})
	}
}

func TestExec(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{})
	c := e.mustConnect()
	tests := []struct {
		name       string
		cmd        string
		env        map[string]string
		wantOut    string
		wantErr    string
		wantExit   int
		wantSignal string
		anyStderr  bool // the login shell may print while it is killed
	}{
		{name: "ok/exit-0", cmd: "echo hello", wantOut: "hello\n"},
		{name: "ok/exit-7-with-stderr", cmd: "echo out; echo err >&2; exit 7", wantOut: "out\n", wantErr: "err\n", wantExit: 7},
		{name: "ok/env-passed", cmd: `printf '%s\n' "$PINHOLE_TEST"`, env: map[string]string{"PINHOLE_TEST": "v1"}, wantOut: "v1\n"},
		{name: "ok/utf8", cmd: `printf '\342\202\254\n'`, wantOut: "€\n"},
		{name: "ok/exit-signal", cmd: "kill -KILL $$", wantExit: -1, wantSignal: "KILL", anyStderr: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := run(c, tt.cmd, func(s *ssh.Session) {
				for k, v := range tt.env {
					if err := s.Setenv(k, v); err != nil {
						t.Errorf("Setenv: %v", err)
					}
				}
			})
			if r.err != nil {
				t.Fatalf("run: %v", r.err)
			}
			if r.stdout != tt.wantOut || (r.stderr != tt.wantErr && !tt.anyStderr) {
				t.Errorf("stdout %q stderr %q, want %q %q", r.stdout, r.stderr, tt.wantOut, tt.wantErr)
			}
			if tt.wantSignal != "" {
				if r.signal != tt.wantSignal {
					t.Errorf("signal %q, want %q", r.signal, tt.wantSignal)
				}
			} else if r.exit != tt.wantExit {
				t.Errorf("exit status %d, want %d", r.exit, tt.wantExit)
			}
		})
	}
}

func TestExecRecordedWithEvents(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{})
	c := e.mustConnect()
	r := run(c, "echo out; echo err >&2; exit 7", nil)
	if r.exit != 7 {
		t.Fatalf("exit %d (%v), want 7", r.exit, r.err)
	}
	ended := e.events.wait(t, sshproxy.EventSessionEnded)
	if ended.details["exit_status"] != "7" {
		t.Errorf("session.ended details %v, want exit_status 7", ended.details)
	}
	started := e.events.wait(t, sshproxy.EventSessionStarted)
	info, buf := e.recs.only(t)
	if info.Kind != sshproxy.KindExec || info.Command != "echo out; echo err >&2; exit 7" || info.GrantID != "g-1" ||
		info.Requester != "alice" || info.Target != "db-prod" || info.Login != "root" || info.ID == "" {
		t.Errorf("SessionInfo %+v", info)
	}
	if started.info.ID != info.ID || ended.info.ID != info.ID {
		t.Errorf("event session ids %q %q, recording %q", started.info.ID, ended.info.ID, info.ID)
	}
	h, events := castEvents(t, buf)
	if h.Command != info.Command || h.Session != info.ID || h.Width != 80 || h.Height != 24 {
		t.Errorf("cast header %+v", h)
	}
	out := outputOf(events)
	if !strings.Contains(out, "out\n") || !strings.Contains(out, "err\n") {
		t.Errorf("recorded output %q lacks stdout or stderr", out)
	}
}

func TestPTYShellWithResize(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{})
	c := e.mustConnect()
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	stdin, err := s.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	var out lockedBuffer
	s.Stdout, s.Stderr = &out, &out
	if err := s.RequestPty("xterm-256color", 24, 80, ssh.TerminalModes{ssh.ECHO: 0}); err != nil {
		t.Fatal(err)
	}
	if err := s.Shell(); err != nil {
		t.Fatal(err)
	}
	if err := s.WindowChange(40, 120); err != nil {
		t.Fatal(err)
	}
	// The proxy records the resize right after sending it upstream; once it
	// is in the recording, sshd has it before any later input.
	_, buf := waitRecording(t, e)
	waitFor(t, "resize recorded", func() bool { return strings.Contains(buf.String(), `"r", "120x40"`) })
	if _, err := io.WriteString(stdin, "stty size; printf '\\342\\202\\254\\n'; exit 3\n"); err != nil {
		t.Fatal(err)
	}
	err = s.Wait()
	var ee *ssh.ExitError
	if !errors.As(err, &ee) || ee.ExitStatus() != 3 {
		t.Fatalf("Wait = %v, want exit status 3\noutput: %q", err, out.String())
	}
	if !strings.Contains(out.String(), "40 120") {
		t.Errorf("user output %q lacks the new size", out.String())
	}
	e.events.wait(t, sshproxy.EventSessionEnded)
	// The resize may reach the proxy before or after it opens the recording
	// (the client sends it right after the shell reply): either the header
	// already has the new size or it has the old one and an "r" event follows.
	info, _ := e.recs.only(t)
	resizedFirst := info.Width == 120 && info.Height == 40
	if info.Kind != sshproxy.KindShell || info.Term != "xterm-256color" || !(resizedFirst || info.Width == 80 && info.Height == 24) {
		t.Errorf("SessionInfo %+v", info)
	}
	h, events := castEvents(t, buf)
	if h.Width != info.Width || h.Height != info.Height {
		t.Errorf("header size %dx%d, session info %dx%d", h.Width, h.Height, info.Width, info.Height)
	}
	if !hasEvent(events, "r", "120x40") {
		t.Errorf("no resize event in %v", events)
	}
	rec := outputOf(events)
	if !strings.Contains(rec, "40 120") || !strings.Contains(rec, "€") {
		t.Errorf("recorded output %q lacks the shell's output", rec)
	}
}

// waitRecording waits for the first recording to be opened.
func waitRecording(t *testing.T, e *env) (sshproxy.SessionInfo, *lockedBuffer) {
	t.Helper()
	waitFor(t, "recording opened", func() bool { return e.recs.count() > 0 })
	return e.recs.only(t)
}

// waitFor polls cond with a bounded deadline (for state only visible in a
// buffer written by another goroutine).
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// TestSFTPRefusedByDefault checks that SFTP and scp, which are not
// recorded, are refused unless Config.UnrecordedSFTP says otherwise: the
// user is told why (exit 255), session.refused is reported, nothing is
// dialed or recorded.
func TestSFTPRefusedByDefault(t *testing.T) {
	t.Parallel()
	t.Run("scp", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, envOptions{})
		r := run(e.mustConnect(), "env scp -t /tmp/upload", nil)
		if r.exit != 255 || !strings.Contains(r.stderr, "pinhole: scp is refused") {
			t.Errorf("exit %d stderr %q, want 255 and the reason", r.exit, r.stderr)
		}
		checkRefusedTransfer(t, e)
	})
	t.Run("sftp", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, envOptions{})
		ch, reqs, err := e.mustConnect().OpenChannel("session", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer ch.Close()
		if ok, err := ch.SendRequest("subsystem", true, ssh.Marshal(&struct{ Name string }{"sftp"})); err != nil || !ok {
			t.Fatalf("sftp subsystem: ok=%v err=%v, want accepted then refused with a reason", ok, err)
		}
		status := make(chan uint32, 1)
		go func() {
			for req := range reqs {
				if req.Type == "exit-status" && len(req.Payload) == 4 {
					status <- uint32(req.Payload[3]) | uint32(req.Payload[2])<<8
				}
			}
			close(status)
		}()
		stderr, _ := io.ReadAll(ch.Stderr())
		if !strings.Contains(string(stderr), "pinhole: sftp is refused") {
			t.Errorf("stderr %q, want the reason", stderr)
		}
		if got := <-status; got != 255 {
			t.Errorf("exit status %d, want 255", got)
		}
		checkRefusedTransfer(t, e)
	})
}

func checkRefusedTransfer(t *testing.T, e *env) {
	t.Helper()
	ev := e.events.wait(t, sshproxy.EventSessionRefused)
	if !strings.Contains(ev.details["error"], "file transfer") {
		t.Errorf("session.refused details %v, want the file-transfer error", ev.details)
	}
	if n := e.recs.count(); n != 0 {
		t.Errorf("%d recordings opened, want none", n)
	}
	if e.dials.Load() != 0 {
		t.Error("the target was dialed for a refused file transfer")
	}
}

func TestSFTPSubsystem(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{sftp: true})
	c := e.mustConnect()
	ch, reqs, err := c.OpenChannel("session", nil)
	if err != nil {
		t.Fatal(err)
	}
	statusCh := make(chan uint32, 1)
	go func() {
		for r := range reqs {
			if r.Type == "exit-status" && len(r.Payload) == 4 {
				statusCh <- binary.BigEndian.Uint32(r.Payload)
			}
		}
		close(statusCh)
	}()
	ok, err := ch.SendRequest("subsystem", true, ssh.Marshal(&struct{ Name string }{"sftp"}))
	if err != nil || !ok {
		t.Fatalf("subsystem request: ok=%v err=%v", ok, err)
	}
	// SSH_FXP_INIT version 3.
	if _, err := ch.Write([]byte{0, 0, 0, 5, 1, 0, 0, 0, 3}); err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(ch)
	hdr := make([]byte, 5)
	if _, err := io.ReadFull(br, hdr); err != nil {
		t.Fatal(err)
	}
	if hdr[4] != 2 { // SSH_FXP_VERSION
		t.Fatalf("sftp reply type %d, want SSH_FXP_VERSION", hdr[4])
	}
	if err := ch.CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if status, ok := <-statusCh; !ok || status != 0 {
		t.Errorf("exit status %d (received %v), want 0", status, ok)
	}
	ch.Close()
	started := e.events.wait(t, sshproxy.EventSessionStarted)
	if started.info.Kind != sshproxy.KindSubsystem || started.info.Command != "sftp" {
		t.Errorf("session.started info %+v", started.info)
	}
	e.events.wait(t, sshproxy.EventSessionEnded)
	if n := e.recs.count(); n != 0 {
		t.Errorf("%d recordings opened for sftp, want none", n)
	}

	// Other subsystems are refused.
	ch2, _, err := c.OpenChannel("session", nil)
	if err != nil {
		t.Fatal(err)
	}
	defer ch2.Close()
	if ok, err := ch2.SendRequest("subsystem", true, ssh.Marshal(&struct{ Name string }{"netconf"})); err != nil || ok {
		t.Errorf("netconf subsystem: ok=%v err=%v, want refused", ok, err)
	}
}

func TestForwardingRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{})
	c := e.mustConnect()
	if conn, err := c.Dial("tcp", "127.0.0.1:22"); err == nil {
		conn.Close()
		t.Error("direct-tcpip (local port forwarding) was accepted")
	}
	if ln, err := c.Listen("tcp", "127.0.0.1:0"); err == nil {
		ln.Close()
		t.Error("tcpip-forward (remote port forwarding) was accepted")
	}
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if ok, err := s.SendRequest("auth-agent-req@openssh.com", true, nil); err != nil || ok {
		t.Errorf("agent forwarding request: ok=%v err=%v, want refused", ok, err)
	}
	if ok, err := s.SendRequest("x11-req", true, nil); err != nil || ok {
		t.Errorf("x11 request: ok=%v err=%v, want refused", ok, err)
	}
}

func TestAuthRefused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{checkGrant: func(_ context.Context, id string) error {
		if id != "g-1" {
			return errors.New("unknown grant")
		}
		return nil
	}})
	otherCA, _ := mustSigner(t)
	plain, _ := mustSigner(t)
	tests := []struct {
		name   string
		signer func() ssh.Signer
		user   string
		reason string
	}{
		{name: "deny/wrong-principal", signer: func() ssh.Signer { s, _ := e.userSigner(userCert{principals: []string{"postgres"}}); return s }, reason: "invalid certificate"},
		{name: "deny/expired", signer: func() ssh.Signer { s, _ := e.userSigner(userCert{after: -2 * time.Hour, before: -time.Hour}); return s }, reason: "invalid certificate"},
		{name: "deny/not-yet-valid", signer: func() ssh.Signer { s, _ := e.userSigner(userCert{after: time.Hour, before: 2 * time.Hour}); return s }, reason: "invalid certificate"},
		{name: "deny/wrong-ca", signer: func() ssh.Signer { s, _ := e.userSigner(userCert{ca: otherCA}); return s }, reason: "invalid certificate"},
		{name: "deny/no-source-address", signer: func() ssh.Signer { s, _ := e.userSigner(userCert{sources: []string{}}); return s }, reason: "no source-address"},
		{name: "deny/source-address-mismatch", signer: func() ssh.Signer { s, _ := e.userSigner(userCert{sources: []string{"10.0.0.0/8"}}); return s }, reason: "source-address mismatch"},
		{name: "deny/plain-key", signer: func() ssh.Signer { return plain }, reason: "not a certificate"},
		{name: "deny/wrong-login", signer: func() ssh.Signer { s, _ := e.userSigner(userCert{principals: []string{"root", "admin"}}); return s }, user: "admin", reason: "wrong login"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			user := tt.user
			if user == "" {
				user = "root"
			}
			c, err := e.connect(tt.signer(), user)
			if err == nil {
				c.Close()
				t.Fatal("login accepted")
			}
			if !strings.Contains(err.Error(), "unable to authenticate") {
				t.Fatalf("login error = %v, want an authentication failure", err)
			}
		})
	}
	// Parallel subtests finish before the parent's cleanup runs.
	t.Cleanup(func() {
		if n := e.dials.Load(); n != 0 {
			t.Errorf("%d upstream dials for refused logins, want 0", n)
		}
		reasons := map[string]bool{}
		e.events.mu.Lock()
		for _, ev := range e.events.events {
			if ev.typ == sshproxy.EventAuthRefused {
				reasons[ev.details["reason"]] = true
			}
		}
		e.events.mu.Unlock()
		for _, tt := range tests {
			if !reasons[tt.reason] {
				t.Errorf("no auth.refused event with reason %q (got %v)", tt.reason, reasons)
			}
		}
	})
}

func TestAuthRefusedByTarget(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		checkGrant func(context.Context, string) error
		target     func(*env, *sshproxy.Target)
		reason     string
	}{
		{name: "deny/grant-inactive", checkGrant: func(context.Context, string) error { return errors.New("revoked") }, reason: "grant not active"},
		{name: "deny/conn-not-from-tunnel-address", target: func(_ *env, tg *sshproxy.Target) {
			tg.Source = tg.Source.Next() // 127.0.0.2; the cert covers it, the connection does not come from it
		}, reason: "wrong source"},
		{name: "deny/grant-ended", target: func(_ *env, tg *sshproxy.Target) { tg.Ends = time.Now().Add(-time.Second) }, reason: "grant ended"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOptions{checkGrant: tt.checkGrant, target: tt.target})
			s, _ := e.userSigner(userCert{sources: []string{"127.0.0.0/8"}})
			c, err := e.connect(s, "root")
			if err == nil {
				c.Close()
				t.Fatal("login accepted")
			}
			if e.dials.Load() != 0 {
				t.Error("upstream dialed for a refused login")
			}
			if ev := e.events.wait(t, sshproxy.EventAuthRefused); ev.details["reason"] != tt.reason {
				t.Errorf("auth.refused details %v, want reason %q", ev.details, tt.reason)
			}
		})
	}
}

func TestSessionRefused(t *testing.T) {
	t.Parallel()
	otherKey, _ := mustSigner(t)
	otherCA, _ := mustSigner(t)
	tests := []struct {
		name          string
		opts          func() envOptions
		wantReason    string
		wantDial      bool
		wantEvent     string
		wantErrDetail string
	}{
		{
			name: "deny/grant-inactive-at-session-start",
			opts: func() envOptions {
				var calls atomic.Int32
				return envOptions{checkGrant: func(context.Context, string) error {
					// Authentication calls first, the session second.
					if calls.Add(1) > 1 {
						return errors.New("grant revoked")
					}
					return nil
				}}
			},
			wantReason: "pinhole: access grant is not active",
			wantEvent:  sshproxy.EventSessionRefused,
		},
		{
			name: "deny/recording-cannot-open",
			opts: func() envOptions {
				return envOptions{openRecording: func(context.Context, sshproxy.SessionInfo) (sshproxy.Recording, error) {
					return nil, errors.New("disk full")
				}}
			},
			wantReason:    "pinhole: session refused: it cannot be recorded",
			wantEvent:     sshproxy.EventRecordingFailed,
			wantErrDetail: "disk full",
		},
		{
			name: "deny/upstream-host-key-mismatch",
			opts: func() envOptions {
				return envOptions{target: func(_ *env, tg *sshproxy.Target) { tg.UpstreamHostKey = sshca.AuthorizedKey(otherKey.PublicKey()) }}
			},
			wantReason:    "pinhole: cannot open a session on db-prod",
			wantDial:      true,
			wantEvent:     sshproxy.EventSessionRefused,
			wantErrDetail: "host key not trusted",
		},
		{
			name: "deny/upstream-host-ca-mismatch",
			opts: func() envOptions {
				return envOptions{target: func(_ *env, tg *sshproxy.Target) {
					tg.UpstreamHostKey = "@cert-authority " + sshca.AuthorizedKey(otherCA.PublicKey())
				}}
			},
			wantReason:    "pinhole: cannot open a session on db-prod",
			wantDial:      true,
			wantEvent:     sshproxy.EventSessionRefused,
			wantErrDetail: "not signed by the configured host CA",
		},
		{
			name: "deny/upstream-host-cert-wrong-name",
			opts: func() envOptions {
				return envOptions{target: func(e *env, tg *sshproxy.Target) {
					tg.Name = "db-other"
					tg.UpstreamHostKey = "@cert-authority * " + sshca.AuthorizedKey(e.hostCA.PublicKey())
				}}
			},
			wantReason:    "pinhole: cannot open a session on db-other",
			wantDial:      true,
			wantEvent:     sshproxy.EventSessionRefused,
			wantErrDetail: "not in the set of valid principals",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, tt.opts())
			c := e.mustConnect()
			r := run(c, "echo should-not-run", nil)
			if r.exit != 255 || r.stdout != "" {
				t.Errorf("exit %d stdout %q err %v, want 255 and no output", r.exit, r.stdout, r.err)
			}
			if got := strings.TrimSpace(r.stderr); got != tt.wantReason {
				t.Errorf("stderr %q, want %q", r.stderr, tt.wantReason)
			}
			if dialed := e.dials.Load() > 0; dialed != tt.wantDial {
				t.Errorf("upstream dialed = %v, want %v", dialed, tt.wantDial)
			}
			ev := e.events.wait(t, tt.wantEvent)
			if !strings.Contains(ev.details["error"], tt.wantErrDetail) {
				t.Errorf("%s details %v, want error containing %q", tt.wantEvent, ev.details, tt.wantErrDetail)
			}
			if _, ok := e.events.find(sshproxy.EventSessionStarted); ok {
				t.Error("session.started reported for a refused session")
			}
		})
	}
}

func TestUpstreamHostCA(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{target: func(e *env, tg *sshproxy.Target) {
		tg.UpstreamHostKey = "@cert-authority " + sshca.AuthorizedKey(e.hostCA.PublicKey())
	}})
	r := run(e.mustConnect(), "echo via-ca", nil)
	if r.exit != 0 || r.stdout != "via-ca\n" {
		t.Fatalf("run = %+v", r)
	}
}

// failingRecording fails every Output after the first ok ones.
type failingRecording struct {
	sshproxy.Recording
	ok atomic.Int32
}

func (f *failingRecording) Output(p []byte) error {
	if f.ok.Add(-1) < 0 {
		return errors.New("disk full")
	}
	return f.Recording.Output(p)
}

func TestRecordingWriteFailureEndsSession(t *testing.T) {
	t.Parallel()
	var e *env
	e = newEnv(t, envOptions{openRecording: func(ctx context.Context, s sshproxy.SessionInfo) (sshproxy.Recording, error) {
		r, err := e.recs.open(ctx, s)
		f := &failingRecording{Recording: r}
		f.ok.Store(1)
		return f, err
	}})
	c := e.mustConnect()
	done := make(chan runResult, 1)
	go func() { done <- run(c, "yes", nil) }()
	select {
	case r := <-done:
		if r.exit != 255 || !strings.Contains(r.stderr, "pinhole: session ended: recording failed") {
			t.Errorf("exit %d stderr %q, want 255 and the reason", r.exit, r.stderr)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("session did not end after the recording failed")
	}
	ev := e.events.wait(t, sshproxy.EventRecordingFailed)
	if ev.details["stage"] != "write" {
		t.Errorf("recording.failed details %v", ev.details)
	}
}

func TestEndGrant(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		pty  bool
		cmd  string
	}{
		{name: "ok/exec-yes", cmd: "yes"},
		{name: "ok/pty-loop", pty: true, cmd: "while :; do echo x; done"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, envOptions{})
			c := e.mustConnect()
			s, err := c.NewSession()
			if err != nil {
				t.Fatal(err)
			}
			defer s.Close()
			var stderr lockedBuffer
			s.Stderr = &stderr
			stdout, err := s.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if tt.pty {
				if err := s.RequestPty("xterm", 24, 80, nil); err != nil {
					t.Fatal(err)
				}
			}
			if err := s.Start(tt.cmd); err != nil {
				t.Fatal(err)
			}
			// Wait until output flows, then keep draining it.
			first := make([]byte, 1)
			if _, err := io.ReadFull(stdout, first); err != nil {
				t.Fatal(err)
			}
			go io.Copy(io.Discard, stdout)

			start := time.Now()
			n := e.proxy.EndGrant("g-1", "access grant revoked by bob")
			if took := time.Since(start); took > 900*time.Millisecond { // endGrantMax (700ms) and slack
				t.Errorf("EndGrant took %s", took)
			}
			if n != 1 {
				t.Errorf("EndGrant ended %d sessions, want 1", n)
			}
			waitErr := make(chan error, 1)
			go func() { waitErr <- s.Wait() }()
			select {
			case err := <-waitErr:
				var ee *ssh.ExitError
				if !errors.As(err, &ee) || ee.ExitStatus() != 255 {
					t.Errorf("Wait = %v, want exit status 255", err)
				}
			case <-time.After(time.Second):
				t.Fatal("session still running 1s after EndGrant")
			}
			if took := time.Since(start); took > time.Second {
				t.Errorf("session ended %s after EndGrant", took)
			}
			if !strings.Contains(stderr.String(), "\r\npinhole: access grant revoked by bob\r\n") {
				t.Errorf("stderr %q lacks the reason", stderr.String())
			}
			ev := e.events.wait(t, sshproxy.EventSessionEnded)
			if ev.details["reason"] != "access grant revoked by bob" || ev.details["exit_status"] != "255" {
				t.Errorf("session.ended details %v", ev.details)
			}
			if n := e.proxy.EndGrant("g-other", "x"); n != 0 {
				t.Errorf("EndGrant of another grant ended %d sessions", n)
			}
			// The connection itself is closed too.
			closed := make(chan error, 1)
			go func() { closed <- c.Wait() }()
			select {
			case <-closed:
			case <-time.After(time.Second):
				t.Error("connection still open 1s after EndGrant")
			}
		})
	}
}

func TestGrantEndsAtTargetEnds(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{target: func(_ *env, tg *sshproxy.Target) { tg.Ends = time.Now().Add(1500 * time.Millisecond) }})
	c := e.mustConnect()
	// read blocks on the open stdin until sshd closes it when the proxy cuts
	// the upstream connection, so nothing outlives the test.
	r := run(c, "read x", func(s *ssh.Session) {
		if _, err := s.StdinPipe(); err != nil {
			t.Error(err)
		}
	})
	if r.exit != 255 || !strings.Contains(r.stderr, "pinhole: access grant expired") {
		t.Fatalf("exit %d stderr %q, want 255 and the expiry reason", r.exit, r.stderr)
	}
}

func TestPTYRefusedWithoutPermitPTY(t *testing.T) {
	t.Parallel()
	e := newEnv(t, envOptions{})
	signer, _ := e.userSigner(userCert{noPTY: true})
	c, err := e.connect(signer, "root")
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	s, err := c.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	if err := s.RequestPty("xterm", 24, 80, nil); err == nil {
		t.Fatal("pty granted to a certificate without permit-pty")
	}
}

// TestRealSSHClient drives the proxy with OpenSSH's ssh: certificate login,
// host certificate trusted through @cert-authority, exit status.
func TestRealSSHClient(t *testing.T) {
	t.Parallel()
	sshBin, err := exec.LookPath("ssh")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("ssh is required in CI: %v", err)
		}
		t.Skip("ssh not installed")
	}
	e := newEnv(t, envOptions{})
	signer, priv := e.userSigner(userCert{})
	dir := t.TempDir()
	keyPath := filepath.Join(dir, "id_ed25519")
	writePrivateKey(t, keyPath, priv)
	writeFile(t, keyPath+"-cert.pub", sshca.AuthorizedKey(signer.PublicKey())+"\n", 0o644)
	writeFile(t, filepath.Join(dir, "known_hosts"), "@cert-authority db-prod "+sshca.AuthorizedKey(e.hostCA.PublicKey())+"\n", 0o644)
	_, port, _ := strings.Cut(e.addr, ":")

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, sshBin, "-F", "/dev/null",
		"-i", keyPath, "-o", "CertificateFile="+keyPath+"-cert.pub",
		"-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
		"-o", "UserKnownHostsFile="+filepath.Join(dir, "known_hosts"), "-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "StrictHostKeyChecking=yes", "-o", "HostKeyAlias=db-prod", "-o", "BatchMode=yes",
		"-o", "LogLevel=ERROR", "-p", port, "root@127.0.0.1", "echo hi from $(whoami); exit 3")
	cmd.Env = append(os.Environ(), "HOME="+dir)
	var stdout, stderr lockedBuffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err = cmd.Run()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("ssh: %v, want exit code 3\nstderr: %s", err, stderr.String())
	}
	if stdout.String() != "hi from root\n" {
		t.Errorf("stdout %q", stdout.String())
	}
	e.events.wait(t, sshproxy.EventSessionEnded)
	_, buf := e.recs.only(t)
	if _, events := castEvents(t, buf); !strings.Contains(outputOf(events), "hi from root") {
		t.Errorf("recording lacks the output: %v", events)
	}
}
