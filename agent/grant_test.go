package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// activationFixture returns a valid activation for "r1" and the grant key
// its certificate certifies.
func activationFixture(t testing.TB, now time.Time) (wire.Activation, ssh.PublicKey) {
	t.Helper()
	raw, _, _ := ed25519.GenerateKey(rand.Reader)
	pub, _ := ssh.NewPublicKey(raw)
	ca, _ := sshca.NewKey(nil)
	cert := &ssh.Certificate{Key: pub, CertType: ssh.UserCert, KeyId: "r1", ValidPrincipals: []string{"root"}, ValidBefore: ssh.CertTimeInfinity}
	if err := cert.SignCert(rand.Reader, ca); err != nil {
		t.Fatal(err)
	}
	gw, _ := wgkey.NewPrivate(nil)
	return wire.Activation{
		Request: "r1", Target: "db-prod", Protocol: "ssh", Login: "root",
		TunnelAddress: "100.64.0.2", GatewayPublicKey: gw.Public().String(), GatewayEndpoint: "127.0.0.1:51820",
		Destination: "100.80.0.1:22", SSHCertificate: sshca.AuthorizedKey(cert),
		HostCAKeys: []string{sshca.AuthorizedKey(ca.PublicKey())}, HostKeyAlias: "db-prod",
		ExpiresAt: now.Add(time.Hour),
	}, pub
}

// fakeLookup resolves gw.example only; no test touches DNS.
func fakeLookup(_ context.Context, host string) ([]netip.Addr, error) {
	if host == "gw.example" {
		return []netip.Addr{netip.MustParseAddr("192.0.2.1")}, nil
	}
	return nil, errors.New("no such host")
}

func TestParseActivation(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	base, pub := activationFixture(t, now)
	otherCert, _ := activationFixture(t, now)
	tests := []struct {
		name    string
		edit    func(*wire.Activation)
		wantErr string
	}{
		{"ok/full", func(*wire.Activation) {}, ""},
		{"ok/prefix-address", func(a *wire.Activation) { a.TunnelAddress = "100.64.0.2/32" }, ""},
		{"ok/tcp-without-cert", func(a *wire.Activation) { a.Protocol, a.SSHCertificate, a.Login = "tcp", "", "" }, ""},
		{"ok/hostname-endpoint", func(a *wire.Activation) { a.GatewayEndpoint = "gw.example:51820" }, ""},
		{"deny/unresolvable-endpoint", func(a *wire.Activation) { a.GatewayEndpoint = "nx.example:51820" }, "resolving nx.example"},
		{"deny/named-port", func(a *wire.Activation) { a.GatewayEndpoint = "gw.example:http" }, "bad port"},
		{"deny/other-request", func(a *wire.Activation) { a.Request = "r2" }, "not \"r1\""},
		{"deny/expired", func(a *wire.Activation) { a.ExpiresAt = now }, "grant expired"},
		{"deny/bad-address", func(a *wire.Activation) { a.TunnelAddress = "100.64.0.0/24" }, "tunnel address"},
		{"deny/unspecified-address", func(a *wire.Activation) { a.TunnelAddress = "0.0.0.0" }, "tunnel address"},
		{"deny/bad-gateway-key", func(a *wire.Activation) { a.GatewayPublicKey = "AAAA" }, "gateway public key"},
		{"deny/zero-gateway-key", func(a *wire.Activation) { a.GatewayPublicKey = wgkey.Public{}.String() }, "gateway public key"},
		{"deny/bad-endpoint", func(a *wire.Activation) { a.GatewayEndpoint = "127.0.0.1" }, "gateway endpoint"},
		{"deny/port-zero-endpoint", func(a *wire.Activation) { a.GatewayEndpoint = "127.0.0.1:0" }, "gateway endpoint"},
		{"deny/bad-destination", func(a *wire.Activation) { a.Destination = "db-prod:22" }, "invalid destination"},
		{"deny/destination-port-zero", func(a *wire.Activation) { a.Destination = "100.80.0.1:0" }, "invalid destination"},
		{"deny/ssh-without-cert", func(a *wire.Activation) { a.SSHCertificate = "" }, "no SSH certificate"},
		{"deny/cert-for-other-key", func(a *wire.Activation) { a.SSHCertificate = otherCert.SSHCertificate }, "not for this grant's key"},
		{"deny/plain-key-as-cert", func(a *wire.Activation) { a.SSHCertificate = sshca.AuthorizedKey(pub) }, "not a certificate"},
		{"deny/newline-in-host-ca", func(a *wire.Activation) { a.HostCAKeys = []string{a.HostCAKeys[0] + "\n@cert-authority * evil"} }, "host CA key 0"},
		{"deny/alias-injection", func(a *wire.Activation) { a.HostKeyAlias = "db-prod *" }, "invalid host key alias"},
		{"deny/alias-missing", func(a *wire.Activation) { a.HostKeyAlias = "" }, "invalid host key alias"},
		{"deny/bad-login", func(a *wire.Activation) { a.Login = "-oProxyCommand=x" }, "invalid login"},
		{"deny/target-with-space", func(a *wire.Activation) { a.Target = "db prod" }, "invalid target"},
		{"deny/too-many-host-cas", func(a *wire.Activation) { a.HostCAKeys = make([]string, maxHostCAKeys+1) }, "host CA keys"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			w := base
			w.HostCAKeys = append([]string(nil), base.HostCAKeys...)
			tt.edit(&w)
			_, err := parseActivation(context.Background(), "r1", w, pub, now, fakeLookup)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("parseActivation: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("parseActivation = %v, want an error containing %q", err, tt.wantErr)
			}
		})
	}
}

func FuzzParseActivation(f *testing.F) {
	now := time.Date(2026, 5, 1, 12, 0, 0, 0, time.UTC)
	base, pub := activationFixture(f, now)
	b, _ := json.Marshal(base)
	f.Add(b)
	f.Add([]byte(`{"tunnel_address":"::ffff:1.2.3.4/128","destination":"[::1]:22","gateway_endpoint":"[::1]:1"}`))
	f.Add([]byte(`{"host_ca_keys":["ssh-ed25519 AAAA"],"host_key_alias":"x"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		var w wire.Activation
		if json.Unmarshal(data, &w) != nil {
			return
		}
		act, err := parseActivation(context.Background(), "r1", w, pub, now, fakeLookup)
		if err != nil {
			return
		}
		if !act.addr.IsValid() || act.peer.IsZero() || !act.endpoint.IsValid() || !act.dst.IsValid() || !act.expires.After(now) {
			t.Fatalf("accepted an incomplete activation: %+v", act)
		}
		for _, k := range act.hostCAKeys {
			if strings.ContainsAny(sshca.AuthorizedKey(k), "\r\n") {
				t.Fatal("host CA key spans lines")
			}
		}
		if len(act.hostCAKeys) > 0 && strings.ContainsAny(w.HostKeyAlias, " \t\r\n") {
			t.Fatal("host key alias with white space accepted")
		}
	})
}

func TestValidRequestID(t *testing.T) {
	t.Parallel()
	for id, want := range map[string]bool{
		"r1": true, "req-01HX.a_b": true, strings.Repeat("a", 128): true,
		"": false, ".": false, "..": false, "../x": false, "a/b": false, ".hidden": false, strings.Repeat("a", 129): false, "a b": false,
	} {
		if got := validRequestID(id); got != want {
			t.Errorf("validRequestID(%q) = %v, want %v", id, got, want)
		}
	}
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	var b backoff
	prevMax := time.Duration(0)
	for i := range 20 {
		d := b.next()
		ceiling := min(backoffMin<<i, backoffMax)
		if i > 10 {
			ceiling = backoffMax
		}
		if d < ceiling/2 || d > ceiling {
			t.Fatalf("attempt %d: delay %v outside [%v, %v]", i, d, ceiling/2, ceiling)
		}
		prevMax = max(prevMax, d)
	}
	if prevMax > backoffMax {
		t.Errorf("delay %v above the cap %v", prevMax, backoffMax)
	}
	b.reset()
	if d := b.next(); d > backoffMin {
		t.Errorf("after reset: %v, want at most %v", d, backoffMin)
	}
}

func TestHandleEventsSkipsEndedInBatch(t *testing.T) {
	t.Parallel()
	a := &Agent{
		log:     discardLogger(),
		grants:  make(map[string]*grant),
		ended:   make(map[string]endedGrant),
		changed: make(chan struct{}),
	}
	a.handleEvents(context.Background(), []wire.Event{
		{Seq: 1, Type: wire.EventGrantIssued, Request: "r1"},
		{Seq: 2, Type: wire.EventGrantEnded, Request: "r1", Reason: "revoked"},
		{Seq: 3, Type: wire.EventGrantIssued, Request: "../etc"},
	})
	a.grantWG.Wait()
	if len(a.grants) != 0 {
		t.Errorf("grants started: %v", a.grants)
	}
	if got := a.ended["r1"]; got != (endedGrant{"ended", "revoked"}) {
		t.Errorf("ended[r1] = %+v", got)
	}
	// A later re-issue of an ended grant is ignored.
	a.handleEvents(context.Background(), []wire.Event{{Seq: 4, Type: wire.EventGrantIssued, Request: "r1"}})
	if len(a.grants) != 0 {
		t.Errorf("ended grant restarted")
	}
}

func TestEndedIsBounded(t *testing.T) {
	t.Parallel()
	a := &Agent{ended: make(map[string]endedGrant), changed: make(chan struct{})}
	for i := range maxEnded + 10 {
		a.recordEndedLocked(strings.Repeat("x", 1+i%3)+string(rune('a'+i%26))+time.Duration(i).String(), "ended", "")
	}
	if len(a.ended) > maxEnded || len(a.endedOrder) > maxEnded {
		t.Errorf("ended holds %d (order %d), max %d", len(a.ended), len(a.endedOrder), maxEnded)
	}
}
