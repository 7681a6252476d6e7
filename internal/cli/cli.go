// Package cli is the pinhole command: a small command tree over the agent's
// local API (package client, ForAgent). Every broker call goes through the
// agent, which adds the device identity, so the CLI holds no keys and links
// neither WireGuard, gVisor nor a SQL driver.
//
// Exit status: 0 on success, 1 when the command failed (a refusal, a failed
// verification, an unreachable agent), 2 for a usage error; `pinhole ssh`
// passes on ssh's own status.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/client"
)

// command is one node of the command tree.
type command struct {
	name    string
	usage   string // arguments after the command path
	summary string
	help    string // longer description, optional
	run     func(e *env, path string, args []string) error
	subs    []*command
}

// env is what a command runs with.
type env struct {
	ctx    context.Context
	stdin  io.Reader
	stdout io.Writer
	stderr io.Writer
	now    func() time.Time

	agentSock string // --agent; empty means the default
}

// client returns a client of the agent's local API.
func (e *env) client() (*client.Client, error) {
	if e.agentSock == "" {
		s, err := client.DefaultAgentSocket()
		if err != nil {
			return nil, err
		}
		e.agentSock = s
	}
	return client.ForAgent(e.agentSock), nil
}

// usageError is a command-line mistake: exit status 2.
type usageError struct {
	path string // command path, e.g. "request"
	msg  string
}

func (u *usageError) Error() string { return u.msg }

func usagef(path, format string, args ...any) error {
	return &usageError{path: path, msg: fmt.Sprintf(format, args...)}
}

// exitError carries a child process's exit status.
type exitError struct{ code int }

func (e *exitError) Error() string { return fmt.Sprintf("exit status %d", e.code) }

// root builds the command tree.
func root() *command {
	return &command{
		name:  "pinhole",
		usage: "[--agent SOCK] COMMAND [ARGS]",
		subs: []*command{
			requestCmd(),
			statusCmd(),
			sshCmd(),
			probeCmd(),
			revokeCmd(),
			recordingsCmd(),
			playCmd(),
			{
				name: "audit", usage: "SUBCOMMAND", summary: "work with the audit log",
				subs: []*command{auditVerifyCmd(), auditExportCmd()},
			},
			{
				name: "admin", usage: "SUBCOMMAND", summary: "administer the broker",
				subs: []*command{{
					name: "user", usage: "SUBCOMMAND", summary: "manage users",
					subs: []*command{adminUserAddCmd()},
				}},
			},
			{name: "help", usage: "[COMMAND...]", summary: "show help for a command"},
		},
	}
}

// Main runs the pinhole command with args (without the program name) and
// returns the exit status.
func Main(ctx context.Context, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	e := &env{ctx: ctx, stdin: stdin, stdout: stdout, stderr: stderr, now: time.Now}
	r := root()

	gfs := newFlagSet("pinhole")
	gfs.StringVar(&e.agentSock, "agent", "", "the agent's local API `socket` ($PINHOLE_AGENT_SOCKET or <state dir>/agent.sock)")
	if err := gfs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			printUsage(stdout, r, "pinhole", gfs)
			return 0
		}
		fmt.Fprintf(stderr, "pinhole: %v\n", err)
		fmt.Fprintf(stderr, "Run 'pinhole help' for usage.\n")
		return 2
	}
	args = gfs.Args()
	if len(args) == 0 {
		printUsage(stderr, r, "pinhole", gfs)
		return 2
	}
	if args[0] == "help" {
		return help(e, r, args[1:], gfs)
	}
	cmd, path, rest, err := find(r, args)
	switch {
	case err != nil:
	case cmd.run != nil:
		err = cmd.run(e, path, rest)
	case len(rest) > 0 && isHelpFlag(rest[0]):
		printUsage(stdout, cmd, "pinhole "+path, nil)
		return 0
	case len(rest) > 0:
		err = usagef(path, "unknown flag %s (give a subcommand first)", rest[0])
	default:
		err = usagef(path, "missing subcommand")
	}
	return report(e, r, err)
}

func isHelpFlag(s string) bool { return s == "-h" || s == "-help" || s == "--help" }

// find walks args down the command tree and returns the deepest command,
// its path ("admin user add") and the remaining arguments.
func find(r *command, args []string) (*command, string, []string, error) {
	cmd := r
	var path []string
	for cmd.run == nil && len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		var next *command
		for _, s := range cmd.subs {
			if s.name == args[0] {
				next = s
			}
		}
		if next == nil {
			return nil, "", nil, usagef(strings.Join(path, " "), "unknown command %q", strings.Join(append(path, args[0]), " "))
		}
		cmd, path, args = next, append(path, next.name), args[1:]
	}
	return cmd, strings.Join(path, " "), args, nil
}

// report prints err and returns the exit status.
func report(e *env, r *command, err error) int {
	if err == nil {
		return 0
	}
	var ue *usageError
	var ee *exitError
	var oe *net.OpError
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		name := "pinhole"
		if ue.path != "" {
			name += " " + ue.path
		}
		fmt.Fprintf(e.stderr, "%s: %s\n", name, ue.msg)
		if c, _, _, ferr := find(r, strings.Fields(ue.path)); ferr == nil && ue.path != "" {
			fmt.Fprintf(e.stderr, "usage: pinhole %s %s\n", ue.path, c.usage)
		}
		fmt.Fprintf(e.stderr, "Run '%s' for usage.\n", strings.TrimSpace("pinhole help "+ue.path))
		return 2
	case errors.As(err, &ee):
		return ee.code
	case errors.As(err, &oe) && oe.Op == "dial":
		fmt.Fprintf(e.stderr, "pinhole: cannot reach the pinhole agent at %s (is `pinhole-agent run` running?): %v\n", e.agentSock, oe.Err)
		return 1
	default:
		fmt.Fprintf(e.stderr, "pinhole: %v\n", err)
		return 1
	}
}

// help prints the help of the command named by args.
func help(e *env, r *command, args []string, gfs *flag.FlagSet) int {
	if len(args) == 0 {
		printUsage(e.stdout, r, "pinhole", gfs)
		return 0
	}
	cmd, path, rest, err := find(r, args)
	if err == nil && len(rest) > 0 {
		err = usagef("help", "unknown command %q", strings.Join(args, " "))
	}
	if err != nil {
		return report(e, r, err)
	}
	if cmd.run == nil {
		printUsage(e.stdout, cmd, "pinhole "+path, nil)
		return 0
	}
	// Commands print their own flags on -h.
	return report(e, r, cmd.run(e, path, []string{"-h"}))
}

// printUsage prints a group's usage and its subcommands.
func printUsage(w io.Writer, c *command, name string, fs *flag.FlagSet) {
	fmt.Fprintf(w, "usage: %s %s\n", name, c.usage)
	if c.summary != "" {
		fmt.Fprintf(w, "\n%s.\n", capitalize(c.summary))
	}
	if len(c.subs) > 0 {
		fmt.Fprintf(w, "\nCommands:\n")
		for _, s := range c.subs {
			fmt.Fprintf(w, "  %-11s %s\n", s.name, s.summary)
		}
	}
	if fs != nil {
		fmt.Fprintf(w, "\nFlags:\n")
		fs.SetOutput(w)
		fs.PrintDefaults()
		fs.SetOutput(io.Discard)
	}
	if c.name == "pinhole" {
		fmt.Fprintf(w, "\nRun 'pinhole help COMMAND' for a command's flags.\n")
	}
}

func capitalize(s string) string {
	if s == "" {
		return s
	}
	return strings.ToUpper(s[:1]) + s[1:]
}

// newFlagSet returns a silent flag set; errors are reported by the caller.
func newFlagSet(name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	return fs
}

// parse parses args for the command at path, allowing flags before, between
// and after positional arguments ("--" ends flags). It registers --agent on
// fs. On -h it prints the command's usage and flags to stdout and returns
// flag.ErrHelp.
func (e *env) parse(fs *flag.FlagSet, c *command, path string, args []string) ([]string, error) {
	fs.StringVar(&e.agentSock, "agent", e.agentSock, "the agent's local API `socket`")
	var pos []string
	for {
		err := fs.Parse(args)
		if errors.Is(err, flag.ErrHelp) {
			e.printCommandHelp(fs, c, path)
			return nil, flag.ErrHelp
		}
		if err != nil {
			return nil, usagef(path, "%v", err)
		}
		rest := fs.Args()
		consumed := len(args) - len(rest)
		if consumed > 0 && args[consumed-1] == "--" {
			return append(pos, rest...), nil
		}
		if len(rest) == 0 {
			return pos, nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}

// printCommandHelp prints a runnable command's usage and flags.
func (e *env) printCommandHelp(fs *flag.FlagSet, c *command, path string) {
	fmt.Fprintf(e.stdout, "usage: pinhole %s %s\n\n%s.\n", path, c.usage, capitalize(c.summary))
	if c.help != "" {
		fmt.Fprintf(e.stdout, "\n%s\n", c.help)
	}
	fmt.Fprintf(e.stdout, "\nFlags:\n")
	fs.SetOutput(e.stdout)
	fs.PrintDefaults()
	fs.SetOutput(io.Discard)
}

// wantArgs checks the number of positional arguments.
func wantArgs(path string, pos []string, names ...string) error {
	if len(pos) < len(names) {
		return usagef(path, "missing %s", names[len(pos)])
	}
	if len(pos) > len(names) {
		return usagef(path, "unexpected argument %q", pos[len(names)])
	}
	return nil
}

// durationFlag is a time.Duration flag whose parse error says what a
// duration looks like ("10" alone has no unit).
type durationFlag struct{ d *time.Duration }

func (f durationFlag) String() string {
	if f.d == nil {
		return "0s"
	}
	return f.d.String()
}

func (f durationFlag) Set(s string) error {
	d, err := time.ParseDuration(s)
	if err != nil {
		return errors.New("want a duration with a unit, like 45m, 90s or 1h30m")
	}
	*f.d = d
	return nil
}

// duration defines a duration flag on fs with a clear parse error.
func duration(fs *flag.FlagSet, name string, value time.Duration, usage string) *time.Duration {
	d := value
	fs.Var(durationFlag{&d}, name, usage)
	return &d
}
