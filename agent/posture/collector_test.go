package posture

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"errors"
	"io/fs"
	"log/slog"
	"maps"
	"os"
	"runtime"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/google/go-cmp/cmp"

	postureschema "github.com/pinhole-dev/pinhole/internal/posture"
)

var testNow = time.Date(2026, 3, 14, 15, 9, 26, 0, time.UTC)

func file(s string) *fstest.MapFile { return &fstest.MapFile{Data: []byte(s)} }

var emptyDir = &fstest.MapFile{Mode: fs.ModeDir | 0o555}

// fixture merges MapFS parts; later parts win.
func fixture(parts ...fstest.MapFS) fstest.MapFS {
	out := fstest.MapFS{}
	for _, p := range parts {
		maps.Copy(out, p)
	}
	return out
}

var baseSystem = fstest.MapFS{
	"etc/os-release":            file("NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nID=debian\n"),
	"proc/sys/kernel/osrelease": file("6.1.0-18-amd64\n"),
}

func mounts(rootDev, fstype string) fstest.MapFS {
	return fstest.MapFS{
		"proc/self/mounts": file("proc /proc proc rw 0 0\n" + rootDev + " / " + fstype + " rw,relatime 0 0\ntmpfs /run tmpfs rw 0 0\n"),
	}
}

func mountinfo(majMin string) fstest.MapFS {
	return fstest.MapFS{
		"proc/self/mountinfo": file("22 27 0:21 / /proc rw,relatime - proc proc rw\n27 1 " + majMin + " / / rw,relatime - ext4 /dev/root rw\n"),
	}
}

// dm describes sys/block/dm-N with its name, uuid and slaves.
func dm(n, name, uuid string, slaves ...string) fstest.MapFS {
	dir := "sys/block/dm-" + n
	m := fstest.MapFS{
		dir + "/dm/name": file(name + "\n"),
		dir + "/dm/uuid": file(uuid + "\n"),
	}
	if len(slaves) == 0 {
		m[dir+"/slaves"] = emptyDir
	}
	for _, s := range slaves {
		m[dir+"/slaves/"+s] = file("")
	}
	return m
}

// module describes sys/module/NAME with a reference count and holders.
func module(name, refcnt string, holders ...string) fstest.MapFS {
	dir := "sys/module/" + name
	m := fstest.MapFS{dir + "/refcnt": file(refcnt + "\n")}
	if len(holders) == 0 {
		m[dir+"/holders"] = emptyDir
	}
	for _, h := range holders {
		m[dir+"/holders/"+h] = file("")
	}
	return m
}

func TestRootEncrypted(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		fs   fstest.MapFS
		want bool
	}{
		{name: "ok/luks via mapper name", want: true, fs: fixture(
			mounts("/dev/mapper/root", "ext4"),
			dm("0", "root", "CRYPT-LUKS2-0123456789abcdef0123456789abcdef-root"),
			dm("1", "swap", "CRYPT-PLAIN-swap"),
		)},
		{name: "ok/luks via dm-N", want: true, fs: fixture(
			mounts("/dev/dm-3", "xfs"),
			dm("3", "cryptroot", "CRYPT-LUKS1-abcdef-cryptroot"),
		)},
		{name: "ok/lvm on luks", want: true, fs: fixture(
			mounts("/dev/mapper/vg0-root", "ext4"),
			dm("0", "nvme0n1p3_crypt", "CRYPT-LUKS2-abc-nvme0n1p3_crypt", "nvme0n1p3"),
			dm("1", "vg0-root", "LVM-qwertyuiop", "dm-0"),
			dm("2", "vg0-swap", "LVM-asdfghjkl", "dm-0"),
		)},
		{name: "ok/mountinfo device number fallback", want: true, fs: fixture(
			mounts("/dev/root", "ext4"),
			mountinfo("254:0"),
			fstest.MapFS{
				"sys/dev/block/254:0/dm/uuid": file("CRYPT-LUKS2-abc-root\n"),
				"sys/dev/block/254:0/slaves":  emptyDir,
			},
		)},
		{name: "deny/plain partition", want: false, fs: fixture(
			mounts("/dev/nvme0n1p2", "ext4"),
			mountinfo("259:2"),
			fstest.MapFS{"sys/dev/block/259:2/partition": file("2\n")},
		)},
		{name: "deny/lvm on plain disk", want: false, fs: fixture(
			mounts("/dev/mapper/vg0-root", "ext4"),
			dm("0", "vg0-root", "LVM-qwertyuiop", "sda2"),
		)},
		{name: "deny/lvm spanning encrypted and plain", want: false, fs: fixture(
			mounts("/dev/mapper/vg0-root", "ext4"),
			dm("0", "sda2_crypt", "CRYPT-LUKS2-abc-sda2_crypt", "sda2"),
			dm("1", "vg0-root", "LVM-qwertyuiop", "dm-0", "sdb1"),
		)},
		{name: "deny/integrity layer only", want: false, fs: fixture(
			mounts("/dev/dm-0", "ext4"),
			dm("0", "root_dif", "CRYPT-SUBDEV-abc-root_dif", "sda2"),
		)},
		{name: "deny/overlay root", want: false, fs: fixture(
			mounts("overlay", "overlay"),
			mountinfo("0:52"),
		)},
		{name: "deny/overlay mounted over encrypted root", want: false, fs: fixture(
			fstest.MapFS{"proc/self/mounts": file("/dev/mapper/root / ext4 rw 0 0\noverlay / overlay rw 0 0\n")},
			mountinfo("0:52"),
			dm("0", "root", "CRYPT-LUKS2-abc-root"),
		)},
		{name: "deny/mapper name not found", want: false, fs: fixture(
			mounts("/dev/mapper/root", "ext4"),
			dm("0", "other", "CRYPT-LUKS2-abc-other"),
		)},
		{name: "deny/slave cycle", want: false, fs: fixture(
			mounts("/dev/dm-0", "ext4"),
			dm("0", "loop", "LVM-x", "dm-0"),
		)},
		{name: "deny/path traversal in device", want: false, fs: fixture(
			mounts("/dev/dm-../../etc", "ext4"),
			dm("0", "root", "CRYPT-LUKS2-abc-root"),
		)},
		{name: "deny/no mount table", want: false, fs: fixture(baseSystem)},
		{name: "deny/uuid unreadable", want: false, fs: fixture(
			mounts("/dev/dm-0", "ext4"),
			fstest.MapFS{"sys/block/dm-0/dm/name": file("root\n")},
		)},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := rootEncrypted(tt.fs, slog.New(slog.DiscardHandler)); got != tt.want {
				t.Errorf("rootEncrypted = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestFirewallActive(t *testing.T) {
	t.Parallel()
	legacyFilter := fstest.MapFS{"proc/net/ip_tables_names": file("nat\nfilter\n")}
	tests := []struct {
		name string
		fs   fstest.MapFS
		want bool
	}{
		{name: "ok/nftables ruleset pins module", want: true, fs: fixture(
			module("nf_tables", "14", "nft_ct", "nft_reject_inet", "nft_chain_nat"),
		)},
		{name: "ok/nftables without dependent modules", want: true, fs: fixture(
			module("nf_tables", "3"),
		)},
		{name: "ok/legacy filter with extension in use", want: true, fs: fixture(
			legacyFilter,
			module("xt_tcpudp", "0"),
			module("xt_conntrack", "2"),
		)},
		{name: "ok/legacy ip6 filter", want: true, fs: fixture(
			fstest.MapFS{"proc/net/ip6_tables_names": file("filter\n")},
			module("ip6t_REJECT", "1"),
		)},
		{name: "deny/nf_tables loaded only for dependents", want: false, fs: fixture(
			module("nf_tables", "2", "nft_ct", "nf_tables_set"),
		)},
		{name: "deny/nf_tables idle", want: false, fs: fixture(module("nf_tables", "0"))},
		{name: "deny/nf_tables holders unreadable", want: false, fs: fixture(
			fstest.MapFS{"sys/module/nf_tables/refcnt": file("7\n")},
		)},
		{name: "deny/garbage refcnt", want: false, fs: fixture(module("nf_tables", "lots"))},
		{name: "deny/built-in netfilter", want: false, fs: fixture(
			baseSystem,
			fstest.MapFS{"proc/net/ip_tables_names": file(""), "sys/module/xt_recent/parameters/ip_list_tot": file("100\n")},
		)},
		{name: "deny/legacy filter table without extensions in use", want: false, fs: fixture(
			legacyFilter,
			module("xt_conntrack", "0"),
			module("x_tables", "5", "ip_tables", "xt_conntrack"),
		)},
		{name: "deny/extension in use without filter table", want: false, fs: fixture(
			fstest.MapFS{"proc/net/ip_tables_names": file("nat\n")},
			module("xt_MASQUERADE", "1"),
		)},
		{name: "deny/nothing", want: false, fs: fstest.MapFS{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := firewallActive(tt.fs, slog.New(slog.DiscardHandler)); got != tt.want {
				t.Errorf("firewallActive = %v, want %v", got, tt.want)
			}
		})
	}
}

func TestCollect(t *testing.T) {
	t.Parallel()
	encryptedFirewalled := fixture(
		baseSystem,
		mounts("/dev/mapper/root", "ext4"),
		dm("0", "root", "CRYPT-LUKS2-abc-root"),
		module("nf_tables", "9", "nft_ct"),
	)
	hostOK := func() (string, error) { return "ws-alice", nil }
	tests := []struct {
		name string
		c    Collector
		want postureschema.Report
	}{
		{
			name: "ok/encrypted and firewalled",
			c:    Collector{Root: encryptedFirewalled, Hostname: hostOK, AgentVersion: "1.2.3"},
			want: postureschema.Report{
				Hostname: "ws-alice", OS: "Debian GNU/Linux 12 (bookworm)", Kernel: "6.1.0-18-amd64",
				DiskEncrypted: true, FirewallActive: true, ScreenLock: "unknown", AgentVersion: "1.2.3", CollectedAt: testNow,
			},
		},
		{
			name: "ok/plain root without firewall",
			c: Collector{Root: fixture(baseSystem, mounts("/dev/sda1", "ext4"), mountinfo("8:1")),
				Hostname: hostOK, AgentVersion: "1.2.3"},
			want: postureschema.Report{
				Hostname: "ws-alice", OS: "Debian GNU/Linux 12 (bookworm)", Kernel: "6.1.0-18-amd64",
				ScreenLock: "unknown", AgentVersion: "1.2.3", CollectedAt: testNow,
			},
		},
		{
			name: "ok/nothing readable is reported unknown or false",
			c: Collector{Root: fstest.MapFS{},
				Hostname: func() (string, error) { return "", errors.New("uname failed") }},
			want: postureschema.Report{
				Hostname: "unknown", OS: "unknown", Kernel: "unknown",
				ScreenLock: "unknown", AgentVersion: "unknown", CollectedAt: testNow,
			},
		},
		{
			name: "ok/os-release fallback, quoting and cleaning",
			c: Collector{Root: fstest.MapFS{
				"usr/lib/os-release":        file("# comment\nPRETTY_NAME='Fedora Linux 41 (Workstation Edition)'\n"),
				"proc/sys/kernel/osrelease": file("6.11.4-301.fc41.x86_64"),
			}, Hostname: func() (string, error) { return "host\x1b[31m\n", nil }, AgentVersion: "dev"},
			want: postureschema.Report{
				Hostname: "host [31m", OS: "Fedora Linux 41 (Workstation Edition)", Kernel: "6.11.4-301.fc41.x86_64",
				ScreenLock: "unknown", AgentVersion: "dev", CollectedAt: testNow,
			},
		},
		{
			name: "ok/escaped double quotes",
			c: Collector{Root: fstest.MapFS{
				"etc/os-release": file(`PRETTY_NAME="My \"Distro\" \$1"` + "\n"),
			}, Hostname: hostOK, AgentVersion: "v"},
			want: postureschema.Report{
				Hostname: "ws-alice", OS: `My "Distro" $1`, Kernel: "unknown",
				ScreenLock: "unknown", AgentVersion: "v", CollectedAt: testNow,
			},
		},
		{
			name: "ok/oversized file refused",
			c: Collector{Root: fstest.MapFS{
				"etc/os-release": file("PRETTY_NAME=x\n" + strings.Repeat("#\n", maxSmallFile)),
			}, Hostname: hostOK, AgentVersion: "v"},
			want: postureschema.Report{
				Hostname: "ws-alice", OS: "unknown", Kernel: "unknown",
				ScreenLock: "unknown", AgentVersion: "v", CollectedAt: testNow,
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := tt.c
			c.Now = func() time.Time { return testNow }
			got, err := c.Collect(context.Background())
			if err != nil {
				t.Fatalf("Collect: %v", err)
			}
			if diff := cmp.Diff(got, tt.want); diff != "" {
				t.Errorf("Collect (-got +want):\n%s", diff)
			}
		})
	}
}

func TestCollectCanceled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	c := Collector{Root: fstest.MapFS{}}
	if _, err := c.Collect(ctx); !errors.Is(err, context.Canceled) {
		t.Fatalf("Collect error = %v, want context.Canceled", err)
	}
}

func TestCollectLogsReasons(t *testing.T) {
	t.Parallel()
	var buf bytes.Buffer
	c := Collector{
		Root:     fixture(baseSystem, mounts("overlay", "overlay"), mountinfo("0:52")),
		Hostname: func() (string, error) { return "h", nil },
		Logger:   slog.New(slog.NewTextHandler(&buf, &slog.HandlerOptions{Level: slog.LevelDebug})),
	}
	if _, err := c.Collect(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"disk encryption not established", `not a device-mapper device`, "no firewall rule evidence"} {
		if !strings.Contains(buf.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, buf.String())
		}
	}
}

// TestCollectRealMachine is a smoke test on the machine running the tests:
// collection works without privileges and the report signs and verifies.
func TestCollectRealMachine(t *testing.T) {
	t.Parallel()
	if runtime.GOOS != "linux" {
		t.Skip("collectors read a Linux filesystem layout")
	}
	c := Collector{AgentVersion: "test"}
	r, err := c.Collect(context.Background())
	if err != nil {
		t.Fatalf("Collect: %v", err)
	}
	t.Logf("report: %+v", r)
	if kernel, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		if got, want := r.Kernel, strings.TrimSpace(string(kernel)); got != want {
			t.Errorf("Kernel = %q, want %q", got, want)
		}
	}
	if r.Hostname == "" || r.OS == "" || r.ScreenLock != postureschema.ScreenLockUnknown {
		t.Errorf("incomplete report: %+v", r)
	}
	if age := time.Since(r.CollectedAt); age < 0 || age > time.Minute {
		t.Errorf("CollectedAt = %v, not now", r.CollectedAt)
	}

	r.Device = "dev-smoke"
	pub, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := postureschema.Sign(priv, r)
	if err != nil {
		t.Fatalf("Sign: %v", err)
	}
	got, err := postureschema.Verify(pub, s, postureschema.VerifyOptions{})
	if err != nil {
		t.Fatalf("Verify: %v", err)
	}
	if diff := cmp.Diff(got, r); diff != "" {
		t.Errorf("verified report (-got +want):\n%s", diff)
	}
}

// FuzzCollect feeds arbitrary mount tables and os-release files to the
// collector: it must not panic, and what it reports must be signable.
func FuzzCollect(f *testing.F) {
	f.Add("/dev/mapper/root / ext4 rw 0 0\n", "27 1 254:0 / / rw - ext4 /dev/root rw\n", "PRETTY_NAME=\"Debian\"\n", "CRYPT-LUKS2-x")
	f.Add("/dev/dm-0 / ext4 rw 0 0\n", "", "PRETTY_NAME='a'\n", "LVM-x")
	f.Add("/dev/root / ext4 rw 0 0\n", "1 2 x:y / / rw\n", "PRETTY_NAME=\"\\\"\n", "")
	f.Add("a\\040b / x\n\\ / \\777\n", "1 2 3 4 /\n", "PRETTY_NAME=\xff\x00\n", "CRYPT-")
	_, priv, err := ed25519.GenerateKey(nil)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, mountsData, mountinfoData, osRelease, uuid string) {
		c := Collector{
			Root: fixture(
				fstest.MapFS{
					"proc/self/mounts":    file(mountsData),
					"proc/self/mountinfo": file(mountinfoData),
					"etc/os-release":      file(osRelease),
				},
				dm("0", "root", uuid, "dm-1"),
				dm("1", "root", uuid, "dm-0"),
			),
			Hostname: func() (string, error) { return osRelease, nil },
			Now:      func() time.Time { return testNow },
		}
		r, err := c.Collect(context.Background())
		if err != nil {
			t.Fatalf("Collect: %v", err)
		}
		r.Device = "d"
		if _, err := postureschema.Sign(priv, r); err != nil {
			t.Fatalf("collected report cannot be signed: %v (%+v)", err, r)
		}
	})
}
