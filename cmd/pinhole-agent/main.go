// Command pinhole-agent runs on a privileged workstation: it enrolls the
// workstation with the broker, reports its posture, and brings a userspace
// WireGuard tunnel up for every grant. See package agent.
//
//	pinhole-agent enroll --broker URL --ca FILE --user NAME [--state DIR]
//	pinhole-agent run [--state DIR] [--posture-every 60s]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/pinhole-dev/pinhole/agent"
	"github.com/pinhole-dev/pinhole/internal/client"
)

const usage = `usage:
  pinhole-agent enroll --broker URL --ca FILE --user NAME [--state DIR]
  pinhole-agent run [--state DIR] [--posture-every 60s] [--log-level info]

The state directory defaults to $PINHOLE_STATE or ~/.local/state/pinhole.
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

// run executes one subcommand and returns the exit status: 0 success, 1
// failure, 2 usage error.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	switch args[0] {
	case "enroll":
		return enroll(ctx, args[1:], stdout, stderr)
	case "run":
		return runAgent(ctx, args[1:], stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "pinhole-agent: unknown command %q\n%s", args[0], usage)
		return 2
	}
}

// parseFlags parses a subcommand's flags and reports errors naming the flag.
func parseFlags(fs *flag.FlagSet, args []string, stderr io.Writer) (ok bool, code int) {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(stderr)
			fmt.Fprint(stderr, usage, "\nFlags:\n")
			fs.PrintDefaults()
			return false, 0
		}
		fmt.Fprintf(stderr, "pinhole-agent %s: %v\n%s", fs.Name(), err, usage)
		return false, 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "pinhole-agent %s: unexpected argument %q\n%s", fs.Name(), fs.Arg(0), usage)
		return false, 2
	}
	return true, 0
}

// stateFlag registers --state and returns a function giving its value or
// the default.
func stateFlag(fs *flag.FlagSet) func() (string, error) {
	s := fs.String("state", "", "state `directory` (default $PINHOLE_STATE or ~/.local/state/pinhole)")
	return func() (string, error) {
		if *s != "" {
			return *s, nil
		}
		return client.DefaultStateDir()
	}
}

func newLogger(w io.Writer, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("invalid value %q for flag -log-level: want debug, info, warn or error", level)
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l})), nil
}

func enroll(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("enroll", flag.ContinueOnError)
	broker := fs.String("broker", "", "broker `URL`, e.g. https://broker.example:8443 (required)")
	ca := fs.String("ca", "", "`file` with the broker's TLS CA certificate, PEM (required)")
	user := fs.String("user", "", "the `name` of the user this workstation belongs to (required)")
	state := stateFlag(fs)
	logLevel := fs.String("log-level", "warn", "log `level`: debug, info, warn or error")
	if ok, code := parseFlags(fs, args, stderr); !ok {
		return code
	}
	for _, f := range []struct{ name, val string }{{"broker", *broker}, {"ca", *ca}, {"user", *user}} {
		if f.val == "" {
			fmt.Fprintf(stderr, "pinhole-agent enroll: flag --%s is required\n%s", f.name, usage)
			return 2
		}
	}
	log, err := newLogger(stderr, *logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "pinhole-agent enroll: %v\n", err)
		return 2
	}
	dir, err := state()
	if err != nil {
		fmt.Fprintf(stderr, "pinhole-agent enroll: %v\n", err)
		return 1
	}
	if err := agent.Enroll(ctx, agent.Config{StateDir: dir, Logger: log, Version: version()}, *broker, *ca, *user, stdout); err != nil {
		fmt.Fprintf(stderr, "pinhole-agent: %v\n", err)
		return 1
	}
	return 0
}

func runAgent(ctx context.Context, args []string, stderr io.Writer) int {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	state := stateFlag(fs)
	every := fs.Duration("posture-every", agent.DefaultPostureEvery, "interval between posture reports")
	logLevel := fs.String("log-level", "info", "log `level`: debug, info, warn or error")
	if ok, code := parseFlags(fs, args, stderr); !ok {
		return code
	}
	if *every < time.Second {
		fmt.Fprintf(stderr, "pinhole-agent run: invalid value %v for flag -posture-every: must be at least 1s\n", *every)
		return 2
	}
	log, err := newLogger(stderr, *logLevel)
	if err != nil {
		fmt.Fprintf(stderr, "pinhole-agent run: %v\n", err)
		return 2
	}
	dir, err := state()
	if err != nil {
		fmt.Fprintf(stderr, "pinhole-agent run: %v\n", err)
		return 1
	}
	a, err := agent.New(agent.Config{StateDir: dir, Logger: log, PostureEvery: *every, Version: version()})
	if err != nil {
		fmt.Fprintf(stderr, "pinhole-agent: %v\n", err)
		return 1
	}
	if err := a.Run(ctx); err != nil {
		log.Error("agent failed", "err", err)
		return 1
	}
	return 0
}

// version is the module version the binary was built from.
func version() string {
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
		return bi.Main.Version
	}
	return "dev"
}
