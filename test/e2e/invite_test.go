package e2e

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/wire"
	"github.com/pinhole-dev/pinhole/test/harness"
)

// TestInvariant02InviteNeedsAdminKey: an admin's device key alone cannot add
// a person (who could then approve the key thief's own requests): the API
// only hands back a confirmation link, nobody else's security key confirms
// it, and only the admin's touch creates the user and their invite link,
// once.
func TestInvariant02InviteNeedsAdminKey(t *testing.T) {
	e := newEnv(t)
	ada := e.invite("ada", "admin")
	mallory := e.invite("mallory", "dba")
	dc := e.deviceClient(e.enroll(ada))

	inv, err := dc.InviteUser(e.ctx, wire.InviteUser{Name: "puppet", Role: "approver"})
	if err != nil {
		t.Fatal(err)
	}
	if inv.URL != "" || !strings.Contains(inv.ConfirmURL, "/admin/invite/") {
		t.Fatalf("invite by device key alone = %+v; want only a confirmation link", inv)
	}
	if evs := e.auditEvents(); hasType(evs, audit.TypeUserInvited) && lastUserInvited(evs) == "puppet" {
		t.Fatal("user.invited written before the admin confirmed")
	}

	// Someone else's security key cannot confirm it: the ceremony asks for
	// ada's credentials only, and an assertion by another key is refused.
	if _, err := mallory.ConfirmInvite(e.ctx, inv.ConfirmURL); err == nil {
		t.Fatal("another person's key confirmed the admin's invite")
	}

	got, err := ada.ConfirmInvite(e.ctx, inv.ConfirmURL)
	if err != nil {
		t.Fatalf("ada confirming: %v", err)
	}
	puppet, err := harness.NewPerson("puppet", e.url, e.caFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := puppet.Register(e.ctx, got.URL); err != nil {
		t.Fatalf("registering through the confirmed invite: %v", err)
	}
	if _, err := ada.ConfirmInvite(e.ctx, inv.ConfirmURL); err == nil {
		t.Error("the confirmation link worked twice")
	}
	if lastUserInvited(e.auditEvents()) != "puppet" {
		t.Error("no user.invited event for the confirmed invite")
	}

	// Only admins may ask at all.
	mdc := e.deviceClient(e.enroll(mallory))
	if _, err := mdc.InviteUser(e.ctx, wire.InviteUser{Name: "other", Role: "dba"}); err == nil {
		t.Error("a non-admin's device could ask for an invite")
	}
}

func lastUserInvited(evs []audit.Event) string {
	name := ""
	for _, ev := range evs {
		if ev.Type == audit.TypeUserInvited {
			name = ev.Details["user"]
		}
	}
	return name
}

// TestInvariant01GrantCertOnlyForTheProxy: the certificate a workstation
// gets for a grant is signed by a CA only the recording proxy trusts, not by
// the user CA targets trust, so it cannot log into a target directly around
// the proxy (and its recording), from whatever address.
func TestInvariant01GrantCertOnlyForTheProxy(t *testing.T) {
	e := newEnv(t)
	act, _, _, _ := grantFor(t, e, "db-prod")
	pub, _, _, _, err := ssh.ParseAuthorizedKey([]byte(act.SSHCertificate))
	if err != nil {
		t.Fatal(err)
	}
	cert := pub.(*ssh.Certificate)
	targetCA, _, _, _, err := ssh.ParseAuthorizedKey([]byte(e.b.UserCAKey()))
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Equal(cert.SignatureKey.Marshal(), targetCA.Marshal()) {
		t.Fatal("the workstation's grant certificate is signed by the user CA that targets trust")
	}
	if err := sshca.CheckUserCert([]ssh.PublicKey{targetCA}, cert, act.Login, time.Now()); err == nil {
		t.Error("the target's CA accepts the workstation certificate")
	}
}
