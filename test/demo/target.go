package main

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	gliderssh "github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/wire"
	"github.com/pinhole-dev/pinhole/test/harness"
)

type target struct {
	addr    string
	hostKey string
	start   func(userCA string) error
}

func demoConfig(addr, login, hostKey string) string {
	return fmt.Sprintf(`# pinhole demo config: one SSH target, a DBA role and an approver role.
targets:
  - name: db-prod
    address: %s
    protocol: ssh
    login: %s
    host_key: %q
roles: [dba, approver]
rules:
  - name: dba-prod
    roles: [dba]
    targets: [db-prod]
    max_ttl: 1h
    approvals: 1
    approver_roles: [approver]
    pending_for: 10m
    posture: {max_age: 10m}
`, addr, login, hostKey)
}

// startTarget prepares the SSH target: the real OpenSSH sshd when installed,
// else a small built-in server that trusts the user CA.
func (d *demo) startTarget(login string) (target, error) {
	if harness.HaveSSHD() {
		s, err := harness.NewSSHD(filepath.Join(d.dir, "target"))
		if err != nil {
			return target{}, err
		}
		d.stops = append(d.stops, func() { s.Close() })
		d.say("Target db-prod: real OpenSSH sshd (%s) on %s, login %s; it only trusts pinhole's user CA", harness.SSHDPath, s.Addr, login)
		return target{addr: s.Addr, hostKey: s.HostKey, start: s.Start}, nil
	}
	key, err := sshca.NewKey(nil)
	if err != nil {
		return target{}, err
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return target{}, err
	}
	d.say("Target db-prod: OpenSSH sshd is not installed, so the built-in demo target on %s (trusts pinhole's user CA; runs commands with sh -c)", ln.Addr())
	t := target{addr: ln.Addr().String(), hostKey: sshca.AuthorizedKey(key.PublicKey())}
	t.start = func(userCA string) error {
		ca, _, _, _, err := gossh.ParseAuthorizedKey([]byte(userCA))
		if err != nil {
			return err
		}
		srv := &gliderssh.Server{
			HostSigners: []gliderssh.Signer{key},
			PublicKeyHandler: func(ctx gliderssh.Context, k gliderssh.PublicKey) bool {
				cert, ok := k.(*gossh.Certificate)
				return ok && sshca.CheckUserCert([]gossh.PublicKey{ca}, cert, login, time.Now()) == nil && ctx.User() == login
			},
			Handler: func(s gliderssh.Session) {
				c := exec.CommandContext(s.Context(), "/bin/sh", "-c", s.RawCommand())
				c.Stdout, c.Stderr = s, s.Stderr()
				err := c.Run()
				var ee *exec.ExitError
				if errors.As(err, &ee) {
					s.Exit(ee.ExitCode())
					return
				}
				s.Exit(0)
			},
		}
		go srv.Serve(ln)
		d.stops = append(d.stops, func() { srv.Close() })
		return nil
	}
	return t, nil
}

// userCA reads the broker's user CA from its public /v1/ca endpoint.
func userCA(ctx context.Context, brokerURL, caFile string) (string, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return "", err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return "", fmt.Errorf("no certificate in %s", caFile)
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, brokerURL+wire.PathCA, nil)
	if err != nil {
		return "", err
	}
	resp, err := hc.Do(req)
	if err != nil {
		return "", fmt.Errorf("fetching CA keys: %w", err)
	}
	defer resp.Body.Close()
	var ca wire.CA
	if err := json.NewDecoder(io.LimitReader(resp.Body, 64<<10)).Decode(&ca); err != nil || len(ca.UserCAKeys) == 0 {
		return "", fmt.Errorf("reading CA keys: %v", err)
	}
	return ca.UserCAKeys[0], nil
}

// sshRun runs one command on the target through the tunnel.
func (d *demo) sshRun(ctx context.Context, sock, command string) error {
	if _, err := exec.LookPath("ssh"); err == nil {
		_, err := d.cmd(ctx, "pinhole ssh db-prod -- '"+command+"'", "pinhole", "--agent", sock, "ssh", "db-prod", "--", command)
		return err
	}
	d.note("no ssh client installed: using a Go SSH client with the same certificate")
	out, err := goSSH(ctx, sock, command)
	fmt.Fprintln(d.out, indent(out))
	return err
}

// longSession keeps a session busy across the grant's end and checks that
// the broker cut it with a one-line reason within a second or two.
func (d *demo) longSession(ctx context.Context, sock string, ends time.Time) error {
	command := "while :; do date +%T; sleep 1; done"
	fmt.Fprintf(d.out, "    $ pinhole ssh db-prod -- '%s'\n", command)
	var c *exec.Cmd
	out := &lineBuffer{w: d.out}
	if _, err := exec.LookPath("ssh"); err == nil {
		c = exec.CommandContext(ctx, d.path("pinhole"), "--agent", sock, "ssh", "db-prod", "--", command)
		c.Stdout, c.Stderr = out, out
		if err := c.Start(); err != nil {
			return err
		}
		c.Wait()
	} else {
		s, _ := goSSH(ctx, sock, command)
		out.Write([]byte(s))
	}
	cut := time.Now()
	late := cut.Sub(ends)
	if late < -500*time.Millisecond {
		return fmt.Errorf("session ended %s before the grant did", -late)
	}
	if late > 3*time.Second {
		return fmt.Errorf("session outlived the grant by %s", late)
	}
	if !strings.Contains(out.String(), "pinhole:") {
		return fmt.Errorf("the user was not told why the session ended")
	}
	d.note("session cut %s after the grant ended", late.Round(10*time.Millisecond))
	return nil
}

// goSSH is the fallback client when no OpenSSH client is installed.
func goSSH(ctx context.Context, sock, command string) (string, error) {
	st, err := client.ForAgent(sock).LocalStatus(ctx)
	if err != nil {
		return "", err
	}
	var t wire.Tunnel
	for _, x := range st.Tunnels {
		if x.Target == "db-prod" {
			t = x
		}
	}
	if t.Local == "" {
		return "", errors.New("no tunnel for db-prod")
	}
	keyPEM, err := os.ReadFile(t.KeyFile)
	if err != nil {
		return "", err
	}
	key, err := gossh.ParsePrivateKey(keyPEM)
	if err != nil {
		return "", err
	}
	certLine, err := os.ReadFile(t.CertFile)
	if err != nil {
		return "", err
	}
	pub, _, _, _, err := gossh.ParseAuthorizedKey(certLine)
	if err != nil {
		return "", err
	}
	signer, err := gossh.NewCertSigner(pub.(*gossh.Certificate), key)
	if err != nil {
		return "", err
	}
	kh, err := os.ReadFile(t.KnownHostsFile)
	if err != nil {
		return "", err
	}
	var cas []gossh.PublicKey
	for _, l := range strings.Split(string(kh), "\n") {
		f := strings.Fields(l)
		if len(f) >= 3 && f[0] == "@cert-authority" {
			k, _, _, _, err := gossh.ParseAuthorizedKey([]byte(strings.Join(f[2:], " ")))
			if err == nil {
				cas = append(cas, k)
			}
		}
	}
	checker := &gossh.CertChecker{IsHostAuthority: func(k gossh.PublicKey, _ string) bool {
		for _, c := range cas {
			if string(c.Marshal()) == string(k.Marshal()) {
				return true
			}
		}
		return false
	}}
	cfg := &gossh.ClientConfig{User: t.Login, Auth: []gossh.AuthMethod{gossh.PublicKeys(signer)},
		HostKeyCallback: func(_ string, remote net.Addr, k gossh.PublicKey) error {
			return checker.CheckHostKey(t.HostKeyAlias+":22", remote, k)
		}, Timeout: 10 * time.Second}
	cl, err := gossh.Dial("tcp", t.Local, cfg)
	if err != nil {
		return "", err
	}
	defer cl.Close()
	s, err := cl.NewSession()
	if err != nil {
		return "", err
	}
	var buf strings.Builder
	s.Stdout, s.Stderr = &buf, &buf
	err = s.Run(command)
	return buf.String(), err
}
