// Command pinhole is the CLI of pinhole: request access to a target, connect
// through its tunnel, revoke, replay recordings, verify the audit log and
// administer users. It talks to the local pinhole-agent; see package
// internal/cli.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/pinhole-dev/pinhole/internal/cli"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := cli.Main(ctx, os.Args[1:], os.Stdin, os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}
