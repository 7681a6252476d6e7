package sshproxy

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"time"

	gossh "golang.org/x/crypto/ssh"
)

// errHostKey is wrapped by every upstream host key rejection.
var errHostKey = errors.New("target host key not trusted")

// hostKeySpec is a parsed Target.UpstreamHostKey.
type hostKeySpec struct {
	key gossh.PublicKey
	ca  bool // key is a host CA: accept host certificates it signed
}

// parseHostKey parses "<authorized_keys line>" or "@cert-authority [hosts]
// <authorized_keys line>".
func parseHostKey(s string) (*hostKeySpec, error) {
	s = strings.TrimSpace(s)
	if s == "" {
		return nil, errors.New("target has no upstream host key")
	}
	spec := &hostKeySpec{}
	if rest, ok := strings.CutPrefix(s, "@cert-authority"); ok {
		spec.ca = true
		s = strings.TrimSpace(rest)
	}
	if len(s) > 16<<10 {
		return nil, errors.New("upstream host key is too long")
	}
	// ParseAuthorizedKey skips a leading options field, which also covers a
	// known_hosts host pattern after @cert-authority.
	key, _, _, rest, err := gossh.ParseAuthorizedKey([]byte(s))
	if err != nil {
		return nil, fmt.Errorf("parsing upstream host key: %w", err)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("upstream host key: more than one key given")
	}
	if _, isCert := key.(*gossh.Certificate); isCert {
		return nil, errors.New("upstream host key must be a key, not a certificate")
	}
	spec.key = key
	return spec, nil
}

// callback returns the HostKeyCallback for target name.
func (h *hostKeySpec) callback(name string, clock func() time.Time) gossh.HostKeyCallback {
	want := h.key.Marshal()
	return func(_ string, remote net.Addr, key gossh.PublicKey) error {
		if !h.ca {
			got := key
			if cert, ok := key.(*gossh.Certificate); ok {
				// The handshake proved possession of cert.Key; that is the
				// key we pinned.
				got = cert.Key
			}
			if !bytes.Equal(got.Marshal(), want) {
				return fmt.Errorf("%w: target presented %s %s, want %s %s", errHostKey,
					got.Type(), gossh.FingerprintSHA256(got), h.key.Type(), gossh.FingerprintSHA256(h.key))
			}
			return nil
		}
		cert, ok := key.(*gossh.Certificate)
		if !ok {
			return fmt.Errorf("%w: target presented a plain %s key, a host certificate is required", errHostKey, key.Type())
		}
		if cert.CertType != gossh.HostCert {
			return fmt.Errorf("%w: target presented a user certificate", errHostKey)
		}
		if cert.SignatureKey == nil || !bytes.Equal(cert.SignatureKey.Marshal(), want) {
			return fmt.Errorf("%w: host certificate is not signed by the configured host CA", errHostKey)
		}
		checker := gossh.CertChecker{Clock: clock}
		principals := []string{name}
		if a, err := addrOf(remote); err == nil {
			principals = append(principals, a.String())
		}
		var err error
		for _, p := range principals {
			if err = checker.CheckCert(p, cert); err == nil {
				return nil
			}
		}
		return fmt.Errorf("%w: %w", errHostKey, err)
	}
}

// upstream is one connection to the real sshd with one session channel.
type upstream struct {
	conn gossh.Conn
	ch   gossh.Channel
	reqs <-chan *gossh.Request
	stop func() bool // stops closing the conn when the session ends
	wg   sync.WaitGroup
}

// close closes the connection and waits for its helper goroutines.
func (u *upstream) close() {
	u.conn.Close()
	u.stop()
	u.wg.Wait()
}

// dial connects to the target, authenticates, opens a session channel and
// asks for the environment, the pty and the shell, exec or subsystem of s.
// The connection is closed when s.ctx is done.
func (s *session) dial(info SessionInfo) (*upstream, error) {
	cfg := &s.c.p.cfg
	t := s.c.t
	ctx, cancel := context.WithTimeout(s.ctx, upstreamTimeout)
	defer cancel()

	signer, err := cfg.UpstreamSigner(ctx, t)
	if err == nil && signer == nil {
		err = errors.New("no signer returned")
	}
	if err != nil {
		return nil, fmt.Errorf("getting upstream credentials: %w", err)
	}
	nc, err := t.Dial(ctx)
	if err != nil {
		return nil, fmt.Errorf("dialing target: %w", err)
	}
	// The handshake does not take a context: closing the conn aborts it.
	stopSetup := context.AfterFunc(ctx, func() { nc.Close() })
	defer stopSetup()
	cc, chans, reqs, err := gossh.NewClientConn(nc, net.JoinHostPort(t.Name, "22"), &gossh.ClientConfig{
		User:            t.Login,
		Auth:            []gossh.AuthMethod{gossh.PublicKeys(signer)},
		HostKeyCallback: s.c.hostKey.callback(t.Name, cfg.Clock),
		ClientVersion:   "SSH-2.0-pinhole",
	})
	if err != nil {
		nc.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("SSH handshake with target: %w (%w)", err, context.Cause(ctx))
		}
		return nil, fmt.Errorf("SSH handshake with target: %w", err)
	}
	u := &upstream{conn: cc, stop: context.AfterFunc(s.ctx, func() { cc.Close() })}
	u.wg.Add(2)
	go func() {
		defer u.wg.Done()
		discardRequests(reqs)
	}()
	go func() {
		defer u.wg.Done()
		for nch := range chans {
			_ = nch.Reject(gossh.Prohibited, "no channels toward the proxy")
		}
	}()
	ok := false
	defer func() {
		if !ok {
			u.close()
		}
	}()

	ch, chReqs, err := cc.OpenChannel("session", nil)
	if err != nil {
		return nil, fmt.Errorf("opening session channel on target: %w", err)
	}
	u.ch, u.reqs = ch, chReqs
	for _, kv := range s.env {
		// Like OpenSSH, do not wait for replies: sshd's AcceptEnv decides.
		if _, err := ch.SendRequest("env", false, gossh.Marshal(kv)); err != nil {
			return nil, fmt.Errorf("sending environment: %w", err)
		}
	}
	if s.pty != nil {
		win := s.window()
		msg := ptyRequestMsg{
			Term: s.pty.Term, Columns: uint32(win.cols), Rows: uint32(win.rows),
			Width: win.width, Height: win.height, Modes: s.pty.Modes,
		}
		granted, err := ch.SendRequest("pty-req", true, gossh.Marshal(&msg))
		if err != nil {
			return nil, fmt.Errorf("requesting pty: %w", err)
		}
		if !granted {
			return nil, errors.New("target refused the pty request")
		}
	}
	var payload []byte
	switch s.kind {
	case KindExec:
		payload = gossh.Marshal(&struct{ Command string }{s.command})
	case KindSubsystem:
		payload = gossh.Marshal(&struct{ Name string }{s.command})
	}
	granted, err := ch.SendRequest(s.kind, true, payload)
	if err != nil {
		return nil, fmt.Errorf("requesting %s: %w", s.kind, err)
	}
	if !granted {
		return nil, fmt.Errorf("target refused the %s request", s.kind)
	}
	ok = true
	return u, nil
}
