// Command pinhole-broker runs the pinhole broker.
//
//	pinhole-broker serve --data DIR --config FILE [--listen ADDR] [--public-url URL] [--wg-port N] [--notify-webhook URL]
//	pinhole-broker bootstrap --data DIR --config FILE --admin NAME [--listen ADDR] [--public-url URL]
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
	"syscall"

	"github.com/pinhole-dev/pinhole/broker"
	"github.com/pinhole-dev/pinhole/broker/service"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	os.Exit(code)
}

const usage = `usage:
  pinhole-broker serve --data DIR --config FILE [flags]
  pinhole-broker bootstrap --data DIR --config FILE --admin NAME [flags]

Run "pinhole-broker serve -h" or "pinhole-broker bootstrap -h" for the flags.
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	cmd, args := args[0], args[1:]
	fs := flag.NewFlagSet("pinhole-broker "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var cfg broker.Config
	fs.StringVar(&cfg.DataDir, "data", "", "data directory (store, keys, recordings)")
	fs.StringVar(&cfg.ConfigFile, "config", "", "YAML file of targets, roles and rules")
	fs.StringVar(&cfg.Listen, "listen", "127.0.0.1:8443", "HTTPS listen address")
	fs.StringVar(&cfg.PublicURL, "public-url", "", "public https URL (default https://localhost:PORT)")
	logLevel := fs.String("log-level", "info", "debug, info, warn or error")
	var admin string
	switch cmd {
	case "serve":
		fs.IntVar(&cfg.WireGuardPort, "wg-port", 51820, "WireGuard UDP port (0 = any free port)")
		fs.StringVar(&cfg.WireGuardHost, "wg-host", "127.0.0.1", "host agents send WireGuard to")
		fs.StringVar(&cfg.NotifyWebhook, "notify-webhook", "", "URL that receives a JSON POST per grant link")
		fs.StringVar(&cfg.UAPIName, "uapi-name", "", "expose the gateway to `wg show NAME` (needs /var/run/wireguard)")
		fs.StringVar(&cfg.AuditWitness, "audit-witness", "", "append every signed audit checkpoint to this `file` (keep it off the broker's admin's reach)")
	case "bootstrap":
		fs.StringVar(&admin, "admin", "", "name of the first admin")
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return 0
	default:
		fmt.Fprintf(stderr, "pinhole-broker: unknown command %q\n%s", cmd, usage)
		return 2
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "pinhole-broker %s: unexpected argument %q\n", cmd, fs.Arg(0))
		return 2
	}
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(stderr, "pinhole-broker: --log-level: %v\n", err)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: lvl}))
	if cfg.DataDir == "" || cfg.ConfigFile == "" {
		fmt.Fprintf(stderr, "pinhole-broker %s: --data and --config are required\n", cmd)
		return 2
	}
	if cmd == "bootstrap" {
		// Checked here, before the data dir is created and keys are made;
		// the service checks the name again when it invites.
		if admin == "" {
			fmt.Fprintf(stderr, "pinhole-broker %s: --admin is required\n", cmd)
			return 2
		}
		if service.CheckUserName(admin) != nil {
			fmt.Fprintf(stderr, "pinhole-broker %s: --admin %q: %s\n", cmd, admin, service.UserNameRule)
			return 2
		}
	}
	var err error
	switch cmd {
	case "serve":
		err = serve(ctx, cfg, stdout)
	case "bootstrap":
		err = bootstrap(ctx, cfg, admin, stdout)
	}
	if err != nil && !errors.Is(err, context.Canceled) {
		fmt.Fprintf(stderr, "pinhole-broker %s: %v\n", cmd, err)
		return 1
	}
	return 0
}

func serve(ctx context.Context, cfg broker.Config, stdout io.Writer) error {
	b, err := broker.New(ctx, cfg)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "pinhole broker at %s (wireguard udp %d); agents trust %s\n", b.URL, b.WireGuardPort(), b.CAFile)
	return b.Run(ctx)
}

func bootstrap(ctx context.Context, cfg broker.Config, admin string, stdout io.Writer) error {
	b, err := broker.Open(ctx, cfg)
	if err != nil {
		return err
	}
	defer b.Close()
	inv, err := b.Service().Bootstrap(ctx, admin)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "first admin %s created. Open this link to register a security key (valid until %s):\n  %s\n",
		inv.User, inv.ExpiresAt.Format("2006-01-02 15:04 MST"), inv.URL)
	return nil
}
