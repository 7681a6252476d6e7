package e2e

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/recording"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// TestEndToEndSSH is the main job: enroll, request, approve from the grant
// link, tunnel, the real ssh client through the agent's listener to the real
// sshd via the recording proxy, the recording readable by asciinema, and a
// verifiable audit chain.
func TestEndToEndSSH(t *testing.T) {
	requireTool(t, "ssh")
	requireTool(t, "asciinema")
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	bob := e.invite("bob", "approver")
	ws := e.enroll(alice)
	local := e.runAgent(ws)

	req, err := local.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: "5m", Reason: "INC-4821 vacuum"})
	if err != nil {
		t.Fatal(err)
	}
	if req.State != "pending" || req.RequiredApprovals != 1 {
		t.Fatalf("request = %+v", req)
	}
	e.approve(req.ID, bob)
	tun, err := local.LocalWait(e.ctx, req.ID, 20*time.Second)
	if err != nil {
		t.Fatalf("waiting for tunnel: %v", err)
	}
	if tun.Target != "db-prod" || tun.Login != e.login {
		t.Fatalf("tunnel = %+v", tun)
	}

	out, err := exec.CommandContext(e.ctx, "ssh", sshArgs(tun, "echo pinhole-e2e-$((6*7)); exit 3")...).CombinedOutput()
	var ee *exec.ExitError
	if !asExit(err, &ee) || ee.ExitCode() != 3 {
		t.Fatalf("ssh: want exit 3, got %v\n%s\nsshd log:\n%s", err, out, e.sshd.Log())
	}
	if !strings.Contains(string(out), "pinhole-e2e-42") {
		t.Fatalf("ssh output %q lacks the command's output", out)
	}

	// A PTY session, recorded as asciicast v2.
	cmd := exec.CommandContext(e.ctx, "ssh", append([]string{"-tt"}, sshArgs(tun, "echo pty-marker-$((1+1)); stty size")...)...)
	out, err = cmd.CombinedOutput()
	if err != nil || !strings.Contains(string(out), "pty-marker-2") {
		t.Fatalf("pty ssh: %v\n%s", err, out)
	}

	// Both sessions are recorded and sealed with their hash; the newest is the PTY one.
	var recs []wire.Recording
	waitUntil(t, 5*time.Second, "two sealed recordings", func() bool {
		recs, err = local.Recordings(e.ctx)
		sealed := 0
		for _, r := range recs {
			if r.SHA256 != "" {
				sealed++
			}
		}
		return err == nil && sealed == 2
	})
	pty := recs[0]
	rc, err := local.RecordingCast(e.ctx, pty.ID)
	if err != nil {
		t.Fatal(err)
	}
	var cast bytes.Buffer
	cast.ReadFrom(rc)
	rc.Close()
	if _, _, err := recording.ReadCast(bytes.NewReader(cast.Bytes()), 1<<20); err != nil {
		t.Fatalf("recording is not valid asciicast v2: %v", err)
	}
	path := filepath.Join(t.TempDir(), "s.cast")
	os.WriteFile(path, cast.Bytes(), 0o600)
	// asciinema cat insists on a terminal: give it one with script(1).
	catOut, err := exec.Command("script", "-qec", "asciinema cat "+path, "/dev/null").CombinedOutput()
	if err != nil || !strings.Contains(string(catOut), "pty-marker-2") {
		t.Fatalf("asciinema cat: %v\n%s", err, catOut)
	}

	evs := e.auditEvents()
	if err := audit.Verify(evs); err != nil {
		t.Fatalf("audit chain: %v", err)
	}
	for _, typ := range []string{audit.TypeRequestCreated, audit.TypeApprovalRecorded, audit.TypeGrantIssued, audit.TypeGrantActivated,
		audit.TypeCertIssued, audit.TypeFlowAllowed, audit.TypeSessionStarted, audit.TypeRecordingClosed} {
		if !hasEvent(evs, typ, req.ID) {
			t.Errorf("no %s event for %s", typ, req.ID)
		}
	}
}

func hasEvent(evs []audit.Event, typ, request string) bool {
	for _, e := range evs {
		if e.Type == typ && (request == "" || e.Request == request) {
			return true
		}
	}
	return false
}

func asExit(err error, target **exec.ExitError) bool {
	ee, ok := err.(*exec.ExitError)
	if ok {
		*target = ee
	}
	return ok
}
