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
	c := &command{name: "play", usage: "ID [--speed N] [--max-idle D] [--raw]", summary: "replay a recorded terminal session",
		help: "Replays the session's terminal output with its timing. Terminal control strings\n" +
			"(OSC, DCS, APC, PM, SOS: clipboard writes, window titles) are dropped so that a\n" +
			"recording cannot act on your terminal; --raw replays the recorded bytes exactly."}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		speed := fs.Float64("speed", 1, "playback speed factor")
		maxIdle := duration(fs, "max-idle", recording.DefaultMaxIdle, "longest pause between events")
		raw := fs.Bool("raw", false, "replay the recorded bytes exactly, terminal control strings included")
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
		if err := recording.Play(e.ctx, rc, e.stdout, recording.PlayOptions{Speed: *speed, MaxIdle: *maxIdle, Raw: *raw}); err != nil {
			return fmt.Errorf("playing %s: %w", pos[0], err)
		}
		return nil
	}
	return c
}
