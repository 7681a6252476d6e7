package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// maxUserLen bounds the user name given to Enroll.
const maxUserLen = 128

// Enroll binds this workstation to user at the broker at brokerURL (https),
// whose TLS certificate is signed by the CA in caFile. It creates or loads
// the device key, copies caFile into the state directory, asks the broker to
// enroll the device, prints the confirmation link to out, waits (bounded by
// ctx and the link's expiry) until the user confirms, writes agent.json and
// sends a first posture report.
func Enroll(ctx context.Context, cfg Config, brokerURL, caFile, user string, out io.Writer) error {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	if _, err := parseBrokerURL(brokerURL); err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	if user == "" || len(user) > maxUserLen || strings.ContainsFunc(user, isSpaceOrControl) {
		return fmt.Errorf("enroll: invalid user name %q", user)
	}
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("enroll: creating state directory: %w", err)
	}
	key, err := devicekey.LoadOrCreate(filepath.Join(cfg.StateDir, deviceKeyFile))
	if err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	if err := copyCA(caFile, cfg.StateDir); err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	hc, err := client.DeviceHTTPClient(filepath.Join(cfg.StateDir, brokerCAFile), key)
	if err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	c := client.New(brokerURL, hc)
	hostname, err := os.Hostname()
	if err != nil {
		hostname = "unknown"
	}
	resp, err := c.Enroll(ctx, wire.EnrollRequest{User: user, Hostname: hostname})
	if err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	if resp.DeviceID == "" || resp.ConfirmURL == "" {
		return errors.New("enroll: the broker's answer has no device ID or confirmation link")
	}
	fmt.Fprintf(out, "Open this link and confirm with your security key:\n  %s\n", resp.ConfirmURL)

	if err := waitConfirmed(ctx, cfg, c, resp.ExpiresAt); err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	if err := saveEnrollment(cfg.StateDir, enrollment{BrokerURL: brokerURL, DeviceID: resp.DeviceID, User: user}); err != nil {
		return fmt.Errorf("enroll: %w", err)
	}
	if err := sendPosture(ctx, c, cfg.Collector, key, resp.DeviceID); err != nil {
		return fmt.Errorf("enroll: device confirmed, but %w", err)
	}
	fmt.Fprintf(out, "enrolled: this workstation (%s) is bound to %s; posture report accepted\n", resp.DeviceID, user)
	return nil
}

// waitConfirmed long-polls the device's events until device.confirmed
// arrives, ctx is done or the confirmation link expires. The broker being
// briefly unreachable is retried; a refusal is final.
func waitConfirmed(ctx context.Context, cfg Config, c *client.Client, expires time.Time) error {
	if !expires.IsZero() {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, expires)
		defer cancel()
	}
	var (
		after int64
		bo    backoff
	)
	for {
		cctx, cancel := context.WithTimeout(ctx, eventWait+callTimeout)
		evs, err := c.Events(cctx, after, eventWait)
		cancel()
		if err != nil {
			var apiErr *client.APIError
			switch {
			case errors.As(err, &apiErr):
				return fmt.Errorf("waiting for confirmation: %w", err)
			case ctx.Err() != nil && !expires.IsZero() && !cfg.Now().Before(expires):
				return fmt.Errorf("the confirmation link expired at %s", expires.UTC().Format(time.RFC3339))
			case ctx.Err() != nil:
				return fmt.Errorf("waiting for confirmation: %w", ctx.Err())
			}
			d := bo.next()
			cfg.Logger.Warn("broker unreachable; retrying", "err", err, "retry_in", d.Round(time.Millisecond))
			sleep(ctx, d)
			continue
		}
		bo.reset()
		for _, e := range evs.Events {
			if e.Type == wire.EventDeviceConfirmed {
				return nil
			}
			after = max(after, e.Seq)
		}
		after = max(after, evs.Next)
	}
}
