package posture

import (
	"io/fs"
	"log/slog"
	"path"
	"strconv"
	"strings"
)

// maxStackDepth bounds how many device-mapper layers (e.g. filesystem on
// LVM on LUKS) rootEncrypted follows.
const maxStackDepth = 8

// rootEncrypted reports whether the filesystem mounted at "/" sits on
// dm-crypt. The root mount's device is looked up in proc/self/mounts and
// mapped to its sysfs directory: /dev/dm-N directly, /dev/mapper/NAME through
// sys/block/dm-*/dm/name, anything else (e.g. /dev/root) through the
// major:minor in proc/self/mountinfo and sys/dev/block/MAJ:MIN.
//
// A device-mapper device counts as encrypted when its dm/uuid starts with
// "CRYPT-" (as cryptsetup names LUKS1, LUKS2, plain, TCRYPT and BITLK
// mappings), except the "CRYPT-SUBDEV-" integrity layer beneath an
// authenticated-encryption mapping; otherwise (LVM, RAID, multipath) it counts
// only when it has slaves and every slave is itself encrypted, so an LVM
// volume group spanning an unencrypted disk is not encrypted. A root on a
// plain partition, overlayfs, tmpfs, NFS or ZFS is reported as not encrypted
// (ZFS native encryption and fscrypt are not detected).
func rootEncrypted(root fs.FS, log *slog.Logger) bool {
	dir, why := rootBlockDir(root)
	if dir == "" {
		log.Debug("posture: disk encryption not established", "reason", why)
		return false
	}
	ok, why := dmEncrypted(root, dir, 0)
	if !ok {
		log.Debug("posture: disk encryption not established", "device", dir, "reason", why)
	}
	return ok
}

// rootBlockDir returns the sysfs directory of the device-mapper device that
// holds the root filesystem, or "" and the reason it has none.
func rootBlockDir(root fs.FS) (dir, why string) {
	b, err := readBounded(root, "proc/self/mounts", maxMountsFile)
	if err != nil {
		return "", "cannot read mount table: " + err.Error()
	}
	var dev string
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) >= 2 && unescapeMount(f[1]) == "/" {
			dev = unescapeMount(f[0]) // the last mount on "/" is the visible one
		}
	}
	switch {
	case dev == "":
		return "", "no filesystem mounted on /"
	case strings.HasPrefix(dev, "/dev/dm-"):
		name := strings.TrimPrefix(dev, "/dev/")
		if !validDevName(name) {
			return "", "root device " + strconv.Quote(dev) + " has an invalid name"
		}
		return path.Join("sys/block", name), ""
	case strings.HasPrefix(dev, "/dev/mapper/"):
		want := strings.TrimPrefix(dev, "/dev/mapper/")
		entries, err := fs.ReadDir(root, "sys/block")
		if err != nil {
			return "", "cannot list block devices: " + err.Error()
		}
		for _, e := range entries {
			if !strings.HasPrefix(e.Name(), "dm-") || !validDevName(e.Name()) {
				continue
			}
			dir := path.Join("sys/block", e.Name())
			name, err := readBounded(root, path.Join(dir, "dm/name"), maxSmallFile)
			if err == nil && strings.TrimSpace(string(name)) == want {
				return dir, ""
			}
		}
		return "", "no device-mapper device named " + strconv.Quote(want)
	}
	// Fall back to the device number, which also resolves /dev/root and
	// /dev/disk/by-* names.
	b, err = readBounded(root, "proc/self/mountinfo", maxMountsFile)
	if err != nil {
		return "", "root device " + strconv.Quote(dev) + " is not a device-mapper path and mountinfo is unreadable: " + err.Error()
	}
	var majMin string
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) >= 5 && unescapeMount(f[4]) == "/" {
			majMin = f[2]
		}
	}
	if !validMajMin(majMin) {
		return "", "root device " + strconv.Quote(dev) + " has no usable device number"
	}
	dir = path.Join("sys/dev/block", majMin)
	if _, err := fs.Stat(root, path.Join(dir, "dm/uuid")); err != nil {
		return "", "root device " + strconv.Quote(dev) + " (" + majMin + ") is not a device-mapper device"
	}
	return dir, ""
}

// dmEncrypted reports whether the device-mapper device at sysfs directory
// dir is dm-crypt or stacked only on dm-crypt devices, and if not, why.
func dmEncrypted(root fs.FS, dir string, depth int) (bool, string) {
	if depth > maxStackDepth {
		return false, "device stack deeper than " + strconv.Itoa(maxStackDepth)
	}
	b, err := readBounded(root, path.Join(dir, "dm/uuid"), maxSmallFile)
	if err != nil {
		return false, "cannot read device-mapper uuid: " + err.Error()
	}
	uuid := strings.TrimSpace(string(b))
	if strings.HasPrefix(uuid, "CRYPT-") && !strings.HasPrefix(uuid, "CRYPT-SUBDEV-") {
		return true, ""
	}
	slaves, err := fs.ReadDir(root, path.Join(dir, "slaves"))
	if err != nil {
		return false, path.Base(dir) + " is not dm-crypt and its slaves are unreadable: " + err.Error()
	}
	if len(slaves) == 0 {
		return false, path.Base(dir) + " (" + uuidKind(uuid) + ") is not dm-crypt and has no slaves"
	}
	for _, s := range slaves {
		name := s.Name()
		if !strings.HasPrefix(name, "dm-") || !validDevName(name) {
			return false, path.Base(dir) + " sits on " + strconv.Quote(name) + ", which is not a device-mapper device"
		}
		if ok, why := dmEncrypted(root, path.Join("sys/block", name), depth+1); !ok {
			return false, why
		}
	}
	return true, ""
}

// uuidKind returns the subsystem prefix of a device-mapper uuid (e.g.
// "LVM"), which names the kind of mapping without its identifiers.
func uuidKind(uuid string) string {
	if k, _, ok := strings.Cut(uuid, "-"); ok && k != "" {
		return k
	}
	return "no uuid"
}

// validDevName reports whether name is a plain kernel device name, safe to
// join into a path.
func validDevName(name string) bool {
	if name == "" || name == "." || name == ".." || len(name) > 64 {
		return false
	}
	return !strings.ContainsAny(name, "/\\\x00")
}

// validMajMin reports whether s looks like "MAJOR:MINOR".
func validMajMin(s string) bool {
	maj, min, ok := strings.Cut(s, ":")
	if !ok {
		return false
	}
	_, err1 := strconv.ParseUint(maj, 10, 32)
	_, err2 := strconv.ParseUint(min, 10, 32)
	return err1 == nil && err2 == nil
}

// unescapeMount undoes the octal escapes (\040 for space, \011, \012, \134)
// the kernel uses for special characters in mount table fields.
func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
