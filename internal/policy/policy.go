// Package policy holds pinhole's access policy: the targets that can be
// reached, the roles people hold, and the rules that say which roles may
// request which targets, for how long, with how many approvals and under
// which device posture. Config.Normalize fills defaults and validates a
// document; Evaluate decides a request against it.
//
// The package is part of the domain core: it performs no I/O and imports
// only the standard library. The YAML file format lives in
// internal/policy/policyfile.
package policy

import (
	"fmt"
	"net/netip"
	"strconv"
	"time"
)

// Protocol says how the broker records traffic to a target.
type Protocol string

// Known protocols.
const (
	// ProtocolSSH targets go through the recording SSH proxy.
	ProtocolSSH Protocol = "ssh"
	// ProtocolTCP targets are spliced byte for byte; their flows are
	// authorized and audited, the bytes are not recorded yet.
	ProtocolTCP Protocol = "tcp"
)

// Valid reports whether p is a known protocol.
func (p Protocol) Valid() bool {
	switch p {
	case ProtocolSSH, ProtocolTCP:
		return true
	}
	return false
}

// Defaults and limits applied by Normalize.
const (
	// DefaultPostureMaxAge is a rule's posture max_age when unset.
	DefaultPostureMaxAge = 10 * time.Minute
	// DefaultPendingFor is a rule's pending_for when unset.
	DefaultPendingFor = 15 * time.Minute
	// DefaultApprovals is a rule's approvals when unset.
	DefaultApprovals = 1
	// MaxTTL caps every rule's max_ttl.
	MaxTTL = 24 * time.Hour
	// MinDuration is the shortest max_ttl, pending_for, posture max_age and
	// requested duration: anything shorter is a typo (1ns), not a policy.
	MinDuration = time.Second
	// MaxPendingFor caps every rule's pending_for.
	MaxPendingFor = 24 * time.Hour
	// MaxPostureAge caps every rule's posture max_age.
	MaxPostureAge = 24 * time.Hour
	// MaxApprovals caps every rule's approvals.
	MaxApprovals = 5
	// MaxReasonLen is the longest request reason, in bytes.
	MaxReasonLen = 500
	// MaxPostureSkew is how far in the future a posture report's time may
	// lie (clock skew between device and broker) and still be accepted.
	MaxPostureSkew = time.Minute
	// MaxTargets, MaxRoles and MaxRules bound the size of a Config;
	// MaxListLen bounds each list inside a rule.
	MaxTargets = 4096
	MaxRoles   = 1024
	MaxRules   = 4096
	MaxListLen = 1024
	// MaxHostKeyLen bounds a target's host_key line, in bytes.
	MaxHostKeyLen = 16 << 10
)

// TunnelPrefix is the range Normalize assigns tunnel addresses from for
// targets whose address is not a usable IP literal.
var TunnelPrefix = netip.MustParsePrefix("100.127.0.0/16")

// Target is one destination that can be granted: one host and one port.
type Target struct {
	// Name identifies the target in rules, requests and the CLI.
	Name string
	// Address is the real target's host:port as the broker dials it
	// (host is an IP literal or a DNS name; IPv6 in brackets).
	Address string
	// Protocol selects the recorder.
	Protocol Protocol
	// Login is the account the SSH proxy logs in as; required for ssh
	// targets and empty for others.
	Login string
	// HostKey is an authorized_keys-format line with the real target's
	// host key, or of its host CA prefixed "@cert-authority "; required
	// for ssh targets and empty for others.
	HostKey string
	// TunnelIP is the IPv4 address agents dial inside the tunnel (with
	// the port of Address). Zero means Normalize assigns one.
	TunnelIP netip.Addr
	// Line is the line of the target in the config file (0 if unknown).
	Line int
}

// Port returns the port of t.Address, or 0 if it does not parse.
func (t Target) Port() uint16 {
	_, port, err := splitHostPort(t.Address)
	if err != nil {
		return 0
	}
	return port
}

// Host returns the host part of t.Address (without brackets), or "" if it
// does not parse.
func (t Target) Host() string {
	host, _, err := splitHostPort(t.Address)
	if err != nil {
		return ""
	}
	return host
}

// TunnelAddrPort returns the address and port agents dial inside the
// tunnel: TunnelIP with the port of Address.
func (t Target) TunnelAddrPort() netip.AddrPort {
	return netip.AddrPortFrom(t.TunnelIP, t.Port())
}

// Role is a named role that users hold.
type Role struct {
	Name string
	// Line is the line of the role in the config file (0 if unknown).
	Line int
}

// PostureRequirement is what a device must report to be granted access.
// A signed, fresh report is always required.
type PostureRequirement struct {
	// MaxAge is how old the newest report may be; 0 means
	// DefaultPostureMaxAge.
	MaxAge time.Duration
	// DiskEncryption requires full-disk encryption.
	DiskEncryption bool
	// Firewall requires an active firewall.
	Firewall bool
}

// Rule lets holders of Roles request Targets.
type Rule struct {
	Name string
	// Roles are the requester roles the rule applies to.
	Roles []string
	// Targets are the target names the rule applies to.
	Targets []string
	// MaxTTL is the longest grant; required, at most MaxTTL.
	MaxTTL time.Duration
	// Approvals is how many distinct approvers must approve; 0 means
	// DefaultApprovals, at most MaxApprovals.
	Approvals int
	// ApproverRoles are the roles whose holders may approve; required.
	ApproverRoles []string
	// PendingFor is how long a request waits for approval; 0 means
	// DefaultPendingFor.
	PendingFor time.Duration
	// Posture is the device posture the rule requires.
	Posture PostureRequirement
	// Line is the line of the rule in the config file (0 if unknown).
	Line int
}

// Config is the whole policy document.
type Config struct {
	Targets []Target
	Roles   []Role
	Rules   []Rule
}

// FieldError reports the first problem Normalize found.
type FieldError struct {
	// Line is the config line of the offending item (0 if unknown).
	Line int
	// Field is the path of the offending field, like "targets[1].address"
	// (indices from 0).
	Field string
	// Msg says what is wrong.
	Msg string
}

// Error implements error: "line N: FIELD: MSG", without the line part
// when Line is 0.
func (e *FieldError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("line %d: %s: %s", e.Line, e.Field, e.Msg)
	}
	return fmt.Sprintf("%s: %s", e.Field, e.Msg)
}

// Target returns the target named name.
func (c *Config) Target(name string) (Target, bool) {
	for _, t := range c.Targets {
		if t.Name == name {
			return t, true
		}
	}
	return Target{}, false
}

// Rule returns the rule named name.
func (c *Config) Rule(name string) (Rule, bool) {
	for _, r := range c.Rules {
		if r.Name == name {
			return r, true
		}
	}
	return Rule{}, false
}

// HasRole reports whether the config defines the role name.
func (c *Config) HasRole(name string) bool {
	for _, r := range c.Roles {
		if r.Name == name {
			return true
		}
	}
	return false
}

// fmtDuration prints d without zero trailing units: "1h", "2h30m", "45m",
// "12m30s".
func fmtDuration(d time.Duration) string {
	s := d.String()
	if len(s) > 2 && s[len(s)-2:] == "0s" && (s[len(s)-3] == 'm' || s[len(s)-3] == 'h') {
		s = s[:len(s)-2]
	}
	if len(s) > 2 && s[len(s)-2:] == "0m" && s[len(s)-3] == 'h' {
		s = s[:len(s)-2]
	}
	return s
}

// splitHostPort splits "host:port" or "[v6]:port" and parses the port
// (1-65535). It is net.SplitHostPort without the net package.
func splitHostPort(addr string) (host string, port uint16, err error) {
	var portStr string
	if len(addr) > 0 && addr[0] == '[' {
		end := -1
		for i := 1; i < len(addr); i++ {
			if addr[i] == ']' {
				end = i
				break
			}
		}
		if end < 0 {
			return "", 0, fmt.Errorf("missing ']' in %q", addr)
		}
		if end+1 >= len(addr) || addr[end+1] != ':' {
			return "", 0, fmt.Errorf("missing port in %q, want host:port", addr)
		}
		host, portStr = addr[1:end], addr[end+2:]
		a, perr := netip.ParseAddr(host)
		if perr != nil || !a.Is6() || a.Zone() != "" {
			return "", 0, fmt.Errorf("%q in brackets is not an IPv6 address", host)
		}
	} else {
		colon := -1
		for i := len(addr) - 1; i >= 0; i-- {
			if addr[i] == ':' {
				colon = i
				break
			}
		}
		if colon < 0 {
			return "", 0, fmt.Errorf("missing port in %q, want host:port", addr)
		}
		host, portStr = addr[:colon], addr[colon+1:]
		for i := 0; i < len(host); i++ {
			if host[i] == ':' {
				return "", 0, fmt.Errorf("IPv6 address in %q needs brackets, like [2001:db8::1]:22", addr)
			}
		}
	}
	if host == "" {
		return "", 0, fmt.Errorf("missing host in %q", addr)
	}
	if portStr == "" {
		return "", 0, fmt.Errorf("missing port in %q", addr)
	}
	for i := 0; i < len(portStr); i++ {
		if portStr[i] < '0' || portStr[i] > '9' {
			return "", 0, fmt.Errorf("port %q is not a number", portStr)
		}
	}
	n, perr := strconv.ParseUint(portStr, 10, 16)
	if perr != nil || n == 0 || len(portStr) > 5 {
		return "", 0, fmt.Errorf("port %s is out of range 1-65535", portStr)
	}
	return host, uint16(n), nil
}
