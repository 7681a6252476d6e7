package cli

import (
	"fmt"
	"math"
	"text/tabwriter"
	"time"

	"github.com/pinhole-dev/pinhole/internal/recording"
)

func recordingsCmd() *command {
	c := &command{name: "recordings", usage: "", summary: "list recorded sessions"}
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
		recs, err := cl.Recordings(e.ctx)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(e.stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintf(tw, "ID\tREQUEST\tUSER\tTARGET\tKIND\tSTARTED (UTC)\tDURATION\tSIZE\n")
		for _, r := range recs {
			dur := "live"
			if !r.Ended.IsZero() {
				dur = r.Ended.Sub(r.Started).Round(time.Second).String()
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\t%d\n", r.ID, r.Request, r.User, r.Target, r.Kind, r.Started.UTC().Format(time.DateTime), dur, r.Size)
		}
		return tw.Flush()
	}
	return c
}

func playCmd() *command {
	c := &command{name: "play", usage: "ID [--speed N] [--max-idle D]", summary: "replay a recorded terminal session"}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		speed := fs.Float64("speed", 1, "playback speed factor")
		maxIdle := fs.Duration("max-idle", recording.DefaultMaxIdle, "longest pause between events")
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos, "ID"); err != nil {
			return err
		}
		if *speed <= 0 || math.IsInf(*speed, 0) || math.IsNaN(*speed) {
			return usagef(path, "flag --speed must be a positive number")
		}
		if *maxIdle <= 0 {
			return usagef(path, "flag --max-idle must be positive")
		}
		cl, err := e.client()
		if err != nil {
			return err
		}
		rc, err := cl.RecordingCast(e.ctx, pos[0])
		if err != nil {
			return fmt.Errorf("recording %s: %w", pos[0], err)
		}
		defer rc.Close()
		if err := recording.Play(e.ctx, rc, e.stdout, recording.PlayOptions{Speed: *speed, MaxIdle: *maxIdle}); err != nil {
			return fmt.Errorf("playing %s: %w", pos[0], err)
		}
		return nil
	}
	return c
}
