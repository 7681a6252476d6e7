package cli

import (
	"fmt"

	"github.com/pinhole-dev/pinhole/internal/wire"
)

func revokeCmd() *command {
	c := &command{name: "revoke", usage: "ID [--reason TEXT]", summary: "end a grant or cancel a pending request"}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		reason := fs.String("reason", "", "why the grant is ended")
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos, "ID"); err != nil {
			return err
		}
		if len(*reason) > maxReasonLen {
			return usagef(path, "flag --reason is longer than %d bytes", maxReasonLen)
		}
		cl, err := e.client()
		if err != nil {
			return err
		}
		r, err := cl.Revoke(e.ctx, pos[0], wire.RevokeRequest{Reason: *reason})
		if err != nil {
			return fmt.Errorf("revoking %s: %w", pos[0], err)
		}
		fmt.Fprintf(e.stdout, "request %s: %s\n", r.ID, r.State)
		return nil
	}
	return c
}
