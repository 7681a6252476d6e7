package policy

import (
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"unicode/utf8"
)

// Normalize fills defaults into c and validates it, returning a
// *FieldError for the first problem found (targets first, then roles,
// then rules, each in order).
//
// Defaults: a rule's Approvals 0 becomes DefaultApprovals, PendingFor 0
// becomes DefaultPendingFor, Posture.MaxAge 0 becomes DefaultPostureMaxAge.
//
// Checks: names are 1-63 of [A-Za-z0-9._-] starting with a letter or digit
// and unique within their kind; a target's address is host:port with a
// valid IP literal or DNS name and a port 1-65535; its protocol is ssh or tcp;
// ssh targets have a login and a host_key in authorized_keys format, other
// targets have neither; rules name at least one existing role, target and
// approver role; max_ttl is positive and at most MaxTTL; approvals are 1 to
// MaxApprovals; pending_for and posture max_age are positive and at most a
// day.
//
// Tunnel addresses are IPv4 (the tunnels carry IPv4 only; a target's own
// address may be IPv6). A target without TunnelIP gets the IP of its address
// when that is an IPv4 literal that is not loopback or unspecified and no
// earlier target already uses it (two targets on one host get distinct
// tunnel addresses). Otherwise it gets the address at offset index+1 in
// TunnelPrefix (100.127.0.0/16), where index is the target's position in
// Targets: targets[0] gets 100.127.0.1, targets[255] gets 100.127.1.0.
// Reordering targets therefore changes pool addresses. Explicit TunnelIPs
// are kept. All tunnel addresses must be unique.
func (c *Config) Normalize() error {
	if err := c.normalizeTargets(); err != nil {
		return err
	}
	if err := c.normalizeRoles(); err != nil {
		return err
	}
	return c.normalizeRules()
}

func (c *Config) normalizeTargets() error {
	if len(c.Targets) > MaxTargets {
		return &FieldError{Field: "targets", Msg: fmt.Sprintf("more than %d targets", MaxTargets)}
	}
	names := make(map[string]int, len(c.Targets))
	for i := range c.Targets {
		t := &c.Targets[i]
		f := func(name string) string { return fmt.Sprintf("targets[%d].%s", i, name) }
		fail := func(field, format string, args ...any) error {
			return &FieldError{Line: t.Line, Field: f(field), Msg: fmt.Sprintf(format, args...)}
		}
		if msg := checkName(t.Name); msg != "" {
			return fail("name", "%s", msg)
		}
		if j, dup := names[t.Name]; dup {
			return fail("name", "target %q is already defined by targets[%d]", t.Name, j)
		}
		names[t.Name] = i
		if t.Address == "" {
			return fail("address", "is required (host:port)")
		}
		host, _, err := splitHostPort(t.Address)
		if err != nil {
			return fail("address", "%v", err)
		}
		if _, ipErr := netip.ParseAddr(host); ipErr != nil {
			if msg := checkHostname(host); msg != "" {
				return fail("address", "host %q %s", host, msg)
			}
		}
		switch {
		case t.Protocol == "":
			return fail("protocol", "is required (ssh or tcp)")
		case t.Protocol == "postgres":
			// Refused rather than spliced: a postgres target promises the
			// statement recorder, which this version does not have yet.
			return fail("protocol", "postgres targets need the PostgreSQL statement recorder, which this version does not have; use tcp to splice the bytes unrecorded")
		case !t.Protocol.Valid():
			return fail("protocol", "unknown protocol %q, want ssh or tcp", t.Protocol)
		}
		if t.Protocol == ProtocolSSH {
			if t.Login == "" {
				return fail("login", "is required for ssh targets")
			}
			if msg := checkLogin(t.Login); msg != "" {
				return fail("login", "%s", msg)
			}
			if t.HostKey == "" {
				return fail("host_key", "is required for ssh targets (an authorized_keys line, or \"@cert-authority \" and the host CA's key)")
			}
			if msg := checkHostKey(t.HostKey); msg != "" {
				return fail("host_key", "%s", msg)
			}
		} else {
			if t.Login != "" {
				return fail("login", "is only for ssh targets")
			}
			if t.HostKey != "" {
				return fail("host_key", "is only for ssh targets")
			}
		}
		if t.TunnelIP.IsValid() {
			t.TunnelIP = t.TunnelIP.Unmap()
			if !t.TunnelIP.Is4() {
				return fail("tunnel_ip", "%s is not an IPv4 address (tunnels carry IPv4 only)", t.TunnelIP)
			}
			if !usableTunnelIP(t.TunnelIP) {
				return fail("tunnel_ip", "%s cannot be a tunnel address", t.TunnelIP)
			}
		}
	}
	return c.assignTunnelIPs()
}

func usableTunnelIP(a netip.Addr) bool {
	return a.IsValid() && !a.IsUnspecified() && !a.IsLoopback() && !a.IsMulticast() &&
		!a.IsLinkLocalUnicast() && !(a.Is4() && a == netip.AddrFrom4([4]byte{255, 255, 255, 255}))
}

func (c *Config) assignTunnelIPs() error {
	used := make(map[netip.Addr]int, len(c.Targets))
	for i, t := range c.Targets {
		if !t.TunnelIP.IsValid() {
			continue
		}
		if j, dup := used[t.TunnelIP]; dup {
			return &FieldError{Line: t.Line, Field: fmt.Sprintf("targets[%d].tunnel_ip", i),
				Msg: fmt.Sprintf("tunnel address %s is also used by targets[%d] (%s)", t.TunnelIP, j, c.Targets[j].Name)}
		}
		used[t.TunnelIP] = i
	}
	for i := range c.Targets {
		t := &c.Targets[i]
		if t.TunnelIP.IsValid() {
			continue
		}
		if a, err := netip.ParseAddr(t.Host()); err == nil {
			a = a.Unmap()
			if _, taken := used[a]; !taken && a.Is4() && usableTunnelIP(a) {
				t.TunnelIP = a
				used[a] = i
				continue
			}
		}
		a := poolAddr(i)
		if j, taken := used[a]; taken {
			return &FieldError{Line: t.Line, Field: fmt.Sprintf("targets[%d].tunnel_ip", i),
				Msg: fmt.Sprintf("the pool address %s for this target is used by targets[%d] (%s); set tunnel_ip", a, j, c.Targets[j].Name)}
		}
		t.TunnelIP = a
		used[a] = i
	}
	return nil
}

// poolAddr returns the address at offset index+1 in TunnelPrefix.
func poolAddr(index int) netip.Addr {
	base := TunnelPrefix.Addr().As4()
	n := binary.BigEndian.Uint32(base[:]) + uint32(index) + 1
	var b [4]byte
	binary.BigEndian.PutUint32(b[:], n)
	return netip.AddrFrom4(b)
}

func (c *Config) normalizeRoles() error {
	if len(c.Roles) > MaxRoles {
		return &FieldError{Field: "roles", Msg: fmt.Sprintf("more than %d roles", MaxRoles)}
	}
	names := make(map[string]int, len(c.Roles))
	for i, r := range c.Roles {
		field := fmt.Sprintf("roles[%d].name", i)
		if msg := checkName(r.Name); msg != "" {
			return &FieldError{Line: r.Line, Field: field, Msg: msg}
		}
		if j, dup := names[r.Name]; dup {
			return &FieldError{Line: r.Line, Field: field, Msg: fmt.Sprintf("role %q is already defined by roles[%d]", r.Name, j)}
		}
		names[r.Name] = i
	}
	return nil
}

func (c *Config) normalizeRules() error {
	if len(c.Rules) > MaxRules {
		return &FieldError{Field: "rules", Msg: fmt.Sprintf("more than %d rules", MaxRules)}
	}
	names := make(map[string]int, len(c.Rules))
	for i := range c.Rules {
		r := &c.Rules[i]
		fail := func(field, format string, args ...any) error {
			return &FieldError{Line: r.Line, Field: fmt.Sprintf("rules[%d].%s", i, field), Msg: fmt.Sprintf(format, args...)}
		}
		if msg := checkName(r.Name); msg != "" {
			return fail("name", "%s", msg)
		}
		if j, dup := names[r.Name]; dup {
			return fail("name", "rule %q is already defined by rules[%d]", r.Name, j)
		}
		names[r.Name] = i
		if err := c.checkRefs(r.Roles, "roles", "role", c.HasRole, fail); err != nil {
			return err
		}
		hasTarget := func(n string) bool { _, ok := c.Target(n); return ok }
		if err := c.checkRefs(r.Targets, "targets", "target", hasTarget, fail); err != nil {
			return err
		}
		switch {
		case r.MaxTTL == 0:
			return fail("max_ttl", "is required (like 1h)")
		case r.MaxTTL < MinDuration:
			return fail("max_ttl", "must be at least %s, got %s", fmtDuration(MinDuration), fmtDuration(r.MaxTTL))
		case r.MaxTTL > MaxTTL:
			return fail("max_ttl", "%s exceeds the limit of %s", fmtDuration(r.MaxTTL), fmtDuration(MaxTTL))
		}
		if r.Approvals == 0 {
			r.Approvals = DefaultApprovals
		}
		if r.Approvals < 1 || r.Approvals > MaxApprovals {
			return fail("approvals", "must be 1 to %d, got %d", MaxApprovals, r.Approvals)
		}
		if err := c.checkRefs(r.ApproverRoles, "approver_roles", "role", c.HasRole, fail); err != nil {
			return err
		}
		if r.PendingFor == 0 {
			r.PendingFor = DefaultPendingFor
		}
		if r.PendingFor < MinDuration || r.PendingFor > MaxPendingFor {
			return fail("pending_for", "must be %s to %s, got %s", fmtDuration(MinDuration), fmtDuration(MaxPendingFor), fmtDuration(r.PendingFor))
		}
		if r.Posture.MaxAge == 0 {
			r.Posture.MaxAge = DefaultPostureMaxAge
		}
		if r.Posture.MaxAge < MinDuration || r.Posture.MaxAge > MaxPostureAge {
			return fail("posture.max_age", "must be %s to %s, got %s", fmtDuration(MinDuration), fmtDuration(MaxPostureAge), fmtDuration(r.Posture.MaxAge))
		}
	}
	return nil
}

// checkRefs checks a rule's list of references: not empty, bounded, each
// defined, no duplicates.
func (c *Config) checkRefs(list []string, field, kind string, exists func(string) bool,
	fail func(field, format string, args ...any) error) error {
	if len(list) == 0 {
		return fail(field, "must name at least one %s", kind)
	}
	if len(list) > MaxListLen {
		return fail(field, "more than %d entries", MaxListLen)
	}
	seen := make(map[string]bool, len(list))
	for j, name := range list {
		item := fmt.Sprintf("%s[%d]", field, j)
		if name == "" {
			return fail(item, "empty %s name", kind)
		}
		if !exists(name) {
			return fail(item, "unknown %s %q", kind, name)
		}
		if seen[name] {
			return fail(item, "%s %q is listed twice", kind, name)
		}
		seen[name] = true
	}
	return nil
}

// CheckName returns an error when s cannot be a target, role or rule name,
// so callers can refuse such a name before looking it up.
func CheckName(s string) error {
	if msg := checkName(s); msg != "" {
		return errors.New(msg)
	}
	return nil
}

// checkName validates a target, role or rule name; it returns a message or
// "".
func checkName(s string) string {
	if s == "" {
		return "name is required"
	}
	if len(s) > 63 {
		return fmt.Sprintf("name %.20q… is longer than 63 characters", s)
	}
	for i := 0; i < len(s); i++ {
		ch := s[i]
		alnum := ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9'
		if !alnum && (i == 0 || ch != '-' && ch != '_' && ch != '.') {
			return fmt.Sprintf("name %q must be letters, digits, '-', '_' or '.', starting with a letter or digit", s)
		}
	}
	return ""
}

// checkLogin validates a POSIX-ish account name.
func checkLogin(s string) string {
	if len(s) > 32 {
		return fmt.Sprintf("login %.20q… is longer than 32 characters", s)
	}
	for i := 0; i < len(s); i++ {
		ch := s[i]
		alpha := ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch == '_'
		ok := alpha || i > 0 && (ch >= '0' && ch <= '9' || ch == '-' || ch == '.')
		if !ok {
			return fmt.Sprintf("login %q is not a valid account name", s)
		}
	}
	return ""
}

// checkHostname validates a DNS name; it returns a message or "".
func checkHostname(h string) string {
	h = strings.TrimSuffix(h, ".")
	if h == "" || len(h) > 253 {
		return "is not a valid host name"
	}
	labels := strings.Split(h, ".")
	for _, l := range labels {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return "is not a valid host name"
		}
		for i := 0; i < len(l); i++ {
			ch := l[i]
			if !(ch >= 'a' && ch <= 'z' || ch >= 'A' && ch <= 'Z' || ch >= '0' && ch <= '9' || ch == '-' || ch == '_') {
				return "is not a valid IP address or host name"
			}
		}
	}
	last := labels[len(labels)-1]
	if strings.Trim(last, "0123456789") == "" {
		return "is not a valid IP address or host name"
	}
	return ""
}

// hostKeyTypes are the SSH public key types accepted in host_key.
var hostKeyTypes = map[string]bool{
	"ssh-ed25519":                        true,
	"ssh-rsa":                            true,
	"ecdsa-sha2-nistp256":                true,
	"ecdsa-sha2-nistp384":                true,
	"ecdsa-sha2-nistp521":                true,
	"sk-ssh-ed25519@openssh.com":         true,
	"sk-ecdsa-sha2-nistp256@openssh.com": true,
}

// checkHostKey validates an authorized_keys-format line "[@cert-authority ]
// TYPE BASE64 [COMMENT]" without an SSH library: the type is known and the
// base64 blob is an SSH wire-format key of that type. It returns a message
// or "".
func checkHostKey(s string) string {
	if len(s) > MaxHostKeyLen {
		return fmt.Sprintf("is longer than %d bytes", MaxHostKeyLen)
	}
	if !utf8.ValidString(s) || strings.ContainsAny(s, "\r\n") {
		return "must be a single line of text"
	}
	fields := strings.Fields(s)
	if len(fields) > 0 && fields[0] == "@cert-authority" {
		fields = fields[1:]
	} else if len(fields) > 0 && strings.HasPrefix(fields[0], "@") {
		return fmt.Sprintf("unknown marker %q, only @cert-authority is allowed", fields[0])
	}
	if len(fields) < 2 {
		return "want an authorized_keys line like \"ssh-ed25519 AAAA...\""
	}
	typ, b64 := fields[0], fields[1]
	if !hostKeyTypes[typ] {
		return fmt.Sprintf("unsupported key type %q", typ)
	}
	blob, err := base64.StdEncoding.DecodeString(b64)
	if err != nil {
		return "key is not valid base64"
	}
	if len(blob) < 4 {
		return "key is truncated"
	}
	n := binary.BigEndian.Uint32(blob)
	if uint64(n) > uint64(len(blob)-4) || string(blob[4:4+n]) != typ {
		return fmt.Sprintf("key data is not a %s key", typ)
	}
	if len(blob) == int(4+n) {
		return "key is truncated"
	}
	return ""
}
