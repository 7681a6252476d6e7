package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

const (
	edKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDtcTNrveQ3Vm7t4HCgCVd2AwJzWfrHxIzgH0UTuyECe host"
	caKey = "@cert-authority ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBLGXtXq3N+JVWtHCEpGDFzKOX/GwwfglYNZAIOTXf2g3Mn5DS5xFxIeoR/jhRAR8Il0oZZmTf9S6aL+k62oF21Y= host-ca"
)

var addrCmp = cmp.Comparer(func(a, b netip.Addr) bool { return a == b })

// goodConfig is a valid, not yet normalized config.
func goodConfig() *Config {
	return &Config{
		Targets: []Target{
			{Name: "db-prod", Address: "10.0.4.12:22", Protocol: ProtocolSSH, Login: "postgres", HostKey: edKey, Line: 2},
			{Name: "db-prod-pg", Address: "10.0.4.12:5432", Protocol: ProtocolTCP, Line: 8},
			{Name: "web", Address: "web.internal.example:443", Protocol: ProtocolTCP, Line: 11},
			{Name: "local", Address: "127.0.0.1:2222", Protocol: ProtocolSSH, Login: "root", HostKey: caKey, Line: 14},
			{Name: "v6", Address: "[2001:db8::7]:22", Protocol: ProtocolTCP, Line: 18},
			{Name: "fixed", Address: "db.example:5432", Protocol: ProtocolTCP, TunnelIP: netip.MustParseAddr("100.127.9.9"), Line: 20},
		},
		Roles: []Role{{Name: "dba", Line: 23}, {Name: "vendor", Line: 24}, {Name: "approver", Line: 25}, {Name: "lead", Line: 26}},
		Rules: []Rule{
			{Name: "dba-prod", Roles: []string{"dba"}, Targets: []string{"db-prod", "db-prod-pg"}, MaxTTL: time.Hour,
				ApproverRoles: []string{"approver"}, Posture: PostureRequirement{DiskEncryption: true, Firewall: true}, Line: 28},
			{Name: "vendor-web", Roles: []string{"vendor"}, Targets: []string{"web"}, MaxTTL: 30 * time.Minute, Approvals: 2,
				ApproverRoles: []string{"approver", "lead"}, PendingFor: 5 * time.Minute, Posture: PostureRequirement{MaxAge: 2 * time.Minute}, Line: 36},
			{Name: "dba-all", Roles: []string{"dba", "lead"}, Targets: []string{"web", "local", "v6", "fixed", "db-prod"}, MaxTTL: 24 * time.Hour,
				Approvals: 5, ApproverRoles: []string{"lead"}, Line: 44},
		},
	}
}

func TestNormalizeGood(t *testing.T) {
	t.Parallel()
	c := goodConfig()
	if err := c.Normalize(); err != nil {
		t.Fatalf("Normalize = %v", err)
	}
	want := goodConfig()
	ips := []string{"10.0.4.12", "100.127.0.2", "100.127.0.3", "100.127.0.4", "100.127.0.5", "100.127.9.9"}
	for i, ip := range ips {
		want.Targets[i].TunnelIP = netip.MustParseAddr(ip)
	}
	want.Rules[0].Approvals, want.Rules[0].PendingFor, want.Rules[0].Posture.MaxAge = 1, 15*time.Minute, 10*time.Minute
	want.Rules[2].PendingFor, want.Rules[2].Posture.MaxAge = 15*time.Minute, 10*time.Minute
	if diff := cmp.Diff(want, c, addrCmp); diff != "" {
		t.Errorf("Normalize (-want +got):\n%s", diff)
	}
	// Normalize is idempotent.
	again := *c
	if err := again.Normalize(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(c, &again, addrCmp); diff != "" {
		t.Errorf("second Normalize changed the config:\n%s", diff)
	}
	tg, ok := c.Target("db-prod-pg")
	if !ok || tg.Port() != 5432 || tg.Host() != "10.0.4.12" || tg.TunnelAddrPort() != netip.MustParseAddrPort("100.127.0.2:5432") {
		t.Errorf("Target(db-prod-pg) = %+v, %v", tg, ok)
	}
	if v6, _ := c.Target("v6"); v6.Host() != "2001:db8::7" || v6.Port() != 22 {
		t.Errorf("v6 host/port = %q %d", v6.Host(), v6.Port())
	}
	if _, ok := c.Target("nope"); ok {
		t.Error("Target(nope) found")
	}
	if r, ok := c.Rule("vendor-web"); !ok || r.Approvals != 2 {
		t.Errorf("Rule(vendor-web) = %+v, %v", r, ok)
	}
}

func TestNormalizeEmpty(t *testing.T) {
	t.Parallel()
	var c Config
	if err := c.Normalize(); err != nil {
		t.Errorf("empty config: %v", err)
	}
	if d := Evaluate(&c, Input{Target: "x"}); d.Allow {
		t.Error("empty config allowed a request")
	}
}

func TestNormalizeBad(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		mutate func(c *Config)
		line   int
		field  string
		msg    string
	}{
		{"target/no name", func(c *Config) { c.Targets[1].Name = "" }, 8, "targets[1].name", "name is required"},
		{"target/bad name", func(c *Config) { c.Targets[1].Name = "-db" }, 8, "targets[1].name", "must be letters"},
		{"target/name with space", func(c *Config) { c.Targets[1].Name = "db prod" }, 8, "targets[1].name", "must be letters"},
		{"target/long name", func(c *Config) { c.Targets[1].Name = strings.Repeat("a", 64) }, 8, "targets[1].name", "longer than 63"},
		{"target/duplicate name", func(c *Config) { c.Targets[2].Name = "db-prod" }, 11, "targets[2].name", `target "db-prod" is already defined by targets[0]`},
		{"target/no address", func(c *Config) { c.Targets[0].Address = "" }, 2, "targets[0].address", "is required"},
		{"target/no port", func(c *Config) { c.Targets[0].Address = "10.0.4.12" }, 2, "targets[0].address", "missing port"},
		{"target/empty port", func(c *Config) { c.Targets[0].Address = "10.0.4.12:" }, 2, "targets[0].address", "missing port"},
		{"target/port zero", func(c *Config) { c.Targets[0].Address = "10.0.4.12:0" }, 2, "targets[0].address", "out of range"},
		{"target/port too big", func(c *Config) { c.Targets[0].Address = "10.0.4.12:65536" }, 2, "targets[0].address", "out of range"},
		{"target/port not number", func(c *Config) { c.Targets[0].Address = "10.0.4.12:ssh" }, 2, "targets[0].address", "not a number"},
		{"target/port negative", func(c *Config) { c.Targets[0].Address = "10.0.4.12:-1" }, 2, "targets[0].address", "not a number"},
		{"target/no host", func(c *Config) { c.Targets[0].Address = ":22" }, 2, "targets[0].address", "missing host"},
		{"target/v6 without brackets", func(c *Config) { c.Targets[0].Address = "2001:db8::1:22" }, 2, "targets[0].address", "needs brackets"},
		{"target/v4 in brackets", func(c *Config) { c.Targets[0].Address = "[10.0.0.1]:22" }, 2, "targets[0].address", "not an IPv6"},
		{"target/unclosed bracket", func(c *Config) { c.Targets[0].Address = "[2001:db8::1:22" }, 2, "targets[0].address", "missing ']'"},
		{"target/bad ip", func(c *Config) { c.Targets[0].Address = "10.0.4.300:22" }, 2, "targets[0].address", "not a valid IP address or host name"},
		{"target/bad host", func(c *Config) { c.Targets[0].Address = "db_$:22" }, 2, "targets[0].address", "not a valid IP address or host name"},
		{"target/host label dash", func(c *Config) { c.Targets[0].Address = "-db.example:22" }, 2, "targets[0].address", "not a valid host name"},
		{"target/no protocol", func(c *Config) { c.Targets[1].Protocol = "" }, 8, "targets[1].protocol", "is required"},
		{"target/unknown protocol", func(c *Config) { c.Targets[1].Protocol = "udp" }, 8, "targets[1].protocol", `unknown protocol "udp"`},
		{"target/postgres not yet", func(c *Config) { c.Targets[1].Protocol = "postgres" }, 8, "targets[1].protocol", "need the PostgreSQL statement recorder"},
		{"target/v6 tunnel ip", func(c *Config) { c.Targets[5].TunnelIP = netip.MustParseAddr("2001:db8::9") }, 20, "targets[5].tunnel_ip", "not an IPv4 address"},
		{"target/ssh without login", func(c *Config) { c.Targets[0].Login = "" }, 2, "targets[0].login", "required for ssh"},
		{"target/ssh bad login", func(c *Config) { c.Targets[0].Login = "root;rm" }, 2, "targets[0].login", "not a valid account name"},
		{"target/ssh without host key", func(c *Config) { c.Targets[0].HostKey = "" }, 2, "targets[0].host_key", "required for ssh"},
		{"target/host key garbage", func(c *Config) { c.Targets[0].HostKey = "hello" }, 2, "targets[0].host_key", "want an authorized_keys line"},
		{"target/host key type", func(c *Config) { c.Targets[0].HostKey = "ssh-dss AAAA" }, 2, "targets[0].host_key", `unsupported key type "ssh-dss"`},
		{"target/host key base64", func(c *Config) { c.Targets[0].HostKey = "ssh-ed25519 !!!" }, 2, "targets[0].host_key", "not valid base64"},
		{"target/host key type mismatch", func(c *Config) { c.Targets[0].HostKey = "ssh-rsa " + strings.Fields(edKey)[1] }, 2, "targets[0].host_key", "not a ssh-rsa key"},
		{"target/host key truncated", func(c *Config) { c.Targets[0].HostKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5" }, 2, "targets[0].host_key", "truncated"},
		{"target/host key bad marker", func(c *Config) { c.Targets[0].HostKey = "@revoked " + edKey }, 2, "targets[0].host_key", "unknown marker"},
		{"target/host key two lines", func(c *Config) { c.Targets[0].HostKey = edKey + "\n" + edKey }, 2, "targets[0].host_key", "single line"},
		{"target/host key too long", func(c *Config) { c.Targets[0].HostKey = edKey + strings.Repeat(" ", MaxHostKeyLen) }, 2, "targets[0].host_key", "longer than"},
		{"target/login on tcp", func(c *Config) { c.Targets[1].Login = "x" }, 8, "targets[1].login", "only for ssh"},
		{"target/host key on tcp", func(c *Config) { c.Targets[1].HostKey = edKey }, 8, "targets[1].host_key", "only for ssh"},
		{"target/loopback tunnel ip", func(c *Config) { c.Targets[5].TunnelIP = netip.MustParseAddr("127.0.0.5") }, 20, "targets[5].tunnel_ip", "cannot be a tunnel address"},
		{"target/duplicate explicit tunnel ip", func(c *Config) {
			c.Targets[2].TunnelIP = netip.MustParseAddr("100.127.9.9")
		}, 20, "targets[5].tunnel_ip", "also used by targets[2] (web)"},
		{"target/pool address taken by explicit", func(c *Config) {
			c.Targets[5].TunnelIP = netip.MustParseAddr("100.127.0.3")
		}, 11, "targets[2].tunnel_ip", "pool address 100.127.0.3 for this target is used by targets[5] (fixed); set tunnel_ip"},
		{"target/too many", func(c *Config) { c.Targets = make([]Target, MaxTargets+1) }, 0, "targets", "more than 4096"},
		{"role/no name", func(c *Config) { c.Roles[2].Name = "" }, 25, "roles[2].name", "name is required"},
		{"role/duplicate", func(c *Config) { c.Roles[3].Name = "dba" }, 26, "roles[3].name", `role "dba" is already defined by roles[0]`},
		{"role/too many", func(c *Config) { c.Roles = make([]Role, MaxRoles+1) }, 0, "roles", "more than 1024"},
		{"rule/no name", func(c *Config) { c.Rules[1].Name = "" }, 36, "rules[1].name", "name is required"},
		{"rule/duplicate", func(c *Config) { c.Rules[2].Name = "dba-prod" }, 44, "rules[2].name", "already defined by rules[0]"},
		{"rule/no roles", func(c *Config) { c.Rules[0].Roles = nil }, 28, "rules[0].roles", "at least one role"},
		{"rule/unknown role", func(c *Config) { c.Rules[0].Roles = []string{"dba", "dbaa"} }, 28, "rules[0].roles[1]", `unknown role "dbaa"`},
		{"rule/empty role", func(c *Config) { c.Rules[0].Roles = []string{""} }, 28, "rules[0].roles[0]", "empty role name"},
		{"rule/duplicate role", func(c *Config) { c.Rules[0].Roles = []string{"dba", "dba"} }, 28, "rules[0].roles[1]", "listed twice"},
		{"rule/no targets", func(c *Config) { c.Rules[0].Targets = nil }, 28, "rules[0].targets", "at least one target"},
		{"rule/unknown target", func(c *Config) { c.Rules[1].Targets = []string{"webb"} }, 36, "rules[1].targets[0]", `unknown target "webb"`},
		{"rule/too many targets", func(c *Config) { c.Rules[1].Targets = make([]string, MaxListLen+1) }, 36, "rules[1].targets", "more than 1024 entries"},
		{"rule/no max_ttl", func(c *Config) { c.Rules[0].MaxTTL = 0 }, 28, "rules[0].max_ttl", "is required"},
		{"rule/negative max_ttl", func(c *Config) { c.Rules[0].MaxTTL = -time.Hour }, 28, "rules[0].max_ttl", "must be at least 1s, got -1h"},
		{"rule/tiny max_ttl", func(c *Config) { c.Rules[0].MaxTTL = time.Nanosecond }, 28, "rules[0].max_ttl", "must be at least 1s, got 1ns"},
		{"rule/max_ttl over a day", func(c *Config) { c.Rules[0].MaxTTL = 25 * time.Hour }, 28, "rules[0].max_ttl", "25h exceeds the limit of 24h"},
		{"rule/approvals 6", func(c *Config) { c.Rules[0].Approvals = 6 }, 28, "rules[0].approvals", "must be 1 to 5, got 6"},
		{"rule/approvals negative", func(c *Config) { c.Rules[0].Approvals = -1 }, 28, "rules[0].approvals", "must be 1 to 5, got -1"},
		{"rule/no approver roles", func(c *Config) { c.Rules[0].ApproverRoles = nil }, 28, "rules[0].approver_roles", "at least one role"},
		{"rule/unknown approver role", func(c *Config) { c.Rules[0].ApproverRoles = []string{"boss"} }, 28, "rules[0].approver_roles[0]", `unknown role "boss"`},
		{"rule/negative pending_for", func(c *Config) { c.Rules[0].PendingFor = -time.Minute }, 28, "rules[0].pending_for", "must be 1s to 24h"},
		{"rule/tiny pending_for", func(c *Config) { c.Rules[0].PendingFor = time.Nanosecond }, 28, "rules[0].pending_for", "must be 1s to 24h, got 1ns"},
		{"rule/pending_for too long", func(c *Config) { c.Rules[0].PendingFor = 48 * time.Hour }, 28, "rules[0].pending_for", "1s to 24h, got 48h"},
		{"rule/negative posture age", func(c *Config) { c.Rules[0].Posture.MaxAge = -1 }, 28, "rules[0].posture.max_age", "must be 1s to 24h"},
		{"rule/posture age too long", func(c *Config) { c.Rules[0].Posture.MaxAge = 25 * time.Hour }, 28, "rules[0].posture.max_age", "1s to 24h, got 25h"},
		{"rule/too many", func(c *Config) { c.Rules = make([]Rule, MaxRules+1) }, 0, "rules", "more than 4096"},
	}
	for _, tt := range tests {
		t.Run("deny/"+tt.name, func(t *testing.T) {
			t.Parallel()
			c := goodConfig()
			tt.mutate(c)
			err := c.Normalize()
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("Normalize = %v, want *FieldError", err)
			}
			if fe.Line != tt.line || fe.Field != tt.field || !strings.Contains(fe.Msg, tt.msg) {
				t.Errorf("Normalize = {%d %q %q}, want {%d %q ~%q}", fe.Line, fe.Field, fe.Msg, tt.line, tt.field, tt.msg)
			}
			want := fmt.Sprintf("line %d: %s: ", tt.line, tt.field)
			if tt.line == 0 {
				want = tt.field + ": "
			}
			if !strings.HasPrefix(err.Error(), want) {
				t.Errorf("Error() = %q, want prefix %q", err, want)
			}
		})
	}
}

func TestTunnelIPs(t *testing.T) {
	t.Parallel()
	var c Config
	for i := range 300 {
		c.Targets = append(c.Targets, Target{Name: fmt.Sprintf("t%d", i), Address: fmt.Sprintf("host%d.example:22", i), Protocol: ProtocolTCP})
	}
	c.Targets[7].Address = "0.0.0.0:80"
	c.Targets[8].Address = "[::1]:80"
	c.Targets[9].Address = "[::ffff:10.1.2.3]:80"
	c.Targets[10].Address = "10.1.2.3:81" // same host as 9
	if err := c.Normalize(); err != nil {
		t.Fatal(err)
	}
	want := map[int]string{
		0: "100.127.0.1", 7: "100.127.0.8", 8: "100.127.0.9", 9: "10.1.2.3", 10: "100.127.0.11",
		254: "100.127.0.255", 255: "100.127.1.0", 299: "100.127.1.44",
	}
	for i, ip := range want {
		if got := c.Targets[i].TunnelIP; got != netip.MustParseAddr(ip) {
			t.Errorf("targets[%d].TunnelIP = %s, want %s", i, got, ip)
		}
	}
}

func TestFmtDuration(t *testing.T) {
	t.Parallel()
	for d, want := range map[time.Duration]string{
		time.Hour: "1h", 2*time.Hour + 30*time.Minute: "2h30m", 45 * time.Minute: "45m",
		12*time.Minute + 30*time.Second: "12m30s", 90 * time.Second: "1m30s", time.Second: "1s",
		1500 * time.Millisecond: "1.5s", 0: "0s", 25 * time.Hour: "25h", time.Hour + time.Second: "1h0m1s",
	} {
		if got := fmtDuration(d); got != want {
			t.Errorf("fmtDuration(%v) = %q, want %q", d, got, want)
		}
	}
}

func TestEvaluate(t *testing.T) {
	t.Parallel()
	c := goodConfig()
	if err := c.Normalize(); err != nil {
		t.Fatal(err)
	}
	now := time.Date(2026, 3, 14, 9, 0, 0, 0, time.UTC)
	healthy := &PostureFacts{CollectedAt: now.Add(-time.Minute), DiskEncrypted: true, FirewallActive: true}
	base := Input{Roles: []string{"dba"}, Target: "db-prod", TTL: 45 * time.Minute, Reason: "INC-4821 vacuum", Posture: healthy, Now: now}
	dbaProd := Decision{Allow: true, Rule: "dba-prod", MaxTTL: time.Hour, Approvals: 1, ApproverRoles: []string{"approver"}, PendingFor: 15 * time.Minute}
	refused := func(reason string) Decision { d := dbaProd; d.Allow, d.Reason = false, reason; return d }
	tests := []struct {
		name   string
		mutate func(in *Input)
		want   Decision
	}{
		{"ok/dba on db-prod", func(*Input) {}, dbaProd},
		{"ok/ttl at max", func(in *Input) { in.TTL = time.Hour }, dbaProd},
		{"ok/first matching rule wins", func(in *Input) { in.Roles = []string{"lead", "dba"} }, dbaProd},
		{"ok/second rule by role", func(in *Input) { in.Roles = []string{"lead"}; in.TTL = 20 * time.Hour }, Decision{
			Allow: true, Rule: "dba-all", MaxTTL: 24 * time.Hour, Approvals: 5, ApproverRoles: []string{"lead"}, PendingFor: 15 * time.Minute}},
		{"ok/vendor", func(in *Input) {
			in.Roles, in.Target, in.TTL = []string{"vendor"}, "web", 30*time.Minute
			in.Posture = &PostureFacts{CollectedAt: now.Add(-2 * time.Minute)}
		}, Decision{Allow: true, Rule: "vendor-web", MaxTTL: 30 * time.Minute, Approvals: 2, ApproverRoles: []string{"approver", "lead"}, PendingFor: 5 * time.Minute}},
		{"ok/posture slightly in the future", func(in *Input) { p := *healthy; p.CollectedAt = now.Add(MaxPostureSkew); in.Posture = &p }, dbaProd},
		{"deny/unknown target", func(in *Input) { in.Target = "db-prodd"; in.Reason = "" }, Decision{Reason: `unknown target "db-prodd"`}},
		{"deny/role may not", func(in *Input) { in.Roles = []string{"vendor"}; in.Reason = "" }, Decision{Reason: "role vendor may not request db-prod"}},
		{"deny/roles may not", func(in *Input) { in.Roles = []string{"vendor", "approver"} }, Decision{Reason: "roles vendor, approver may not request db-prod"}},
		{"deny/no roles", func(in *Input) { in.Roles = nil }, Decision{Reason: "you hold no role that may request db-prod"}},
		{"deny/no reason", func(in *Input) { in.Reason = "  "; in.TTL = 5 * time.Hour; in.Posture = nil }, refused("a reason is required")},
		{"deny/long reason", func(in *Input) { in.Reason = strings.Repeat("x", 501) }, refused("reason is 501 bytes, the limit is 500")},
		{"deny/ttl over max", func(in *Input) { in.TTL = 2 * time.Hour; in.Posture = nil }, refused("requested 2h exceeds max 1h of rule dba-prod")},
		{"deny/ttl zero", func(in *Input) { in.TTL = 0 }, refused("requested duration must be at least 1s")},
		{"deny/ttl 1ns", func(in *Input) { in.TTL = time.Nanosecond }, refused("requested duration must be at least 1s")},
		{"deny/no posture", func(in *Input) { in.Posture = nil }, refused("no signed posture report from this device")},
		{"deny/stale posture", func(in *Input) { p := *healthy; p.CollectedAt = now.Add(-12 * time.Minute); in.Posture = &p },
			refused("posture report is 12m old, rule dba-prod allows 10m")},
		{"deny/posture just over", func(in *Input) {
			p := *healthy
			p.CollectedAt = now.Add(-10*time.Minute - time.Millisecond)
			in.Posture = &p
		},
			refused("posture report is 10m1s old, rule dba-prod allows 10m")},
		{"deny/posture from the future", func(in *Input) { p := *healthy; p.CollectedAt = now.Add(5 * time.Minute); in.Posture = &p },
			refused("posture report is dated 5m in the future; check the device clock")},
		{"deny/disk", func(in *Input) { p := *healthy; p.DiskEncrypted, p.FirewallActive = false, false; in.Posture = &p },
			refused("disk encryption is off, rule dba-prod requires it")},
		{"deny/firewall", func(in *Input) { p := *healthy; p.FirewallActive = false; in.Posture = &p },
			refused("firewall is off, rule dba-prod requires it")},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			in := base
			tt.mutate(&in)
			got := Evaluate(c, in)
			if diff := cmp.Diff(tt.want, got); diff != "" {
				t.Errorf("Evaluate (-want +got):\n%s", diff)
			}
		})
	}
	if d := Evaluate(nil, base); d.Allow || d.Reason == "" {
		t.Errorf("Evaluate(nil) = %+v", d)
	}
}
