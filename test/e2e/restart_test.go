package e2e

import (
	"bufio"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/agent"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// TestInvariant07RestartNeverResurrects: a grant that expired while the
// broker was down stays ended after restart and gets no peer back; a grant
// still active comes back with its peer and carries traffic again.
func TestInvariant07RestartNeverResurrects(t *testing.T) {
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	bob := e.invite("bob", "approver")
	ws := e.enroll(alice)
	dc := e.deviceClient(ws)

	activate := func(ttl string) (wire.Request, wire.Activation, wgkey.Private) {
		req, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: ttl, Reason: "INC-7 restart"})
		if err != nil {
			t.Fatal(err)
		}
		e.approve(req.ID, bob)
		req = waitGranted(t, e.ctx, dc, req.ID)
		priv, _ := wgkey.NewPrivate(nil)
		sk, _ := sshca.NewKey(nil)
		act, err := dc.Activate(e.ctx, req.ID, wire.ActivateRequest{WireGuardPublicKey: priv.Public().String(), SSHPublicKey: sshca.AuthorizedKey(sk.PublicKey())})
		if err != nil {
			t.Fatal(err)
		}
		return req, act, priv
	}
	short, _, _ := activate("2s")
	long, _, longKey := activate("10m")
	if got := e.b.Gateway().Peers(); got != 2 {
		t.Fatalf("peers before restart = %d, want 2", got)
	}

	e.stop()
	waitUntil(t, 10*time.Second, "short grant's end while the broker is down", func() bool { return time.Now().After(short.GrantEnds.Add(200 * time.Millisecond)) })
	e.startBroker()
	dc = e.deviceClient(ws)

	if got := e.b.Gateway().Peers(); got != 1 {
		t.Fatalf("peers after restart = %d, want 1 (only the active grant)", got)
	}
	r, err := dc.Request(e.ctx, short.ID)
	if err != nil || r.State != "ended" || r.EndReason == "" {
		t.Fatalf("expired grant after restart: %+v %v", r, err)
	}
	if _, err := dc.Activate(e.ctx, short.ID, wire.ActivateRequest{WireGuardPublicKey: longKey.Public().String()}); err == nil {
		t.Fatal("an expired grant could be activated after restart")
	}
	r, err = dc.Request(e.ctx, long.ID)
	if err != nil || r.State != "granted" {
		t.Fatalf("active grant after restart: %+v %v", r, err)
	}

	// The restored peer works: same key, same tunnel address, new gateway port.
	gw := wire.Activation{GatewayPublicKey: e.b.Gateway().PublicKey().String(),
		GatewayEndpoint: netip.AddrPortFrom(netip.MustParseAddr("127.0.0.1"), uint16(e.b.WireGuardPort())).String()}
	evs := e.auditEvents()
	var addr, dst string
	for _, ev := range evs {
		if ev.Type == "grant.activated" && ev.Request == long.ID {
			addr, dst = ev.Details["tunnel_address"], ev.Details["destination"]
		}
	}
	p := newRawPeer(t, gw, longKey, netip.MustParseAddr(addr))
	c, err := p.dial(dst, 10*time.Second)
	if err != nil {
		t.Fatalf("restored grant's flow: %v", err)
	}
	banner, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if !strings.HasPrefix(banner, "SSH-2.0-") {
		t.Fatalf("restored flow banner %q", banner)
	}
}

// TestAgentRestartReactivates: an agent that restarts during a grant makes
// fresh keys and activates again; the broker swaps the peer (the old key no
// longer works) and the tunnel carries SSH again.
func TestAgentRestartReactivates(t *testing.T) {
	requireTool(t, "ssh")
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	bob := e.invite("bob", "approver")
	ws := e.enroll(alice)
	local, stop := e.startAgent(ws)
	req, err := local.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: "10m", Reason: "INC-8 agent restart"})
	if err != nil {
		t.Fatal(err)
	}
	e.approve(req.ID, bob)
	if _, err := local.LocalWait(e.ctx, req.ID, 20*time.Second); err != nil {
		t.Fatal(err)
	}
	stop()

	local, _ = e.startAgent(ws)
	tun, err := local.LocalWait(e.ctx, req.ID, 20*time.Second)
	if err != nil {
		t.Fatalf("tunnel after agent restart: %v", err)
	}
	out, err := exec.CommandContext(e.ctx, "ssh", sshArgs(tun, "echo again-$((2+3))")...).CombinedOutput()
	if err != nil || !strings.Contains(string(out), "again-5") {
		t.Fatalf("ssh after agent restart: %v\n%s", err, out)
	}
	if got := e.b.Gateway().Peers(); got != 1 {
		t.Fatalf("peers = %d, want 1 (the old key replaced)", got)
	}
	n := 0
	for _, ev := range e.auditEvents() {
		if ev.Type == audit.TypeGrantActivated && ev.Request == req.ID {
			n++
		}
	}
	if n != 2 {
		t.Fatalf("%d grant.activated events, want 2", n)
	}
}

// TestSecondAgentLeavesFirstAlone: starting a second agent on a state dir
// that an agent already serves fails without touching the first one's grant.
func TestSecondAgentLeavesFirstAlone(t *testing.T) {
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	bob := e.invite("bob", "approver")
	ws := e.enroll(alice)
	local := e.runAgent(ws)
	req, err := local.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: "10m", Reason: "INC-11 second agent"})
	if err != nil {
		t.Fatal(err)
	}
	e.approve(req.ID, bob)
	tun, err := local.LocalWait(e.ctx, req.ID, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	a2, err := agent.New(agent.Config{StateDir: ws, Collector: fixedPosture{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := a2.Run(e.ctx); err == nil {
		t.Fatal("a second agent ran on the same state dir")
	}
	for _, f := range []string{tun.KeyFile, tun.CertFile, tun.KnownHostsFile} {
		if _, err := os.Stat(f); err != nil {
			t.Errorf("grant file gone after the second agent failed: %v", err)
		}
	}
	if _, err := local.LocalStatus(e.ctx); err != nil {
		t.Fatalf("first agent hurt: %v", err)
	}
}

// TestRestartEndsGrantsOfChangedTargets: a grant is for its target as it was
// configured; when a restart finds the target's address changed, the grant
// ends with that reason instead of coming back with its peer.
func TestRestartEndsGrantsOfChangedTargets(t *testing.T) {
	e := newEnv(t)
	_, _, _, req := grantFor(t, e, "db-tcp")
	if got := e.b.Gateway().Peers(); got != 1 {
		t.Fatalf("peers before restart = %d, want 1", got)
	}
	e.stop()
	b, err := os.ReadFile(e.cfg.ConfigFile)
	if err != nil {
		t.Fatal(err)
	}
	changed := strings.Replace(string(b), "  - name: db-tcp\n    address: "+e.echo+"\n", "  - name: db-tcp\n    address: 127.0.0.1:9\n", 1)
	if changed == string(b) {
		t.Fatal("test config has no db-tcp entry to change")
	}
	if err := os.WriteFile(e.cfg.ConfigFile, []byte(changed), 0o600); err != nil {
		t.Fatal(err)
	}
	e.startBroker()
	if got := e.b.Gateway().Peers(); got != 0 {
		t.Errorf("peers after restart = %d, want 0", got)
	}
	// The broker listens on a new port now: a fresh client for alice's device.
	r, err := e.deviceClient(filepath.Join(e.dir, "alice-ws")).Request(e.ctx, req.ID)
	if err != nil {
		t.Fatal(err)
	}
	if r.State != "ended" || !strings.Contains(r.EndReason, "has changed") {
		t.Errorf("after restart: state %q, reason %q; want ended because the target changed", r.State, r.EndReason)
	}
	if !hasEvent(e.auditEvents(), audit.TypeGrantEnded, req.ID) {
		t.Error("no grant.ended event")
	}
}
