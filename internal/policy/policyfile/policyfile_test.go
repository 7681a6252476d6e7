package policyfile

import (
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	"github.com/pinhole-dev/pinhole/internal/policy"
)

const edKey = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDtcTNrveQ3Vm7t4HCgCVd2AwJzWfrHxIzgH0UTuyECe host"

// base is a valid document; bad cases edit one line of it.
const base = `targets:
  - name: db-prod
    address: 10.0.4.12:22
    protocol: ssh
    login: postgres
    host_key: "` + edKey + `"
  - name: web
    address: web.example:443
    protocol: tcp
roles: [dba, approver]
rules:
  - name: dba-prod
    roles: [dba]
    targets: [db-prod, web]
    max_ttl: 1h
    approvals: 1
    approver_roles: [approver]
    pending_for: 15m
    posture: {max_age: 10m, disk_encryption: false, firewall: false}
`

var addrCmp = cmp.Comparer(func(a, b netip.Addr) bool { return a == b })

func TestParseGood(t *testing.T) {
	t.Parallel()
	got, err := Parse("cfg.yaml", []byte(base))
	if err != nil {
		t.Fatal(err)
	}
	want := &policy.Config{
		Targets: []policy.Target{
			{Name: "db-prod", Address: "10.0.4.12:22", Protocol: policy.ProtocolSSH, Login: "postgres", HostKey: edKey,
				TunnelIP: netip.MustParseAddr("10.0.4.12"), Line: 2},
			{Name: "web", Address: "web.example:443", Protocol: policy.ProtocolTCP, TunnelIP: netip.MustParseAddr("100.127.0.2"), Line: 7},
		},
		Roles: []policy.Role{{Name: "dba", Line: 10}, {Name: "approver", Line: 10}},
		Rules: []policy.Rule{{
			Name: "dba-prod", Roles: []string{"dba"}, Targets: []string{"db-prod", "web"}, MaxTTL: time.Hour, Approvals: 1,
			ApproverRoles: []string{"approver"}, PendingFor: 15 * time.Minute,
			Posture: policy.PostureRequirement{MaxAge: 10 * time.Minute}, Line: 12,
		}},
	}
	if diff := cmp.Diff(want, got, addrCmp); diff != "" {
		t.Errorf("Parse (-want +got):\n%s", diff)
	}
}

func TestParseForms(t *testing.T) {
	t.Parallel()
	doc := `
roles:
  - name: dba
  - approver          # plain string form mixed in
  - {name: lead}
targets:
  - {name: v6, address: "[2001:db8::7]:5432", protocol: tcp, tunnel_ip: 100.127.5.5}
rules:
  - name: r
    roles:
      - dba
    targets: [v6]
    max_ttl: 1h30m
    approver_roles: [approver, lead]
    posture:
      disk_encryption: true
`
	got, err := Parse("forms.yaml", []byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	want := &policy.Config{
		Targets: []policy.Target{{Name: "v6", Address: "[2001:db8::7]:5432", Protocol: policy.ProtocolTCP,
			TunnelIP: netip.MustParseAddr("100.127.5.5"), Line: 7}},
		Roles: []policy.Role{{Name: "dba", Line: 3}, {Name: "approver", Line: 4}, {Name: "lead", Line: 5}},
		Rules: []policy.Rule{{Name: "r", Roles: []string{"dba"}, Targets: []string{"v6"}, MaxTTL: 90 * time.Minute, Approvals: 1,
			ApproverRoles: []string{"approver", "lead"}, PendingFor: 15 * time.Minute,
			Posture: policy.PostureRequirement{MaxAge: 10 * time.Minute, DiskEncryption: true}, Line: 9}},
	}
	if diff := cmp.Diff(want, got, addrCmp); diff != "" {
		t.Errorf("Parse (-want +got):\n%s", diff)
	}
}

func TestParseEmpty(t *testing.T) {
	t.Parallel()
	for _, doc := range []string{"", "# nothing\n", "---\n", "targets:\nroles:\nrules:\n", "targets: []\n"} {
		c, err := Parse("empty.yaml", []byte(doc))
		if err != nil {
			t.Errorf("Parse(%q) = %v", doc, err)
			continue
		}
		if len(c.Targets)+len(c.Roles)+len(c.Rules) != 0 {
			t.Errorf("Parse(%q) = %+v, want empty", doc, c)
		}
	}
}

func TestMarshalRoundTrip(t *testing.T) {
	t.Parallel()
	for _, name := range []string{"base", "example"} {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			var c *policy.Config
			var err error
			if name == "base" {
				c, err = Parse("cfg.yaml", []byte(base))
			} else {
				c, err = Load(filepath.Join("..", "..", "..", "deploy", "config.example.yaml"))
			}
			if err != nil {
				t.Fatal(err)
			}
			out, err := Marshal(c)
			if err != nil {
				t.Fatal(err)
			}
			again, err := Parse("marshalled.yaml", out)
			if err != nil {
				t.Fatalf("Parse(Marshal(c)) = %v\n%s", err, out)
			}
			ignoreLines := cmpopts.IgnoreFields(policy.Target{}, "Line")
			ignore := cmp.Options{ignoreLines, cmpopts.IgnoreFields(policy.Role{}, "Line"), cmpopts.IgnoreFields(policy.Rule{}, "Line")}
			if diff := cmp.Diff(c, again, addrCmp, ignore); diff != "" {
				t.Errorf("round trip (-want +got):\n%s\n%s", diff, out)
			}
		})
	}
}

func TestExampleConfig(t *testing.T) {
	t.Parallel()
	c, err := Load(filepath.Join("..", "..", "..", "deploy", "config.example.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	pg, ok := c.Target("db-prod-pg")
	if !ok || pg.TunnelIP != netip.MustParseAddr("100.127.0.2") {
		t.Errorf("db-prod-pg = %+v, %v", pg, ok)
	}
	d := policy.Evaluate(c, policy.Input{Roles: []string{"vendor"}, Target: "db-prod", TTL: time.Minute, Reason: "x"})
	if d.Allow || d.Reason != "role vendor may not request db-prod" {
		t.Errorf("Evaluate = %+v", d)
	}
}

func TestParseBad(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		old, new string // replace old with new in base; old "" means new is the whole document
		want     string // the whole Error() text, or a prefix ending in "..."
	}{
		{"address/no port", "address: 10.0.4.12:22", "address: 10.0.4.12",
			`cfg.yaml:3: targets[0].address: missing port in "10.0.4.12", want host:port`},
		{"address/port range", "address: web.example:443", "address: web.example:70000",
			"cfg.yaml:8: targets[1].address: port 70000 is out of range 1-65535"},
		{"address/missing", "    address: web.example:443\n", "",
			"cfg.yaml:7: targets[1].address: is required (host:port)"},
		{"address/list", "address: web.example:443", "address: [a, b]",
			`cfg.yaml:8: targets[1].address: want a string, got a list`},
		{"target/unknown key", "    protocol: tcp\n", "    protocol: tcp\n    adress: x\n",
			`cfg.yaml:10: targets[1].adress: unknown key "adress" (known keys: address, host_key, login, name, protocol, tunnel_ip)`},
		{"target/duplicate key", "    protocol: tcp\n", "    protocol: tcp\n    protocol: ssh\n",
			`cfg.yaml:10: targets[1].protocol: key "protocol" appears twice`},
		{"target/protocol", "protocol: tcp", "protocol: udp",
			`cfg.yaml:9: targets[1].protocol: unknown protocol "udp", want ssh or tcp`},
		{"target/ssh without host key", `    host_key: "` + edKey + `"` + "\n", "",
			"cfg.yaml:2: targets[0].host_key: is required for ssh targets..."},
		{"target/bad host key", edKey, "ssh-ed25519 AAAA",
			"cfg.yaml:6: targets[0].host_key: key is truncated"},
		{"target/duplicate name", "name: web", "name: db-prod",
			`cfg.yaml:7: targets[1].name: target "db-prod" is already defined by targets[0]`},
		{"target/bad tunnel ip", "    protocol: tcp\n", "    protocol: tcp\n    tunnel_ip: 100.127.0.300\n",
			`cfg.yaml:10: targets[1].tunnel_ip: "100.127.0.300" is not an IP address`},
		{"target/loopback tunnel ip", "    protocol: tcp\n", "    protocol: tcp\n    tunnel_ip: 127.0.0.1\n",
			`cfg.yaml:10: targets[1].tunnel_ip: 127.0.0.1 cannot be a tunnel address`},
		{"target/not a mapping", "  - name: web\n    address: web.example:443\n    protocol: tcp\n", "  - web\n",
			`cfg.yaml:7: targets[1]: want a mapping of keys to values, got "web"`},
		{"targets/not a list", "", "targets: {a: 1}\n", "cfg.yaml:1: targets: want a list, got a mapping"},
		{"roles/unknown key", "roles: [dba, approver]", "roles: [dba, {nam: approver}]",
			`cfg.yaml:10: roles[1].nam: unknown key "nam" (known keys: name)`},
		{"roles/duplicate", "roles: [dba, approver]", "roles: [dba, approver, dba]",
			`cfg.yaml:10: roles[2].name: role "dba" is already defined by roles[0]`},
		{"roles/empty name", "roles: [dba, approver]", "roles: [dba, approver, {name: }]",
			`cfg.yaml:10: roles[2].name: name is required`},
		{"rule/unknown role", "roles: [dba]\n", "roles: [dba, dbas]\n",
			`cfg.yaml:13: rules[0].roles[1]: unknown role "dbas"`},
		{"rule/unknown target", "targets: [db-prod, web]", "targets: [db-prod,\n      webb]",
			`cfg.yaml:15: rules[0].targets[1]: unknown target "webb"`},
		{"rule/ttl too long", "max_ttl: 1h", "max_ttl: 48h",
			"cfg.yaml:15: rules[0].max_ttl: 48h exceeds the limit of 24h"},
		{"rule/ttl missing", "    max_ttl: 1h\n", "",
			"cfg.yaml:12: rules[0].max_ttl: is required (like 1h)"},
		{"rule/ttl not a duration", "max_ttl: 1h", "max_ttl: 60",
			`cfg.yaml:15: rules[0].max_ttl: want a duration like 45m or 1h30m, got "60"`},
		{"rule/approvals too many", "approvals: 1", "approvals: 9",
			"cfg.yaml:16: rules[0].approvals: must be 1 to 5, got 9"},
		{"rule/approvals not a number", "approvals: 1", "approvals: one",
			`cfg.yaml:16: rules[0].approvals: want a whole number, got "one"`},
		{"rule/approvals huge", "approvals: 1", "approvals: 99999999999999999999",
			`cfg.yaml:16: rules[0].approvals: want a whole number, got "99999999999999999999"`},
		{"rule/no approver roles", "approver_roles: [approver]", "approver_roles: []",
			"cfg.yaml:17: rules[0].approver_roles: must name at least one role"},
		{"rule/pending negative", "pending_for: 15m", "pending_for: -15m",
			"cfg.yaml:18: rules[0].pending_for: must be 1s to 24h, got -15m"},
		{"rule/posture unknown key", "firewall: false}", "firewall: false, screen_lock: true}",
			`cfg.yaml:19: rules[0].posture.screen_lock: unknown key "screen_lock" (known keys: disk_encryption, firewall, max_age)`},
		{"rule/posture bool", "firewall: false}", "firewall: yes}",
			`cfg.yaml:19: rules[0].posture.firewall: want true or false, got "yes"`},
		{"rule/posture quoted bool", "firewall: false}", `firewall: "true"}`,
			`cfg.yaml:19: rules[0].posture.firewall: want true or false, got "true"`},
		{"rule/posture max age", "max_age: 10m", "max_age: 0s",
			""}, // 0 means default: accepted
		{"top/unknown key", "", "target: []\n",
			`cfg.yaml:1: target: unknown key "target" (known keys: roles, rules, targets)`},
		{"top/not a mapping", "", "- a\n- b\n", "cfg.yaml:1: want a mapping of keys to values, got a list"},
		{"top/scalar", "", "hello\n", `cfg.yaml:1: want a mapping of keys to values, got "hello"`},
		{"yaml/syntax", "", "targets:\n  - name: [\n", "cfg.yaml:2: invalid YAML: did not find expected node content"},
		{"yaml/tabs", "", "targets:\n\t- name: x\n", "cfg.yaml:2: invalid YAML: found character that cannot start any token"},
		{"yaml/two documents", "", base + "---\nroles: []\n", "cfg.yaml:20: only one YAML document is allowed"},
		{"yaml/anchor", "roles: [dba, approver]", "roles: [&r dba, approver]", "cfg.yaml:10: YAML anchors and aliases are not supported"},
		{"yaml/alias", "roles: [dba]\n", "roles: &x [dba]\n    approver_roles: *x\n", "cfg.yaml:13: YAML anchors and aliases are not supported"},
		{"yaml/merge key", "", "a: &b {x: 1}\n<<: *b\n", "cfg.yaml:1: YAML anchors and aliases are not supported"},
		{"yaml/custom tag", "roles: [dba, approver]", "roles: [!custom dba, approver]", `cfg.yaml:10: YAML tag "!custom" is not supported`},
		{"yaml/non-string key", "", "1: x\n", "cfg.yaml:1: keys must be plain strings"},
		{"yaml/deep", "", strings.Repeat("[", 20) + strings.Repeat("]", 20) + "\n", "cfg.yaml:1: nesting is deeper than 16 levels"},
	}
	for _, tt := range tests {
		t.Run("deny/"+tt.name, func(t *testing.T) {
			t.Parallel()
			doc := tt.new
			if tt.old != "" {
				if !strings.Contains(base, tt.old) {
					t.Fatalf("base does not contain %q", tt.old)
				}
				doc = strings.Replace(base, tt.old, tt.new, 1)
			}
			_, err := Parse("cfg.yaml", []byte(doc))
			if tt.want == "" {
				if err != nil {
					t.Fatalf("Parse = %v, want success", err)
				}
				return
			}
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("Parse = %v (%T), want *Error", err, err)
			}
			got := err.Error()
			if prefix, ok := strings.CutSuffix(tt.want, "..."); ok {
				if !strings.HasPrefix(got, prefix) {
					t.Errorf("Parse error = %q, want prefix %q", got, prefix)
				}
			} else if got != tt.want {
				t.Errorf("Parse error:\n got %q\nwant %q", got, tt.want)
			}
		})
	}
}

func TestErrorUnwrapsFieldError(t *testing.T) {
	t.Parallel()
	_, err := Parse("cfg.yaml", []byte(strings.Replace(base, "approvals: 1", "approvals: 7", 1)))
	var fe *policy.FieldError
	if !errors.As(err, &fe) || fe.Field != "rules[0].approvals" || fe.Line != 12 {
		t.Errorf("errors.As FieldError = %+v from %v", fe, err)
	}
}

func TestLoad(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name string, data []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	good := write("good.yaml", []byte(base))
	if c, err := Load(good); err != nil || len(c.Targets) != 2 {
		t.Fatalf("Load(good) = %v, %v", c, err)
	}
	bad := write("bad.yaml", []byte(strings.Replace(base, "max_ttl: 1h", "max_ttl: 0h", 1)))
	if _, err := Load(bad); err == nil || err.Error() != bad+":15: rules[0].max_ttl: is required (like 1h)" {
		t.Errorf("Load(bad) = %v", err)
	}
	big := write("big.yaml", []byte(base+strings.Repeat("#", MaxSize)))
	if _, err := Load(big); err == nil || !strings.Contains(err.Error(), "larger than 1048576 bytes") {
		t.Errorf("Load(big) = %v", err)
	}
	if _, err := Load(dir); err == nil || !strings.Contains(err.Error(), "not a regular file") {
		t.Errorf("Load(dir) = %v", err)
	}
	if _, err := Load(filepath.Join(dir, "missing.yaml")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Load(missing) = %v, want ErrNotExist", err)
	}
}

func FuzzParse(f *testing.F) {
	f.Add([]byte(base))
	if ex, err := os.ReadFile(filepath.Join("..", "..", "..", "deploy", "config.example.yaml")); err == nil {
		f.Add(ex)
	}
	f.Add([]byte("roles: [a, {name: b}]\nrules: [{name: r, roles: [a], targets: [t], max_ttl: 1h, approver_roles: [b]}]\ntargets: [{name: t, address: \"[::1]:1\", protocol: tcp}]\n"))
	f.Add([]byte("a: &a [*a]\n"))
	f.Add([]byte("targets:\n  - name: x\n    address: 1.2.3.4:99999\n    tunnel_ip: \"::ffff:1.2.3.4\"\n"))
	f.Add([]byte("--- !!map\n? [a]\n: b\n...\n---\n"))
	f.Add([]byte("rules:\n  - posture: {max_age: -1ns}\n    approvals: 0x10\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := Parse("fuzz.yaml", data)
		if err != nil {
			var pe *Error
			if !errors.As(err, &pe) {
				t.Fatalf("Parse returned %T, want *Error: %v", err, err)
			}
			return
		}
		// What parses must marshal and parse back to an equal config.
		out, err := Marshal(c)
		if err != nil {
			t.Fatalf("Marshal: %v", err)
		}
		again, err := Parse("again.yaml", out)
		if err != nil {
			t.Fatalf("Parse(Marshal(c)) = %v\n%s", err, out)
		}
		if len(again.Targets) != len(c.Targets) || len(again.Rules) != len(c.Rules) || len(again.Roles) != len(c.Roles) {
			t.Fatalf("round trip changed the config")
		}
	})
}
