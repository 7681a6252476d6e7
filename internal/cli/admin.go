package cli

import (
	"fmt"
	"time"

	"github.com/pinhole-dev/pinhole/internal/wire"
)

func adminUserAddCmd() *command {
	c := &command{name: "add", usage: "NAME --role ROLE", summary: "invite a user: confirm with your security key, then send them the invite link"}
	c.run = func(e *env, path string, args []string) error {
		fs := newFlagSet(path)
		role := fs.String("role", "", "the user's role, as named in the broker's config (required)")
		pos, err := e.parse(fs, c, path, args)
		if err != nil {
			return err
		}
		if err := wantArgs(path, pos, "NAME"); err != nil {
			return err
		}
		if *role == "" {
			return usagef(path, "flag --role is required")
		}
		cl, err := e.client()
		if err != nil {
			return err
		}
		inv, err := cl.InviteUser(e.ctx, wire.InviteUser{Name: pos[0], Role: *role})
		if err != nil {
			return fmt.Errorf("adding user %s: %w", pos[0], err)
		}
		if inv.ConfirmURL != "" {
			fmt.Fprintf(e.stdout, "confirm the invite for %s (role %s) with your security key, by %s UTC:\n  %s\nthat page then shows %s's one-time invite link\n",
				inv.User, *role, inv.ExpiresAt.UTC().Format(time.DateTime), inv.ConfirmURL, inv.User)
			return nil
		}
		fmt.Fprintf(e.stdout, "invite for %s (role %s), valid until %s UTC:\n  %s\n", inv.User, *role, inv.ExpiresAt.UTC().Format(time.DateTime), inv.URL)
		return nil
	}
	return c
}
