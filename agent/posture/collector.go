// Package posture collects the posture of the local Linux machine for the
// agent: operating system and kernel, whether the root filesystem is
// encrypted, whether a host firewall has rules, and the screen lock state.
//
// Everything is read from files under a root filesystem (procfs, sysfs and
// /etc), never by running external commands, so collection needs no
// privileges and no network, and tests drive it with fstest.MapFS fixtures.
// What cannot be determined is reported as false or "unknown", never as true:
// a broker rule that requires a property fails closed on a machine where the
// agent cannot prove it.
//
// The report schema, signing and verification live in the shared package
// internal/posture; this package only fills a report in.
package posture

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"strings"
	"time"
	"unicode/utf8"

	postureschema "github.com/pinhole-dev/pinhole/internal/posture"
)

// unknown is reported for a string property that could not be determined.
const unknown = "unknown"

// maxSmallFile bounds the size of the one-line files read from procfs,
// sysfs and /etc; maxMountsFile bounds the mount tables.
const (
	maxSmallFile  = 64 << 10
	maxMountsFile = 4 << 20
)

// Collector gathers a posture report from the local machine. The zero value
// collects from the real machine.
type Collector struct {
	// Root is the filesystem that procfs, sysfs and /etc are read from,
	// with paths relative to "/" (e.g. "proc/self/mounts"); nil means
	// os.DirFS("/").
	Root fs.FS
	// Hostname returns the machine's host name; nil means os.Hostname.
	Hostname func() (string, error)
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// Logger receives debug lines explaining what could not be determined
	// and why; nil discards them.
	Logger *slog.Logger
	// AgentVersion is reported as the report's agent version; empty is
	// reported as "unknown".
	AgentVersion string
}

// Collect reads the machine's posture. Device and Nonce are left empty: the
// caller sets them before signing the report with posture.Sign. Collect
// fails only when ctx is done; any property it cannot read is reported as
// false or "unknown".
func (c *Collector) Collect(ctx context.Context) (postureschema.Report, error) {
	root := c.Root
	if root == nil {
		root = os.DirFS("/")
	}
	hostname := c.Hostname
	if hostname == nil {
		hostname = os.Hostname
	}
	now := c.Now
	if now == nil {
		now = time.Now
	}
	log := c.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}

	r := postureschema.Report{
		ScreenLock:   postureschema.ScreenLockUnknown,
		AgentVersion: orUnknown(c.AgentVersion),
	}
	steps := []struct {
		name string
		run  func()
	}{
		{"hostname", func() {
			h, err := hostname()
			if err != nil {
				log.Debug("posture: host name unknown", "err", err)
			}
			r.Hostname = orUnknown(h)
		}},
		{"os", func() { r.OS = orUnknown(osName(root, log)) }},
		{"kernel", func() { r.Kernel = orUnknown(kernelRelease(root, log)) }},
		{"disk", func() { r.DiskEncrypted = rootEncrypted(root, log) }},
		{"firewall", func() { r.FirewallActive = firewallActive(root, log) }},
		// Screen lock: a headless Linux machine has no screen to lock, and
		// asking a desktop session (logind, the screensaver's D-Bus API)
		// is not implemented, so it is always reported as unknown.
	}
	for _, s := range steps {
		if err := ctx.Err(); err != nil {
			return postureschema.Report{}, fmt.Errorf("collecting posture (%s): %w", s.name, err)
		}
		s.run()
	}
	r.CollectedAt = now().UTC()
	return r, nil
}

// osName returns PRETTY_NAME from os-release(5): /etc/os-release, or
// /usr/lib/os-release when the former does not exist.
func osName(root fs.FS, log *slog.Logger) string {
	for _, name := range []string{"etc/os-release", "usr/lib/os-release"} {
		b, err := readBounded(root, name, maxSmallFile)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			log.Debug("posture: OS unknown", "file", name, "err", err)
			return ""
		}
		if v := osReleaseValue(string(b), "PRETTY_NAME"); v != "" {
			return v
		}
		log.Debug("posture: OS unknown: no PRETTY_NAME", "file", name)
		return ""
	}
	log.Debug("posture: OS unknown: no os-release file")
	return ""
}

// osReleaseValue returns the value of key in an os-release document, with
// shell quoting removed.
func osReleaseValue(doc, key string) string {
	for line := range strings.Lines(doc) {
		line = strings.TrimSpace(line)
		k, v, ok := strings.Cut(line, "=")
		if !ok || strings.HasPrefix(line, "#") || strings.TrimSpace(k) != key {
			continue
		}
		return unquoteShell(strings.TrimSpace(v))
	}
	return ""
}

// unquoteShell removes the single or double quotes os-release(5) allows
// around a value, and the backslash escapes allowed inside double quotes.
func unquoteShell(v string) string {
	if len(v) >= 2 && v[0] == '\'' && v[len(v)-1] == '\'' {
		return v[1 : len(v)-1]
	}
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		v = v[1 : len(v)-1]
		var b strings.Builder
		for i := 0; i < len(v); i++ {
			if v[i] == '\\' && i+1 < len(v) && strings.IndexByte("\"\\$`", v[i+1]) >= 0 {
				i++
			}
			b.WriteByte(v[i])
		}
		return b.String()
	}
	return v
}

// kernelRelease returns the running kernel's release string.
func kernelRelease(root fs.FS, log *slog.Logger) string {
	b, err := readBounded(root, "proc/sys/kernel/osrelease", maxSmallFile)
	if err != nil {
		log.Debug("posture: kernel unknown", "err", err)
		return ""
	}
	return strings.TrimSpace(string(b))
}

// readBounded reads the file name from fsys, refusing files larger than max
// bytes. It reads until EOF rather than trusting the file size, which is 0
// for procfs and sysfs files.
func readBounded(fsys fs.FS, name string, max int64) ([]byte, error) {
	f, err := fsys.Open(name)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, max+1))
	if err != nil {
		return nil, fmt.Errorf("reading %s: %w", name, err)
	}
	if int64(len(b)) > max {
		return nil, fmt.Errorf("reading %s: larger than %d bytes", name, max)
	}
	return b, nil
}

// orUnknown cleans s for a report (valid UTF-8, no control or invisible
// formatting characters, bounded length) and returns "unknown" when nothing
// is left.
func orUnknown(s string) string {
	s = strings.ToValidUTF8(s, "\uFFFD")
	s = strings.Map(func(r rune) rune {
		if postureschema.Hidden(r) {
			return ' '
		}
		return r
	}, s)
	s = strings.TrimSpace(s)
	for len(s) > postureschema.MaxFieldLen {
		_, size := utf8.DecodeLastRuneInString(s)
		s = s[:len(s)-size]
	}
	if s == "" {
		return unknown
	}
	return s
}
