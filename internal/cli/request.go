package cli

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// Bounds of `pinhole request`.
const (
	defaultRequestTimeout = 10 * time.Minute
	// maxWaitChunk is the longest single /local/wait call (the agent's cap).
	maxWaitChunk = 10 * time.Minute
	maxReasonLen = 1024
)

func requestCmd() *command {
	c := &command{
		name:    "request",
		usage:   "TARGET --for DURATION --reason TEXT [--wait=true] [--timeout 10m]",
		summary: "ask for access to a target and wait for its tunnel",
		help: "The request goes to the broker through the agent. With --wait (the default) the\n" +
			"command waits for the approvals and the tunnel, then prints the local port.",
	}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		ttl := duration(fs, "for", 0, "how long the access should last, e.g. 45m (required)")
		reason := fs.String("reason", "", "why you need access, e.g. a ticket (required)")
		wait := fs.Bool("wait", true, "wait for the decision and the tunnel")
		timeout := duration(fs, "timeout", defaultRequestTimeout, "how long to wait for the decision")
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos, "TARGET"); err != nil {
			return err
		}
		switch {
		case *ttl <= 0:
			return usagef(path, "flag --for is required and must be positive, e.g. --for 45m")
		case strings.TrimSpace(*reason) == "":
			return usagef(path, "flag --reason is required")
		case len(*reason) > maxReasonLen:
			return usagef(path, "flag --reason is longer than %d bytes", maxReasonLen)
		case *timeout <= 0:
			return usagef(path, "flag --timeout must be positive")
		}
		target := pos[0]
		cl, err := e.client()
		if err != nil {
			return err
		}
		r, err := cl.CreateRequest(e.ctx, wire.CreateRequest{Target: target, TTL: ttl.String(), Reason: *reason})
		if err != nil {
			return fmt.Errorf("request for %s: %w", target, err)
		}
		switch r.State {
		case "pending":
			fmt.Fprintf(e.stdout, "request %s: waiting for %d approval(s)\n", r.ID, max(r.RequiredApprovals-len(r.Approvals), 0))
		case "granted":
			fmt.Fprintf(e.stdout, "request %s: granted\n", r.ID)
		default:
			return refusal(r)
		}
		if !*wait {
			return nil
		}
		t, err := waitTunnel(e.ctx, cl, r.ID, *timeout, e.now)
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "granted until %s UTC\n", t.ExpiresAt.UTC().Format(time.TimeOnly))
		if t.Protocol == "ssh" {
			fmt.Fprintf(e.stdout, "tunnel: %s  (connect: pinhole ssh %s)\n", t.Local, target)
		} else {
			fmt.Fprintf(e.stdout, "tunnel: %s\n", t.Local)
		}
		return nil
	}
	return c
}

// refusal describes a request the broker did not leave pending.
func refusal(r wire.Request) error {
	msg := fmt.Sprintf("request %s %s", r.ID, r.State)
	if r.EndReason != "" {
		msg += ": " + r.EndReason
	}
	return errors.New(msg)
}

// waitTunnel waits up to timeout for the request's tunnel, in calls the
// agent accepts.
func waitTunnel(ctx context.Context, cl *client.Client, id string, timeout time.Duration, now func() time.Time) (wire.Tunnel, error) {
	deadline := now().Add(timeout)
	for {
		left := deadline.Sub(now())
		if left <= 0 {
			return wire.Tunnel{}, fmt.Errorf("request %s: no tunnel after %s; it may still be pending", id, timeout)
		}
		chunk := min(left, maxWaitChunk)
		// The agent answers within chunk; the extra minute only guards
		// against an agent that never answers.
		cctx, cancel := context.WithTimeout(ctx, chunk+time.Minute)
		t, err := cl.LocalWait(cctx, id, chunk)
		cancel()
		var apiErr *client.APIError
		if errors.As(err, &apiErr) && apiErr.Code == "timeout" {
			continue
		}
		if err != nil {
			return wire.Tunnel{}, err
		}
		return t, nil
	}
}
