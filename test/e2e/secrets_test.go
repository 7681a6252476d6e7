package e2e

import (
	"io/fs"
	"path/filepath"
	"testing"
)

// TestSecretFilesAreOwnerOnly: everything the broker and the agent keep on
// disk is readable by its owner only (the broker's public TLS certificate
// aside), and their directories are 0700.
func TestSecretFilesAreOwnerOnly(t *testing.T) {
	e := newEnv(t)
	alice := e.invite("alice", "dba")
	ws := e.enroll(alice)
	public := map[string]bool{"cert.pem": true, "broker-ca.pem": true} // public certificates
	for _, root := range []string{filepath.Join(e.dir, "broker"), ws} {
		n := 0
		err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			fi, err := d.Info()
			if err != nil {
				return err
			}
			mode := fi.Mode()
			switch {
			case d.IsDir():
				if mode.Perm() != 0o700 {
					t.Errorf("directory %s has mode %v, want 0700", path, mode.Perm())
				}
			case mode&fs.ModeSocket != 0:
				if mode.Perm()&0o077 != 0 {
					t.Errorf("socket %s has mode %v", path, mode.Perm())
				}
			case public[d.Name()]:
			default:
				n++
				if mode.Perm()&0o077 != 0 {
					t.Errorf("%s has mode %v, want owner-only", path, mode.Perm())
				}
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			t.Fatalf("no files checked under %s", root)
		}
	}
}
