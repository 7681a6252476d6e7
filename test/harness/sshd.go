package harness

import (
	"crypto/ed25519"
	"crypto/rand"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/crypto/ssh"
)

// SSHDPath is where Debian's openssh-server puts sshd.
const SSHDPath = "/usr/sbin/sshd"

// HaveSSHD reports whether a real OpenSSH sshd is installed.
func HaveSSHD() bool {
	_, err := os.Stat(SSHDPath)
	return err == nil
}

// SSHD is a real OpenSSH sshd on a loopback port, run in inetd mode: the
// harness owns the listener and execs `sshd -i` per connection, so there is
// no port race and nothing outlives Close.
type SSHD struct {
	Addr    string // 127.0.0.1:PORT
	HostKey string // authorized_keys line of its host key
	Dir     string
	ln      net.Listener
	mu      sync.Mutex
	procs   map[*exec.Cmd]bool
	wg      sync.WaitGroup
	closed  bool
}

// NewSSHD prepares the host key and listener. Call Start once the user CA is
// known.
func NewSSHD(dir string) (*SSHD, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		return nil, err
	}
	blk, err := ssh.MarshalPrivateKey(priv, "")
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, "host_key"), pem.EncodeToMemory(blk), 0o600); err != nil {
		return nil, err
	}
	pub, err := ssh.NewPublicKey(priv.Public())
	if err != nil {
		return nil, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	return &SSHD{Addr: ln.Addr().String(), HostKey: strings.TrimSpace(string(ssh.MarshalAuthorizedKey(pub))), Dir: dir, ln: ln, procs: map[*exec.Cmd]bool{}}, nil
}

// Start writes sshd_config trusting userCA (an authorized_keys line) and
// serves connections.
func (s *SSHD) Start(userCA string) error {
	if err := os.MkdirAll("/run/sshd", 0o755); err != nil && !errors.Is(err, os.ErrPermission) {
		return err
	}
	if err := os.WriteFile(filepath.Join(s.Dir, "user_ca.pub"), []byte(userCA+"\n"), 0o644); err != nil {
		return err
	}
	cfg := strings.Join([]string{
		"HostKey " + filepath.Join(s.Dir, "host_key"),
		"PidFile none",
		"UsePAM no",
		"StrictModes no",
		"PermitRootLogin prohibit-password",
		"AuthenticationMethods publickey",
		"PubkeyAuthentication yes",
		"PasswordAuthentication no",
		"KbdInteractiveAuthentication no",
		"AuthorizedKeysFile none",
		"TrustedUserCAKeys " + filepath.Join(s.Dir, "user_ca.pub"),
		"ExposeAuthInfo yes",
		"LogLevel VERBOSE",
		"Subsystem sftp internal-sftp",
		"AllowTcpForwarding no",
		"X11Forwarding no",
		"PrintMotd no",
		"",
	}, "\n")
	path := filepath.Join(s.Dir, "sshd_config")
	if err := os.WriteFile(path, []byte(cfg), 0o600); err != nil {
		return err
	}
	if out, err := exec.Command(SSHDPath, "-t", "-f", path).CombinedOutput(); err != nil {
		return fmt.Errorf("sshd -t: %v: %s", err, out)
	}
	logf, err := os.Create(filepath.Join(s.Dir, "sshd.log"))
	if err != nil {
		return err
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		defer logf.Close()
		for {
			c, err := s.ln.Accept()
			if err != nil {
				return
			}
			f, err := c.(*net.TCPConn).File()
			c.Close()
			if err != nil {
				continue
			}
			cmd := exec.Command(SSHDPath, "-i", "-e", "-f", path)
			cmd.Stdin, cmd.Stdout, cmd.Stderr = f, f, logf
			cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
			s.mu.Lock()
			if s.closed {
				s.mu.Unlock()
				f.Close()
				return
			}
			err = cmd.Start()
			if err == nil {
				s.procs[cmd] = true
			}
			s.mu.Unlock()
			f.Close()
			if err != nil {
				continue
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				cmd.Wait()
				s.mu.Lock()
				delete(s.procs, cmd)
				s.mu.Unlock()
			}()
		}
	}()
	return nil
}

// Log returns what sshd logged so far.
func (s *SSHD) Log() string {
	b, _ := os.ReadFile(filepath.Join(s.Dir, "sshd.log"))
	return string(b)
}

// Close stops accepting, kills live sessions and waits for them.
func (s *SSHD) Close() error {
	err := s.ln.Close()
	s.mu.Lock()
	s.closed = true
	for c := range s.procs {
		c.Process.Kill()
	}
	s.mu.Unlock()
	s.wg.Wait()
	return err
}
