package cli

import (
	"errors"
	"flag"
	"fmt"
	"net/netip"
	"os/exec"
	"text/tabwriter"
	"time"

	"github.com/pinhole-dev/pinhole/internal/wire"
)

func statusCmd() *command {
	c := &command{name: "status", usage: "", summary: "show this workstation's device, user and tunnels"}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos); err != nil {
			return err
		}
		cl, err := e.client()
		if err != nil {
			return err
		}
		st, err := cl.LocalStatus(e.ctx)
		if err != nil {
			return err
		}
		fmt.Fprintf(e.stdout, "device:  %s\nuser:    %s\nbroker:  %s\n", st.Device, st.User, st.Broker)
		if len(st.Tunnels) == 0 {
			fmt.Fprintf(e.stdout, "tunnels: none\n")
			return nil
		}
		fmt.Fprintf(e.stdout, "tunnels:\n")
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "  REQUEST\tTARGET\tPROTOCOL\tLOCAL\tUNTIL (UTC)\n")
		for _, t := range st.Tunnels {
			fmt.Fprintf(tw, "  %s\t%s\t%s\t%s\t%s\n", t.Request, t.Target, t.Protocol, t.Local, t.ExpiresAt.UTC().Format(time.DateTime))
		}
		return tw.Flush()
	}
	return c
}

func sshCmd() *command {
	c := &command{
		name:    "ssh",
		usage:   "[--ssh PATH] TARGET [COMMAND...]",
		summary: "connect with ssh through a target's live tunnel",
		help: "Runs the system ssh with the grant's key, certificate and known_hosts, so the\n" +
			"host is checked against the broker's host CA. Flags go before TARGET; everything\n" +
			"after TARGET is the remote command. The exit status is ssh's.",
	}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		sshPath := fs.String("ssh", "ssh", "the ssh `program` to run")
		fs.StringVar(&e.agentSock, "agent", e.agentSock, "the agent's local API `socket`")
		// Not interspersed: everything after TARGET belongs to ssh.
		if err := fs.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				e.printCommandHelp(fs, c, path)
				return err
			}
			return usagef(path, "%v", err)
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return usagef(path, "missing TARGET")
		}
		target, command := rest[0], rest[1:]
		if len(command) > 0 && command[0] == "--" {
			command = command[1:] // "pinhole ssh TARGET -- cmd" as well as "pinhole ssh TARGET cmd"
		}
		cl, err := e.client()
		if err != nil {
			return err
		}
		st, err := cl.LocalStatus(e.ctx)
		if err != nil {
			return err
		}
		t, err := liveTunnel(st, target, e.now())
		if err != nil {
			return err
		}
		argv, err := sshArgs(t, target, command)
		if err != nil {
			return err
		}
		cmd := exec.CommandContext(e.ctx, *sshPath, argv...)
		cmd.Stdin, cmd.Stdout, cmd.Stderr = e.stdin, e.stdout, e.stderr
		err = cmd.Run()
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			if code := ee.ExitCode(); code >= 0 {
				return &exitError{code: code}
			}
			return fmt.Errorf("ssh: %w", err)
		}
		if err != nil {
			return fmt.Errorf("running %s: %w", *sshPath, err)
		}
		return nil
	}
	return c
}

// liveTunnel picks the tunnel to target that lasts longest.
func liveTunnel(st wire.LocalStatus, target string, now time.Time) (wire.Tunnel, error) {
	var best wire.Tunnel
	found := false
	for _, t := range st.Tunnels {
		if t.Target == target && t.ExpiresAt.After(now) && (!found || t.ExpiresAt.After(best.ExpiresAt)) {
			best, found = t, true
		}
	}
	if !found {
		return wire.Tunnel{}, fmt.Errorf("no live tunnel to %s; ask for one with: pinhole request %s --for 30m --reason TEXT", target, target)
	}
	if best.Protocol != "ssh" {
		return wire.Tunnel{}, fmt.Errorf("%s is a %s target, not ssh: connect your client to %s", target, best.Protocol, best.Local)
	}
	return best, nil
}

// sshArgs builds ssh's arguments for tunnel t.
func sshArgs(t wire.Tunnel, target string, command []string) ([]string, error) {
	ap, err := netip.ParseAddrPort(t.Local)
	if err != nil || !ap.Addr().IsLoopback() {
		return nil, fmt.Errorf("the agent reported a bad local address %q for %s", t.Local, target)
	}
	if t.KeyFile == "" || t.CertFile == "" || t.KnownHostsFile == "" {
		return nil, fmt.Errorf("the tunnel to %s has no SSH key, certificate or known_hosts", target)
	}
	alias := t.HostKeyAlias
	if alias == "" {
		alias = target
	}
	argv := []string{
		"-F", "/dev/null",
		"-p", fmt.Sprint(ap.Port()),
		"-i", t.KeyFile,
		"-o", "CertificateFile=" + t.CertFile,
		"-o", "IdentitiesOnly=yes",
		"-o", "UserKnownHostsFile=" + t.KnownHostsFile,
		"-o", "GlobalKnownHostsFile=/dev/null",
		"-o", "HostKeyAlias=" + alias,
		"-o", "StrictHostKeyChecking=yes",
		"-o", "BatchMode=yes",
	}
	if t.Login != "" {
		argv = append(argv, "-l", t.Login)
	}
	// "--" ends ssh's options before the host: after the host, ssh takes
	// every word, a "--" included, as the remote command.
	argv = append(argv, "--", ap.Addr().String())
	return append(argv, command...), nil
}
