package e2e

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.zx2c4.com/wireguard/conn"
	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/tun/netstack"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/store/sqlstore"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wire"
	"github.com/pinhole-dev/pinhole/test/harness"
)

// waitGranted polls a request until it is granted.
func waitGranted(t *testing.T, ctx context.Context, c *client.Client, id string) wire.Request {
	t.Helper()
	var r wire.Request
	waitUntil(t, 10*time.Second, "grant of "+id, func() bool {
		var err error
		r, err = c.Request(ctx, id)
		return err == nil && r.State == "granted"
	})
	return r
}

// rawPeer is a hostile agent: it holds a grant's WireGuard key but routes
// everything (0.0.0.0/0) into the tunnel, from any source address it likes.
type rawPeer struct {
	net *netstack.Net
	dev *device.Device
}

func newRawPeer(t *testing.T, act wire.Activation, priv wgkey.Private, src netip.Addr) *rawPeer {
	t.Helper()
	tdev, tnet, err := netstack.CreateNetTUN([]netip.Addr{src}, nil, 1420)
	if err != nil {
		t.Fatal(err)
	}
	dev := device.NewDevice(tdev, conn.NewDefaultBind(), device.NewLogger(device.LogLevelSilent, ""))
	gw, err := wgkey.ParsePublic(act.GatewayPublicKey)
	if err != nil {
		t.Fatal(err)
	}
	uapi := fmt.Sprintf("private_key=%s\npublic_key=%s\nendpoint=%s\nallowed_ip=0.0.0.0/0\n", priv.UAPIHex(), gw.UAPIHex(), act.GatewayEndpoint)
	if err := dev.IpcSet(uapi); err != nil {
		t.Fatal(err)
	}
	if err := dev.Up(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(dev.Close)
	return &rawPeer{net: tnet, dev: dev}
}

func (p *rawPeer) dial(dst string, timeout time.Duration) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	return p.net.DialContextTCPAddrPort(ctx, netip.MustParseAddrPort(dst))
}

// grantFor enrolls alice, has bob approve a request for target and activates
// it with keys the test holds.
func grantFor(t *testing.T, e *env, target string) (wire.Activation, wgkey.Private, *client.Client, wire.Request) {
	act, priv, _, dc, req := grantWithKeys(t, e, target)
	return act, priv, dc, req
}

// grantWithKeys is grantFor that also returns the SSH key the grant's
// certificate certifies.
func grantWithKeys(t *testing.T, e *env, target string) (wire.Activation, wgkey.Private, ssh.Signer, *client.Client, wire.Request) {
	t.Helper()
	alice := e.invite("alice", "dba")
	bob := e.invite("bob", "approver")
	dc := e.deviceClient(e.enroll(alice))
	req, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: target, TTL: "5m", Reason: "INC-1 check"})
	if err != nil {
		t.Fatal(err)
	}
	e.approve(req.ID, bob)
	waitGranted(t, e.ctx, dc, req.ID)
	priv, err := wgkey.NewPrivate(nil)
	if err != nil {
		t.Fatal(err)
	}
	sk, err := sshca.NewKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	act, err := dc.Activate(e.ctx, req.ID, wire.ActivateRequest{WireGuardPublicKey: priv.Public().String(), SSHPublicKey: sshca.AuthorizedKey(sk.PublicKey())})
	if err != nil {
		t.Fatal(err)
	}
	return act, priv, sk, dc, req
}

// TestInvariant01NoFlowBeyondGrant: through a granted peer, only the granted
// ip:port is reachable; other ports, other targets, the target's real
// address, arbitrary hosts and a spoofed source address are refused, and every
// refusal is audited as flow.denied.
func TestInvariant01NoFlowBeyondGrant(t *testing.T) {
	e := newEnv(t)
	act, priv, _, req := grantFor(t, e, "db-prod")
	addr := netip.MustParseAddr(act.TunnelAddress)
	p := newRawPeer(t, act, priv, addr)

	c, err := p.dial(act.Destination, 10*time.Second)
	if err != nil {
		t.Fatalf("granted destination %s: %v", act.Destination, err)
	}
	banner, _ := bufio.NewReader(c).ReadString('\n')
	c.Close()
	if !strings.HasPrefix(banner, "SSH-2.0-") {
		t.Fatalf("granted flow: banner %q", banner)
	}

	dst := netip.MustParseAddrPort(act.Destination)
	_, sshdPort, _ := net.SplitHostPort(e.sshd.Addr)
	denied := []string{
		netip.AddrPortFrom(dst.Addr(), dst.Port()+1).String(), // another port, same host
		netip.AddrPortFrom(dst.Addr(), 5432).String(),
		"100.127.0.2:" + fmt.Sprint(dst.Port()), // another configured target's address
		"10.1.2.3:22",                           // anything else
	}
	// The target's real (loopback) address never even reaches the flow
	// decision: the gateway's netstack drops loopback destinations as martian.
	if c, err := p.dial("127.0.0.1:"+sshdPort, 2*time.Second); err == nil {
		c.Close()
		t.Error("flow to the target's real loopback address was allowed")
	}
	for _, d := range denied {
		c, err := p.dial(d, 5*time.Second)
		if err == nil {
			c.Close()
			t.Errorf("flow to %s was allowed", d)
			continue
		}
		if !strings.Contains(err.Error(), "refused") {
			t.Errorf("flow to %s: want connection refused, got %v", d, err)
		}
	}

	// A peer sending from an address that is not its own never gets a flow:
	// WireGuard's cryptokey routing drops it before the gateway.
	spoof := newRawPeer(t, act, priv, addr.Next())
	if c, err := spoof.dial(act.Destination, 2*time.Second); err == nil {
		c.Close()
		t.Error("flow from a spoofed source address was allowed")
	}

	evs := e.auditEvents()
	for _, d := range denied {
		found := false
		for _, ev := range evs {
			if ev.Type == audit.TypeFlowDenied && ev.Details["destination"] == d && ev.Request == req.ID {
				found = true
			}
		}
		if !found {
			t.Errorf("no flow.denied event for %s", d)
		}
	}
	if !hasEvent(evs, audit.TypeFlowAllowed, req.ID) {
		t.Error("no flow.allowed event for the granted flow")
	}
}

// forgeLink stores a grant link for approver on request directly in the
// broker's database and returns its URL.
func forgeLink(t *testing.T, e *env, request, approver string) string {
	t.Helper()
	st, err := sqlstore.Open(e.ctx, filepath.Join(e.dir, "broker", "pinhole.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	token := base64.RawURLEncoding.EncodeToString([]byte(strings.Repeat("f", 32)))
	sum := sha256.Sum256([]byte(token))
	err = st.Update(e.ctx, func(tx store.Tx) error {
		return tx.PutToken(e.ctx, store.Token{Hash: hex.EncodeToString(sum[:]), Kind: store.TokenGrant, User: approver, Request: request,
			CreatedAt: time.Now(), ExpiresAt: time.Now().Add(time.Hour)})
	})
	if err != nil {
		t.Fatal(err)
	}
	return e.url + "/grant/" + token
}

// TestInvariant03NoSelfApproval: a requester who holds an approver role gets
// no grant link for their own request, and even a link made for them
// cannot approve it.
func TestInvariant03NoSelfApproval(t *testing.T) {
	e := newEnv(t)
	alice := e.invite("alice", "sre")
	carol := e.invite("carol", "sre")
	dc := e.deviceClient(e.enroll(alice))
	req, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: "10m", Reason: "INC-2 peer review"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	if _, err := e.hook.Wait(ctx, req.ID, "carol"); err != nil {
		t.Fatal(err)
	}
	for _, n := range e.hook.All() {
		if n.Approver == "alice" {
			t.Fatalf("requester alice got a grant link for her own request: %+v", n)
		}
	}

	link := forgeLink(t, e, req.ID, "alice")
	_, err = alice.Decide(e.ctx, link, true)
	var he *harness.HTTPError
	if !errors.As(err, &he) || he.Status != http.StatusForbidden || !strings.Contains(he.Msg, "own request") {
		t.Fatalf("self-approval: want 403 naming the own request, got %v", err)
	}
	if r, _ := dc.Request(e.ctx, req.ID); r.State != "pending" || len(r.Approvals) != 0 {
		t.Fatalf("request after self-approval attempt: %+v", r)
	}
	if hasEvent(e.auditEvents(), audit.TypeApprovalRecorded, req.ID) {
		t.Fatal("an approval was recorded")
	}
	_ = carol
}

// TestInvariant04GrantLinkSingleUse: a grant link works once, only for its
// approver and its request, and not after it expires; unknown tokens are
// rate-limited.
func TestInvariant04GrantLinkSingleUse(t *testing.T) {
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	bob := e.invite("bob", "approver")
	carol := e.invite("carol", "approver")
	dc := e.deviceClient(e.enroll(alice))
	req, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: "10m", Reason: "INC-3 links"})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	bobN, err := e.hook.Wait(ctx, req.ID, "bob")
	if err != nil {
		t.Fatal(err)
	}
	carolN, err := e.hook.Wait(ctx, req.ID, "carol")
	if err != nil {
		t.Fatal(err)
	}
	tok := bobN.URL[strings.LastIndex(bobN.URL, "/")+1:]
	if raw, err := base64.RawURLEncoding.DecodeString(tok); err != nil || len(raw) < 16 {
		t.Fatalf("grant token %q is not >= 128 random bits", tok)
	}

	// Bound to its approver: carol's key cannot use bob's link.
	if err := decideWithOtherKey(e, carol, bobN.URL); err == nil {
		t.Fatal("carol approved with bob's link")
	}
	// Bob's link works once.
	if _, err := bob.Decide(e.ctx, bobN.URL, true); err != nil {
		t.Fatalf("bob approving: %v", err)
	}
	waitGranted(t, e.ctx, dc, req.ID)
	if _, err := bob.Decide(e.ctx, bobN.URL, true); err == nil {
		t.Fatal("bob's link worked twice")
	}
	// Bound to its request's state: carol's link is dead once granted.
	if _, err := carol.Decide(e.ctx, carolN.URL, true); err == nil {
		t.Fatal("carol's link approved a request that is no longer pending")
	}

	// Expiry: db-short's rule lets links live 2 s.
	short, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-short", TTL: "10m", Reason: "INC-3 expiry"})
	if err != nil {
		t.Fatal(err)
	}
	n, err := e.hook.Wait(ctx, short.ID, "bob")
	if err != nil {
		t.Fatal(err)
	}
	waitUntil(t, 10*time.Second, "link expiry", func() bool { return time.Now().After(n.ExpiresAt.Add(100 * time.Millisecond)) })
	pg, err := bob.Decide(e.ctx, n.URL, true)
	if err == nil || pg.Status != http.StatusGone {
		t.Fatalf("expired link: status %d, err %v", pg.Status, err)
	}
	if r, _ := dc.Request(e.ctx, short.ID); r.State == "granted" {
		t.Fatal("expired link granted the request")
	}

	// Guessing: unknown tokens are 404 and then rate-limited.
	var last int
	for i := range 40 {
		pg, err := bob.Open(e.ctx, fmt.Sprintf("%s/grant/%s", e.url, base64.RawURLEncoding.EncodeToString([]byte(fmt.Sprintf("%032d", i)))))
		if err != nil {
			t.Fatal(err)
		}
		last = pg.Status
		if i == 0 && pg.Status != http.StatusNotFound {
			t.Fatalf("unknown token: status %d", pg.Status)
		}
	}
	if last != http.StatusTooManyRequests {
		t.Fatalf("after 40 wrong tokens: status %d, want 429", last)
	}
}

// decideWithOtherKey makes p sign the approval challenge of someone else's
// link with p's own credential (the options' allow list is dropped, as a
// hostile browser would).
func decideWithOtherKey(e *env, p *harness.Person, link string) error {
	pg, err := p.Open(e.ctx, link)
	if err != nil {
		return err
	}
	view, err := harness.ViewHash(pg.Body)
	if err != nil {
		return err
	}
	return p.DecideWithViewAnyCredential(e.ctx, link, true, view)
}

// TestInvariant06ExpiryClosesFlows: when grants end, a busy SSH session
// through the recording proxy and a raw TCP flow both end within 1 s, the SSH
// user is told why, the peers are gone, and the certificate expired with the
// grant.
func TestInvariant06ExpiryClosesFlows(t *testing.T) {
	requireTool(t, "ssh")
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	bob := e.invite("bob", "approver")
	local := e.runAgent(e.enroll(alice))

	ttl := "6s"
	rs, err := local.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: ttl, Reason: "INC-6 ssh"})
	if err != nil {
		t.Fatal(err)
	}
	rt, err := local.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-tcp", TTL: ttl, Reason: "INC-6 tcp"})
	if err != nil {
		t.Fatal(err)
	}
	e.approve(rs.ID, bob)
	e.approve(rt.ID, bob)
	tunS, err := local.LocalWait(e.ctx, rs.ID, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	tunT, err := local.LocalWait(e.ctx, rt.ID, 20*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	grS, _ := local.Request(e.ctx, rs.ID)
	grT, _ := local.Request(e.ctx, rt.ID)

	// The certificate dies with the grant.
	certLine, err := os.ReadFile(tunS.CertFile)
	if err != nil {
		t.Fatal(err)
	}
	pub, _, _, _, err := ssh.ParseAuthorizedKey(certLine)
	if err != nil {
		t.Fatal(err)
	}
	if vb := pub.(*ssh.Certificate).ValidBefore; int64(vb) > grS.GrantEnds.Unix()+1 {
		t.Errorf("certificate valid until %d, grant ends %d", vb, grS.GrantEnds.Unix())
	}

	// Two SSH sessions on the grant: one floods its terminal, one prints a
	// line now and then. Both must end within 1 s. The quiet one must show
	// the user why; the flooding one may not get to (its reason queues behind
	// up to an SSH window of output still in flight, and the cut never waits
	// longer than its bound for the client to drain that).
	startSSH := func(command string) (*atomic.Int64, *syncBuffer, <-chan time.Time) {
		cmd := exec.CommandContext(e.ctx, "ssh", sshArgs(tunS, command)...)
		stdout, _ := cmd.StdoutPipe()
		stderr := new(syncBuffer)
		cmd.Stderr = stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		lines := new(atomic.Int64)
		done := make(chan time.Time, 1)
		go func() {
			io.Copy(countingWriter{lines}, stdout)
			cmd.Wait()
			done <- time.Now()
		}()
		return lines, stderr, done
	}
	busyLines, busyErr, sshDone := startSSH("while :; do echo busy; done")
	quietLines, quietErr, quietDone := startSSH("while :; do echo tick; sleep 0.2; done")
	waitUntil(t, 10*time.Second, "busy ssh output", func() bool { return busyLines.Load() > 1000 && quietLines.Load() > 0 })

	// A raw TCP flow kept busy with echo round trips.
	tc, err := net.Dial("tcp", tunT.Local)
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tcpDone := make(chan time.Time, 1)
	go func() {
		buf := make([]byte, 4096)
		for {
			if _, err := tc.Write(buf); err != nil {
				break
			}
			if _, err := io.ReadFull(tc, buf); err != nil {
				break
			}
		}
		tcpDone <- time.Now()
	}()

	for name, c := range map[string]struct {
		done <-chan time.Time
		ends time.Time
	}{"busy ssh": {sshDone, grS.GrantEnds}, "quiet ssh": {quietDone, grS.GrantEnds}, "tcp": {tcpDone, grT.GrantEnds}} {
		select {
		case at := <-c.done:
			late := at.Sub(c.ends)
			if late < -100*time.Millisecond || late > time.Second {
				t.Errorf("%s flow ended %v after the grant's end (want within 1s)", name, late)
			}
			t.Logf("%s flow ended %v after grant end", name, late.Round(time.Millisecond))
		case <-time.After(time.Until(c.ends) + 5*time.Second):
			t.Fatalf("%s flow still alive 5s after the grant ended", name)
		}
	}
	if !strings.Contains(quietErr.String(), "pinhole: ") || !strings.Contains(quietErr.String(), "expired") {
		t.Errorf("ssh user was not told why: stderr %q", quietErr.String())
	}
	t.Logf("busy ssh session's last words: %q", busyErr.String())
	waitUntil(t, 5*time.Second, "peers removed", func() bool { return e.b.Gateway().Peers() == 0 })
	evs := e.auditEvents()
	for _, id := range []string{rs.ID, rt.ID} {
		if !hasEvent(evs, audit.TypeGrantEnded, id) {
			t.Errorf("no grant.ended for %s", id)
		}
	}
	if c, err := net.DialTimeout("tcp", tunT.Local, time.Second); err == nil {
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := c.Read(make([]byte, 1)); err == nil {
			t.Error("agent still forwards after the grant ended")
		}
		c.Close()
	}
}

type countingWriter struct{ n *atomic.Int64 }

func (w countingWriter) Write(p []byte) (int, error) {
	w.n.Add(int64(strings.Count(string(p), "\n")))
	return len(p), nil
}

// TestActivationRefusesForeignKeys: a device cannot activate a grant with the
// gateway's own WireGuard key or with a key another grant already uses
// (either would clash in the gateway and, before this check, could keep a
// restarting broker down).
func TestActivationRefusesForeignKeys(t *testing.T) {
	e := newEnv(t)
	act, priv, dc, _ := grantFor(t, e, "db-prod")
	_ = act
	req2, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-tcp", TTL: "5m", Reason: "INC-10 keys"})
	if err != nil {
		t.Fatal(err)
	}
	e.approve(req2.ID, e.people["bob"])
	waitGranted(t, e.ctx, dc, req2.ID)
	for name, key := range map[string]string{
		"gateway key": e.b.Gateway().PublicKey().String(),
		"reused key":  priv.Public().String(),
	} {
		_, err := dc.Activate(e.ctx, req2.ID, wire.ActivateRequest{WireGuardPublicKey: key})
		var ae *client.APIError
		if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest {
			t.Errorf("activation with the %s: got %v, want 400", name, err)
		}
	}
	e.stop()
	e.startBroker()
	if got := e.b.Gateway().Peers(); got != 1 {
		t.Fatalf("peers after restart = %d, want 1", got)
	}
}
