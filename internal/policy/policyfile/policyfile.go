// Package policyfile reads pinhole's policy file, a YAML document, into a
// normalized policy.Config. Every error names the file, the line and the
// field, like "pinhole.yaml:7: targets[0].address: missing port".
//
// The document has three top-level keys, all optional:
//
//	targets:                      # what can be reached
//	  - name: db-prod             # required; letters, digits, - _ .
//	    address: 10.0.4.12:22     # required; host:port, IPv6 as [2001:db8::1]:22
//	    protocol: ssh             # required; ssh or tcp
//	    login: postgres           # ssh only, required: the account on the target
//	    host_key: "ssh-ed25519 AAAA..."   # ssh only, required: the target's host
//	                              # key, or "@cert-authority ssh-ed25519 AAAA..."
//	    tunnel_ip: 100.127.0.10   # optional: the address agents dial in the tunnel
//	roles:                        # the roles users hold
//	  - name: dba                 # or, shorter: roles: [dba, approver]
//	  - name: approver
//	rules:                        # the first rule matching role and target decides
//	  - name: dba-prod
//	    roles: [dba]              # requester roles
//	    targets: [db-prod]
//	    max_ttl: 1h               # required; at most 24h
//	    approvals: 1              # default 1, at most 5
//	    approver_roles: [approver]
//	    pending_for: 15m          # how long a request waits for approval (default 15m)
//	    posture:
//	      max_age: 10m            # newest posture report may be this old (default 10m)
//	      disk_encryption: false  # require full-disk encryption
//	      firewall: false         # require an active firewall
//
// Durations are Go durations ("45m", "1h30m"). Unknown keys, duplicate
// keys, anchors and aliases, and more than one document are rejected. See
// policy.Config.Normalize for defaults, limits and tunnel address
// assignment. deploy/config.example.yaml is a complete example.
package policyfile

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/policy"
	"go.yaml.in/yaml/v3"
)

// MaxSize is the largest policy file accepted, in bytes.
const MaxSize = 1 << 20

// Error is a problem in a policy file.
type Error struct {
	// File is the file name as given to Parse or Load.
	File string
	// Line is the 1-based line, or 0 when the problem has no line.
	Line int
	// Field is the path of the offending field, like "rules[0].max_ttl",
	// or "" for a problem with the document as a whole.
	Field string
	// Msg says what is wrong.
	Msg string

	err error // the underlying error, if any
}

// Error implements error: "FILE:LINE: FIELD: MSG", leaving out ":LINE"
// when Line is 0 and "FIELD: " when Field is empty.
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString(e.File)
	if e.Line > 0 {
		b.WriteByte(':')
		b.WriteString(strconv.Itoa(e.Line))
	}
	b.WriteString(": ")
	if e.Field != "" {
		b.WriteString(e.Field)
		b.WriteString(": ")
	}
	b.WriteString(e.Msg)
	return b.String()
}

// Unwrap returns the underlying error (a *policy.FieldError when the
// document parsed but failed validation), or nil.
func (e *Error) Unwrap() error { return e.err }

// Load reads and parses the policy file at path. Files larger than MaxSize
// and non-regular files are refused.
func Load(path string) (*policy.Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("loading policy: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("loading policy: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, &Error{File: path, Msg: "not a regular file"}
	}
	data, err := io.ReadAll(io.LimitReader(f, MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("loading policy: reading %s: %w", path, err)
	}
	return Parse(path, data)
}

// Parse parses data, the contents of the policy file named file (used only
// in errors), and returns the normalized config. Every error is an *Error.
func Parse(file string, data []byte) (*policy.Config, error) {
	if len(data) > MaxSize {
		return nil, &Error{File: file, Msg: fmt.Sprintf("file is larger than %d bytes", MaxSize)}
	}
	p := &parser{file: file, lines: make(map[string]int)}
	cfg, err := p.parse(data)
	if err != nil {
		return nil, err
	}
	if err := cfg.Normalize(); err != nil {
		var fe *policy.FieldError
		if errors.As(err, &fe) {
			return nil, &Error{File: file, Line: p.lineFor(fe.Field, fe.Line), Field: fe.Field, Msg: fe.Msg, err: err}
		}
		return nil, &Error{File: file, Msg: err.Error(), err: err}
	}
	return cfg, nil
}

type parser struct {
	file string
	// lines maps each field path seen ("targets[0].address") to its line.
	lines map[string]int
}

// lineFor returns the line of field, or of its nearest enclosing field
// that has one, or fallback.
func (p *parser) lineFor(field string, fallback int) int {
	for f := field; f != ""; {
		if l, ok := p.lines[f]; ok {
			return l
		}
		i := strings.LastIndexAny(f, ".[")
		if i < 0 {
			break
		}
		f = f[:i]
	}
	return fallback
}

func (p *parser) errorf(n *yaml.Node, field, format string, args ...any) error {
	line := 0
	if n != nil {
		line = n.Line
	}
	return &Error{File: p.file, Line: line, Field: field, Msg: fmt.Sprintf(format, args...)}
}

func (p *parser) parse(data []byte) (*policy.Config, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var doc yaml.Node
	if err := dec.Decode(&doc); err != nil {
		if errors.Is(err, io.EOF) {
			return &policy.Config{}, nil
		}
		return nil, p.syntaxError(err)
	}
	var extra yaml.Node
	switch err := dec.Decode(&extra); {
	case err == nil:
		return nil, p.errorf(&extra, "", "only one YAML document is allowed")
	case !errors.Is(err, io.EOF):
		return nil, p.syntaxError(err)
	}
	if err := p.checkTree(&doc, 0); err != nil {
		return nil, err
	}
	cfg := &policy.Config{}
	if len(doc.Content) == 0 || isNull(doc.Content[0]) {
		return cfg, nil
	}
	err := p.mapping(doc.Content[0], "", map[string]func(v *yaml.Node, path string) error{
		"targets": func(v *yaml.Node, path string) error {
			return p.sequence(v, path, func(item *yaml.Node, path string) error {
				t, err := p.target(item, path)
				cfg.Targets = append(cfg.Targets, t)
				return err
			})
		},
		"roles": func(v *yaml.Node, path string) error {
			return p.sequence(v, path, func(item *yaml.Node, path string) error {
				r, err := p.role(item, path)
				cfg.Roles = append(cfg.Roles, r)
				return err
			})
		},
		"rules": func(v *yaml.Node, path string) error {
			return p.sequence(v, path, func(item *yaml.Node, path string) error {
				r, err := p.rule(item, path)
				cfg.Rules = append(cfg.Rules, r)
				return err
			})
		},
	})
	if err != nil {
		return nil, err
	}
	return cfg, nil
}

// syntaxError turns a yaml error ("yaml: line 3: did not find expected
// key") into an *Error with the line.
func (p *parser) syntaxError(err error) error {
	msg := strings.TrimPrefix(err.Error(), "yaml: ")
	line := 0
	if rest, ok := strings.CutPrefix(msg, "line "); ok {
		if num, tail, ok := strings.Cut(rest, ": "); ok {
			if n, convErr := strconv.Atoi(num); convErr == nil {
				line, msg = n, tail
			}
		}
	}
	return &Error{File: p.file, Line: line, Msg: "invalid YAML: " + msg, err: err}
}

// maxDepth bounds nesting; the policy document needs four levels.
const maxDepth = 16

// checkTree rejects aliases, anchors, non-standard tags and deep nesting
// before anything is decoded.
func (p *parser) checkTree(n *yaml.Node, depth int) error {
	if depth > maxDepth {
		return p.errorf(n, "", "nesting is deeper than %d levels", maxDepth)
	}
	if n.Kind == yaml.AliasNode || n.Anchor != "" {
		return p.errorf(n, "", "YAML anchors and aliases are not supported")
	}
	if n.Kind == yaml.ScalarNode && n.Tag != "" && !strings.HasPrefix(n.Tag, "!!") {
		return p.errorf(n, "", "YAML tag %q is not supported", n.Tag)
	}
	for _, c := range n.Content {
		if err := p.checkTree(c, depth+1); err != nil {
			return err
		}
	}
	return nil
}

func isNull(n *yaml.Node) bool {
	return n.Kind == yaml.ScalarNode && n.ShortTag() == "!!null"
}

func join(path, key string) string {
	if path == "" {
		return key
	}
	return path + "." + key
}

// mapping walks the mapping n, calling the handler for each key and
// rejecting unknown and duplicate keys. A null n is an empty mapping.
func (p *parser) mapping(n *yaml.Node, path string, handlers map[string]func(v *yaml.Node, path string) error) error {
	if isNull(n) {
		return nil
	}
	if n.Kind != yaml.MappingNode {
		return p.errorf(n, path, "want a mapping of keys to values, got %s", describe(n))
	}
	seen := make(map[string]bool, len(n.Content)/2)
	for i := 0; i+1 < len(n.Content); i += 2 {
		k, v := n.Content[i], n.Content[i+1]
		if k.Kind != yaml.ScalarNode || k.ShortTag() != "!!str" {
			return p.errorf(k, path, "keys must be plain strings")
		}
		field := join(path, k.Value)
		h, ok := handlers[k.Value]
		if !ok {
			known := make([]string, 0, len(handlers))
			for name := range handlers {
				known = append(known, name)
			}
			slices.Sort(known)
			return p.errorf(k, field, "unknown key %q (known keys: %s)", k.Value, strings.Join(known, ", "))
		}
		if seen[k.Value] {
			return p.errorf(k, field, "key %q appears twice", k.Value)
		}
		seen[k.Value] = true
		p.lines[field] = k.Line
		if err := h(v, field); err != nil {
			return err
		}
	}
	return nil
}

// sequence calls item for each element of the sequence n. A null n is an
// empty sequence.
func (p *parser) sequence(n *yaml.Node, path string, item func(v *yaml.Node, path string) error) error {
	if isNull(n) {
		return nil
	}
	if n.Kind != yaml.SequenceNode {
		return p.errorf(n, path, "want a list, got %s", describe(n))
	}
	for i, v := range n.Content {
		field := fmt.Sprintf("%s[%d]", path, i)
		p.lines[field] = v.Line
		if err := item(v, field); err != nil {
			return err
		}
	}
	return nil
}

func describe(n *yaml.Node) string {
	switch n.Kind {
	case yaml.MappingNode:
		return "a mapping"
	case yaml.SequenceNode:
		return "a list"
	case yaml.ScalarNode:
		return fmt.Sprintf("%q", n.Value)
	}
	return "something else"
}

func (p *parser) str(dst *string) func(v *yaml.Node, path string) error {
	return func(v *yaml.Node, path string) error {
		if isNull(v) {
			*dst = ""
			return nil
		}
		if v.Kind != yaml.ScalarNode {
			return p.errorf(v, path, "want a string, got %s", describe(v))
		}
		*dst = v.Value
		return nil
	}
}

func (p *parser) duration(dst *time.Duration) func(v *yaml.Node, path string) error {
	return func(v *yaml.Node, path string) error {
		if isNull(v) {
			*dst = 0
			return nil
		}
		if v.Kind != yaml.ScalarNode {
			return p.errorf(v, path, "want a duration like 45m, got %s", describe(v))
		}
		if v.Value == "" {
			*dst = 0
			return nil
		}
		d, err := time.ParseDuration(v.Value)
		if err != nil {
			return p.errorf(v, path, "want a duration like 45m or 1h30m, got %q", v.Value)
		}
		*dst = d
		return nil
	}
}

func (p *parser) integer(dst *int) func(v *yaml.Node, path string) error {
	return func(v *yaml.Node, path string) error {
		if v.Kind != yaml.ScalarNode || v.ShortTag() != "!!int" {
			return p.errorf(v, path, "want a whole number, got %s", describe(v))
		}
		n, err := strconv.ParseInt(v.Value, 10, 32)
		if err != nil {
			return p.errorf(v, path, "want a whole number, got %q", v.Value)
		}
		*dst = int(n)
		return nil
	}
}

func (p *parser) boolean(dst *bool) func(v *yaml.Node, path string) error {
	return func(v *yaml.Node, path string) error {
		if v.Kind != yaml.ScalarNode || v.ShortTag() != "!!bool" {
			return p.errorf(v, path, "want true or false, got %s", describe(v))
		}
		var b bool
		if err := v.Decode(&b); err != nil {
			return p.errorf(v, path, "want true or false, got %q", v.Value)
		}
		*dst = b
		return nil
	}
}

func (p *parser) stringList(dst *[]string) func(v *yaml.Node, path string) error {
	return func(v *yaml.Node, path string) error {
		return p.sequence(v, path, func(item *yaml.Node, path string) error {
			var s string
			if err := p.str(&s)(item, path); err != nil {
				return err
			}
			*dst = append(*dst, s)
			return nil
		})
	}
}

func (p *parser) target(n *yaml.Node, path string) (policy.Target, error) {
	t := policy.Target{Line: n.Line}
	var protocol, tunnelIP string
	err := p.mapping(n, path, map[string]func(v *yaml.Node, path string) error{
		"name":     p.str(&t.Name),
		"address":  p.str(&t.Address),
		"protocol": p.str(&protocol),
		"login":    p.str(&t.Login),
		"host_key": p.str(&t.HostKey),
		"tunnel_ip": func(v *yaml.Node, path string) error {
			if err := p.str(&tunnelIP)(v, path); err != nil {
				return err
			}
			if tunnelIP == "" {
				return nil
			}
			a, err := netip.ParseAddr(tunnelIP)
			if err != nil {
				return p.errorf(v, path, "%q is not an IP address", tunnelIP)
			}
			t.TunnelIP = a
			return nil
		},
	})
	t.Protocol = policy.Protocol(protocol)
	return t, err
}

func (p *parser) role(n *yaml.Node, path string) (policy.Role, error) {
	r := policy.Role{Line: n.Line}
	if n.Kind == yaml.ScalarNode && !isNull(n) {
		r.Name = n.Value
		return r, nil
	}
	return r, p.mapping(n, path, map[string]func(v *yaml.Node, path string) error{
		"name": p.str(&r.Name),
	})
}

func (p *parser) rule(n *yaml.Node, path string) (policy.Rule, error) {
	r := policy.Rule{Line: n.Line}
	err := p.mapping(n, path, map[string]func(v *yaml.Node, path string) error{
		"name":           p.str(&r.Name),
		"roles":          p.stringList(&r.Roles),
		"targets":        p.stringList(&r.Targets),
		"max_ttl":        p.duration(&r.MaxTTL),
		"approvals":      p.integer(&r.Approvals),
		"approver_roles": p.stringList(&r.ApproverRoles),
		"pending_for":    p.duration(&r.PendingFor),
		"posture": func(v *yaml.Node, path string) error {
			return p.mapping(v, path, map[string]func(v *yaml.Node, path string) error{
				"max_age":         p.duration(&r.Posture.MaxAge),
				"disk_encryption": p.boolean(&r.Posture.DiskEncryption),
				"firewall":        p.boolean(&r.Posture.Firewall),
			})
		},
	})
	return r, err
}
