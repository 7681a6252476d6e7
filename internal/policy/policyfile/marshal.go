package policyfile

import (
	"fmt"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/policy"
	"go.yaml.in/yaml/v3"
)

type fileTarget struct {
	Name     string `yaml:"name"`
	Address  string `yaml:"address"`
	Protocol string `yaml:"protocol"`
	Login    string `yaml:"login,omitempty"`
	HostKey  string `yaml:"host_key,omitempty"`
	TunnelIP string `yaml:"tunnel_ip,omitempty"`
}

type filePosture struct {
	MaxAge         string `yaml:"max_age,omitempty"`
	DiskEncryption bool   `yaml:"disk_encryption"`
	Firewall       bool   `yaml:"firewall"`
}

type fileRule struct {
	Name          string      `yaml:"name"`
	Roles         []string    `yaml:"roles,flow"`
	Targets       []string    `yaml:"targets,flow"`
	MaxTTL        string      `yaml:"max_ttl"`
	Approvals     int         `yaml:"approvals,omitempty"`
	ApproverRoles []string    `yaml:"approver_roles,flow"`
	PendingFor    string      `yaml:"pending_for,omitempty"`
	Posture       filePosture `yaml:"posture"`
}

type fileConfig struct {
	Targets []fileTarget `yaml:"targets"`
	Roles   []string     `yaml:"roles,flow"`
	Rules   []fileRule   `yaml:"rules"`
}

// Marshal writes c in the policy file format, so that Parse of the result
// gives back c (apart from Line fields). Tunnel addresses are written out,
// so a normalized config keeps the addresses it was given. Zero durations
// and approvals are left out (Normalize fills their defaults).
func Marshal(c *policy.Config) ([]byte, error) {
	var f fileConfig
	for _, t := range c.Targets {
		ft := fileTarget{Name: t.Name, Address: t.Address, Protocol: string(t.Protocol), Login: t.Login, HostKey: t.HostKey}
		if t.TunnelIP.IsValid() {
			ft.TunnelIP = t.TunnelIP.String()
		}
		f.Targets = append(f.Targets, ft)
	}
	for _, r := range c.Roles {
		f.Roles = append(f.Roles, r.Name)
	}
	for _, r := range c.Rules {
		f.Rules = append(f.Rules, fileRule{
			Name:          r.Name,
			Roles:         r.Roles,
			Targets:       r.Targets,
			MaxTTL:        fmtDuration(r.MaxTTL),
			Approvals:     r.Approvals,
			ApproverRoles: r.ApproverRoles,
			PendingFor:    fmtDuration(r.PendingFor),
			Posture: filePosture{
				MaxAge:         fmtDuration(r.Posture.MaxAge),
				DiskEncryption: r.Posture.DiskEncryption,
				Firewall:       r.Posture.Firewall,
			},
		})
	}
	out, err := yaml.Marshal(&f)
	if err != nil {
		return nil, fmt.Errorf("encoding policy: %w", err)
	}
	return out, nil
}

// fmtDuration prints d as a Go duration without zero trailing units ("1h",
// "2h30m", "45m"), and 0 as "".
func fmtDuration(d time.Duration) string {
	if d == 0 {
		return ""
	}
	s := d.String()
	if strings.HasSuffix(s, "m0s") || strings.HasSuffix(s, "h0s") {
		s = s[:len(s)-2]
	}
	if strings.HasSuffix(s, "h0m") {
		s = s[:len(s)-2]
	}
	return s
}
