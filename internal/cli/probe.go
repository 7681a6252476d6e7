package cli

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// Bounds of `pinhole probe`, the same as the agent's.
const (
	defaultProbeTimeout = 3 * time.Second
	maxProbeTimeout     = 30 * time.Second
	maxTargetLen        = 64
	// probeSlack is how much longer than the probe's timeout the CLI waits
	// for the agent's answer.
	probeSlack = 10 * time.Second
)

func probeCmd() *command {
	c := &command{
		name:    "probe",
		usage:   "TARGET [--port N] [--timeout 3s]",
		summary: "check whether a port is reachable through a target's live tunnel",
		help: "Asks the agent to open one TCP connection through the live tunnel of TARGET to\n" +
			"the grant's destination address and port N (the granted port when --port is not\n" +
			"given), and closes it at once without sending data. The gateway refuses every\n" +
			"port the grant does not cover, so this shows that only the granted port is\n" +
			"reachable. Exit status 0 when the connection was accepted, 1 when it was refused,\n" +
			"timed out or failed.",
	}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		port := fs.Int("port", 0, "the `port` to probe on the target (default: the granted port)")
		timeout := duration(fs, "timeout", defaultProbeTimeout, "how long to wait for an answer (at most 30s)")
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos, "TARGET"); err != nil {
			return err
		}
		target := pos[0]
		if len(target) > maxTargetLen {
			return usagef(path, "TARGET is longer than %d bytes", maxTargetLen)
		}
		if *port < 0 || *port > 65535 {
			return usagef(path, "flag --port must be between 1 and 65535, got %d", *port)
		}
		if *timeout <= 0 || *timeout > maxProbeTimeout {
			return usagef(path, "flag --timeout must be between 0 and %s, got %s", maxProbeTimeout, *timeout)
		}
		cl, err := e.client()
		if err != nil {
			return err
		}
		ctx, cancel := context.WithTimeout(e.ctx, *timeout+probeSlack)
		defer cancel()
		p, err := cl.LocalProbe(ctx, target, *port, *timeout)
		var ae *client.APIError
		switch {
		case errors.As(err, &ae) && ae.Status == http.StatusNotFound:
			return fmt.Errorf("probe %s: %w; ask for one with: pinhole request %s --for 30m --reason TEXT", target, err, target)
		case err != nil:
			return fmt.Errorf("probe %s: %w", target, err)
		}
		switch {
		case p.Connected:
			fmt.Fprintf(e.stdout, "probe %s port %d: connected (granted)\n", target, p.Port)
			return nil
		case p.Error == wire.ProbeRefused:
			fmt.Fprintf(e.stdout, "probe %s port %d: refused by the gateway (not granted)\n", target, p.Port)
		case p.Error == wire.ProbeTimedOut:
			fmt.Fprintf(e.stdout, "probe %s port %d: no answer within %s (timed out: is the gateway reachable?)\n", target, p.Port, *timeout)
		case p.Error == "":
			fmt.Fprintf(e.stdout, "probe %s port %d: failed: the agent gave no reason\n", target, p.Port)
		default:
			fmt.Fprintf(e.stdout, "probe %s port %d: failed: %s\n", target, p.Port, p.Error)
		}
		return &exitError{code: 1}
	}
	return c
}
