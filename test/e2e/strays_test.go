package e2e

import (
	"crypto/rand"
	"errors"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// TestInvariant08AuditSurvivesStrayBytes: bytes that are not UTF-8 in what a
// grant holder sends (an SSH exec command, the key ID of a self-made
// certificate) are audited as U+FFFD; the stored chain still verifies and the
// broker still signs checkpoints afterwards. (Hashing the raw bytes while the
// store keeps JSON text once let one such command break verification and stop
// checkpoints for good.)
func TestInvariant08AuditSurvivesStrayBytes(t *testing.T) {
	e := newEnv(t)
	act, priv, sk, _, _ := grantWithKeys(t, e, "db-prod")
	if _, err := e.b.Service().Checkpoint(e.ctx); err != nil {
		t.Fatalf("checkpoint before: %v", err)
	}
	p := newRawPeer(t, act, priv, netip.MustParseAddr(act.TunnelAddress))
	sshConn := func(signer ssh.Signer) (*ssh.Client, error) {
		nc, err := p.dial(act.Destination, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		cc, chans, reqs, err := ssh.NewClientConn(nc, "db-prod:22", &ssh.ClientConfig{User: act.Login,
			Auth: []ssh.AuthMethod{ssh.PublicKeys(signer)}, HostKeyCallback: ssh.InsecureIgnoreHostKey(), Timeout: 10 * time.Second})
		if err != nil {
			nc.Close()
			return nil, err
		}
		return ssh.NewClient(cc, chans, reqs), nil
	}

	// An exec command with stray bytes, through the recording proxy.
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(act.SSHCertificate))
	if err != nil {
		t.Fatal(err)
	}
	signer, err := sshca.CertSigner(pub.(*ssh.Certificate), sk)
	if err != nil {
		t.Fatal(err)
	}
	client, err := sshConn(signer)
	if err != nil {
		t.Fatal(err)
	}
	sess, err := client.NewSession()
	if err != nil {
		t.Fatal(err)
	}
	_, _ = sess.CombinedOutput("true # \xff\xfe")
	client.Close()

	// A self-made certificate whose key ID holds a stray byte.
	ca, _ := sshca.NewKey(rand.Reader)
	k, _ := sshca.NewKey(rand.Reader)
	cert := &ssh.Certificate{Key: k.PublicKey(), CertType: ssh.UserCert, KeyId: "evil\xff", ValidPrincipals: []string{act.Login},
		ValidAfter: uint64(time.Now().Add(-time.Minute).Unix()), ValidBefore: uint64(time.Now().Add(time.Hour).Unix())}
	if err := cert.SignCert(rand.Reader, ca); err != nil {
		t.Fatal(err)
	}
	forged, _ := ssh.NewCertSigner(cert, k)
	if c, err := sshConn(forged); err == nil {
		c.Close()
		t.Fatal("a self-made certificate was accepted")
	}

	var evs []audit.Event
	waitUntil(t, 10*time.Second, "session.ended and auth.refused", func() bool {
		evs = e.auditEvents()
		return hasType(evs, audit.TypeSessionEnded) && hasType(evs, "auth.refused")
	})
	if err := audit.Verify(evs); err != nil {
		t.Fatalf("chain no longer verifies: %v", err)
	}
	if _, err := e.b.Service().Checkpoint(e.ctx); err != nil {
		t.Fatalf("checkpoint after: %v", err)
	}
	var sawCmd, sawKeyID bool
	for _, ev := range evs {
		sawCmd = sawCmd || ev.Details["command"] == "true # \uFFFD"
		sawKeyID = sawKeyID || ev.Details["key_id"] == "evil\uFFFD"
	}
	if !sawCmd || !sawKeyID {
		for _, ev := range evs {
			t.Logf("%s %v", ev.Type, ev.Details)
		}
		t.Errorf("stray bytes not audited as U+FFFD (command seen %v, key id seen %v)", sawCmd, sawKeyID)
	}
}

func hasType(evs []audit.Event, typ string) bool {
	for _, ev := range evs {
		if ev.Type == typ {
			return true
		}
	}
	return false
}

// TestRevokeReasonBounds: a revoke reason that cannot fit after "revoked by
// NAME: " or holds a control character is refused with a 400 naming the
// problem, and the grant stays as it was; one that fits revokes.
func TestRevokeReasonBounds(t *testing.T) {
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	e.invite("bob", "approver")
	dc := e.deviceClient(e.enroll(alice))
	req, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-tcp", TTL: "10m", Reason: "INC-9 revoke"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct{ name, reason, want string }{
		{"deny/too long with prefix", strings.Repeat("r", 490), "at most 482 fit"},
		{"deny/control character", "done\x1b[2J", "control characters"},
	} {
		_, err := dc.Revoke(e.ctx, req.ID, wire.RevokeRequest{Reason: tt.reason})
		var ae *client.APIError
		if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: got %v, want a 400 containing %q", tt.name, err, tt.want)
		}
	}
	got, err := dc.Request(e.ctx, req.ID)
	if err != nil || got.State != "pending" {
		t.Fatalf("after refused revokes: state %q, %v; want pending", got.State, err)
	}
	if _, err := dc.Revoke(e.ctx, req.ID, wire.RevokeRequest{Reason: strings.Repeat("r", 482)}); err != nil {
		t.Errorf("revoke with a reason that fits: %v", err)
	}
}
