package policy

import (
	"fmt"
	"slices"
	"strings"
	"time"
)

// PostureFacts is what the broker knows from a device's newest signed,
// verified posture report.
type PostureFacts struct {
	// CollectedAt is when the device collected the report.
	CollectedAt time.Time
	// DiskEncrypted reports full-disk encryption.
	DiskEncrypted bool
	// FirewallActive reports an active firewall.
	FirewallActive bool
}

// Input is one access request to decide.
type Input struct {
	// Roles are the requester's roles.
	Roles []string
	// Target is the requested target name.
	Target string
	// TTL is the requested grant duration.
	TTL time.Duration
	// Reason is the requester's justification.
	Reason string
	// Posture is the device's newest verified report; nil means no
	// signed report is on file.
	Posture *PostureFacts
	// Now is the time of the decision.
	Now time.Time
}

// Decision is the result of Evaluate.
type Decision struct {
	// Allow is true when the request may be created (it still needs its
	// approvals).
	Allow bool
	// Reason explains a refusal in words fit to show the requester; empty
	// when allowed.
	Reason string
	// Rule names the deciding rule; empty when no rule matched.
	Rule string
	// MaxTTL, Approvals, ApproverRoles and PendingFor are copied from the
	// deciding rule.
	MaxTTL        time.Duration
	Approvals     int
	ApproverRoles []string
	PendingFor    time.Duration
}

// Evaluate decides in against c, which must have been normalized. The
// first rule (in config order) whose roles include one of in.Roles and
// whose targets include in.Target decides. Refusals are checked in this
// order, and the first one found is the Reason: unknown target, no rule for
// the roles, missing or overlong reason, TTL not positive or above the
// rule's max_ttl, no posture report, report too old (or from the future),
// disk encryption off, firewall off. Evaluate fails closed: a nil config
// allows nothing.
func Evaluate(c *Config, in Input) Decision {
	if c == nil {
		return Decision{Reason: "no policy is loaded"}
	}
	if _, ok := c.Target(in.Target); !ok {
		return Decision{Reason: fmt.Sprintf("unknown target %q", in.Target)}
	}
	idx := slices.IndexFunc(c.Rules, func(r Rule) bool {
		return slices.Contains(r.Targets, in.Target) &&
			slices.ContainsFunc(r.Roles, func(role string) bool { return slices.Contains(in.Roles, role) })
	})
	if idx < 0 {
		return Decision{Reason: noRuleReason(in.Roles, in.Target)}
	}
	r := &c.Rules[idx]
	d := Decision{
		Rule:          r.Name,
		MaxTTL:        r.MaxTTL,
		Approvals:     r.Approvals,
		ApproverRoles: slices.Clone(r.ApproverRoles),
		PendingFor:    r.PendingFor,
	}
	if reason := refusal(r, in); reason != "" {
		d.Reason = reason
		return d
	}
	d.Allow = true
	return d
}

func noRuleReason(roles []string, target string) string {
	switch len(roles) {
	case 0:
		return fmt.Sprintf("you hold no role that may request %s", target)
	case 1:
		return fmt.Sprintf("role %s may not request %s", roles[0], target)
	default:
		return fmt.Sprintf("roles %s may not request %s", strings.Join(roles, ", "), target)
	}
}

func refusal(r *Rule, in Input) string {
	switch {
	case strings.TrimSpace(in.Reason) == "":
		return "a reason is required"
	case len(in.Reason) > MaxReasonLen:
		return fmt.Sprintf("reason is %d bytes, the limit is %d", len(in.Reason), MaxReasonLen)
	case in.TTL < MinDuration:
		return fmt.Sprintf("requested duration must be at least %s", fmtDuration(MinDuration))
	case in.TTL > r.MaxTTL:
		return fmt.Sprintf("requested %s exceeds max %s of rule %s", fmtDuration(in.TTL), fmtDuration(r.MaxTTL), r.Name)
	}
	p := in.Posture
	if p == nil {
		return "no signed posture report from this device"
	}
	age := in.Now.Sub(p.CollectedAt)
	switch {
	case age < -MaxPostureSkew:
		return fmt.Sprintf("posture report is dated %s in the future; check the device clock", fmtDuration(ceilSecond(-age)))
	case age > r.Posture.MaxAge:
		return fmt.Sprintf("posture report is %s old, rule %s allows %s", fmtDuration(ceilSecond(age)), r.Name, fmtDuration(r.Posture.MaxAge))
	case r.Posture.DiskEncryption && !p.DiskEncrypted:
		return fmt.Sprintf("disk encryption is off, rule %s requires it", r.Name)
	case r.Posture.Firewall && !p.FirewallActive:
		return fmt.Sprintf("firewall is off, rule %s requires it", r.Name)
	}
	return ""
}

// ceilSecond rounds a positive d up to a whole second, so an age just over
// a limit never prints as equal to it.
func ceilSecond(d time.Duration) time.Duration {
	return (d + time.Second - 1).Truncate(time.Second)
}
