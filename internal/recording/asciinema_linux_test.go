package recording_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// openPTY returns the controller and the terminal side of a new
// pseudo-terminal.
func openPTY(t *testing.T) (ptm, pts *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR|syscall.O_NOCTTY|syscall.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("no pseudo-terminals here: %v", err)
	}
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		m.Close()
		t.Fatalf("unlockpt: %v", err)
	}
	fd, _, errno := unix.Syscall(unix.SYS_IOCTL, m.Fd(), unix.TIOCGPTPEER, unix.O_RDWR|unix.O_NOCTTY|unix.O_CLOEXEC)
	if errno != 0 {
		err := error(errno)
		m.Close()
		t.Fatalf("TIOCGPTPEER: %v", err)
	}
	return m, os.NewFile(fd, "pts")
}

// TestAsciinemaCat checks that the real asciinema accepts what we write.
// asciinema cat insists on a controlling terminal, so it gets a pty.
func TestAsciinemaCat(t *testing.T) {
	t.Parallel()
	bin, err := exec.LookPath("asciinema")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("asciinema is required in CI: %v", err)
		}
		t.Skip("asciinema not installed")
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "s.cast")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	writeGolden(t, f)
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}

	ptm, pts := openPTY(t)
	defer ptm.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, "cat", path)
	cmd.Env = append(os.Environ(), "HOME="+dir, "ASCIINEMA_CONFIG_HOME="+filepath.Join(dir, "cfg"), "LANG=C.UTF-8", "LC_ALL=C.UTF-8")
	cmd.Stdin, cmd.Stdout, cmd.Stderr = pts, pts, &stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		pts.Close()
		t.Fatal(err)
	}
	pts.Close() // the child holds its own copy; EOF (EIO) comes when it exits
	out, readErr := io.ReadAll(ptm)
	if err := cmd.Wait(); err != nil {
		t.Fatalf("asciinema cat: %v\nstderr: %s\noutput: %q", err, stderr.String(), out)
	}
	var pathErr *os.PathError
	if readErr != nil && !(errors.As(readErr, &pathErr) && errors.Is(pathErr.Err, syscall.EIO)) {
		t.Fatalf("reading pty: %v", readErr)
	}
	for _, want := range []string{"hello", "price: € 5", "\x1b[1mbold", "bye"} {
		if !strings.Contains(string(out), want) {
			t.Errorf("asciinema cat output %q lacks %q", out, want)
		}
	}
}
