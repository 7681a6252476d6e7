// Package sshproxy is pinhole's recording SSH proxy.
//
// The broker hands each SSH connection that arrives through a grant's tunnel
// to Proxy.HandleConn. The proxy terminates SSH itself (gliderlabs/ssh),
// presenting a host certificate for the target's names, and authenticates
// the user by the grant's user certificate the way sshd would, plus the
// grant-specific checks: the connection must come from the agent's tunnel
// address named in the certificate's source-address, and the grant must
// still be active. For every session it opens a fresh connection to the real
// sshd (x/crypto/ssh client) with a key and certificate the broker mints,
// verifies the target's host key, and relays the session while recording its
// terminal output as asciicast v2.
//
// The proxy fails closed: a session that cannot be recorded is refused, a
// recording error ends the session, a host key mismatch refuses the
// connection, and port and agent forwarding are never offered. EndGrant cuts
// every session of a grant with a one-line reason on the user's terminal.
package sshproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"
	"unicode"

	gliderssh "github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/sshca"
)

// Event types passed to Config.Event.
const (
	// EventSessionStarted: the upstream session started. Details: "kind".
	EventSessionStarted = "session.started"
	// EventSessionEnded: a started session ended. Details: "exit_status"
	// (a number or "none"), "exit_signal" when the command died of a signal,
	// "reason" when pinhole ended it.
	EventSessionEnded = "session.ended"
	// EventSessionRefused: a session request was refused before it started.
	// Details: "reason", "error".
	EventSessionRefused = "session.refused"
	// EventRecordingFailed: a recording could not be opened, written or
	// closed. Details: "stage" (open|write|close), "error".
	EventRecordingFailed = "recording.failed"
	// EventAuthRefused: a user key was refused at authentication. Only
	// GrantID, Requester, Target and Login of the SessionInfo are set.
	// Details: "reason", "key_id", "serial", "remote".
	EventAuthRefused = "auth.refused"
)

// Session kinds in SessionInfo.Kind.
const (
	KindShell     = "shell"
	KindExec      = "exec"
	KindSubsystem = "subsystem"
)

// Tunables. They are constants rather than Config fields until someone needs
// to change them.
const (
	// handshakeTimeout bounds the time from accepting a connection to a
	// successful user authentication.
	handshakeTimeout = 30 * time.Second
	// upstreamTimeout bounds dialing the target and setting up the upstream
	// session.
	upstreamTimeout = 20 * time.Second
	// endWait is how long EndGrant waits for sessions to say goodbye.
	endWait = 100 * time.Millisecond
	// closeGrace is how long an ended connection may linger so the client can
	// read the goodbye before the proxy closes the TCP connection itself.
	closeGrace = 500 * time.Millisecond
	// endGrantMax bounds how long EndGrant waits for ended connections to
	// be gone (endWait + closeGrace and a little slack).
	endGrantMax = 700 * time.Millisecond
	// maxSessionsPerConn matches OpenSSH's MaxSessions default.
	maxSessionsPerConn = 10
	// maxReasonLen bounds the reason shown to users.
	maxReasonLen = 200
)

// Target is one SSH target as reached through one grant.
type Target struct {
	// GrantID identifies the grant the connection belongs to; required.
	GrantID string
	// Requester is the user the grant was issued to (recorded, not checked).
	Requester string
	// Name is the target's name; with a host CA in UpstreamHostKey the
	// target's host certificate must list it (or the dialed IP address) as a
	// principal. Required.
	Name string
	// Login is the only principal accepted from the user and the login used
	// upstream; the SSH user name must equal it too. Required.
	Login string
	// Source is the agent's tunnel address: the user's certificate must
	// carry a source-address covering it and the connection must come from
	// it. Required.
	Source netip.Addr
	// HostSigner is the proxy's host key with a host certificate for this
	// target's names, presented to the user. Required.
	HostSigner gossh.Signer
	// Dial connects to the real sshd; ctx bounds the dial only. Required.
	Dial func(ctx context.Context) (net.Conn, error)
	// UpstreamHostKey is the authorized_keys line of the real target's host
	// key, or "@cert-authority <key>" to accept host certificates from a
	// host CA. Required; any other host key refuses the session.
	UpstreamHostKey string
	// Ends is when the grant ends; the connection is refused after it and
	// cut at it. Required.
	Ends time.Time
}

// SessionInfo describes one session, for recordings and events.
type SessionInfo struct {
	// ID is a random session id (26 characters of base32, usable as a
	// recording id).
	ID string
	// GrantID, Requester, Target and Login are copied from the Target.
	GrantID, Requester, Target, Login string
	// Kind is KindShell, KindExec or KindSubsystem.
	Kind string
	// Command is the exec command or the subsystem name.
	Command string
	// Width and Height are the terminal size the session starts with (80x24
	// without a pty).
	Width, Height int
	// Term is the TERM of the pty, empty without one.
	Term string
	// Started is when the session was requested.
	Started time.Time
}

// Recording receives a session's terminal output. Implementations must be
// safe for concurrent use; *recording.CastWriter is one. An error from Output
// or Resize ends the session.
type Recording interface {
	Output(p []byte) error
	Resize(cols, rows int) error
	Close() error
}

// Config configures a Proxy. Callbacks marked required make New fail when
// nil; nothing defaults to "allow".
type Config struct {
	// UserCAs returns the user CA keys currently trusted (during rotation,
	// old and new). Required.
	UserCAs func() []gossh.PublicKey
	// Clock returns the current time; nil means time.Now.
	Clock func() time.Time
	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger
	// UnrecordedSFTP lets file transfers through: the sftp subsystem and
	// scp's server side (exec `scp -t`/`scp -f`). Their bytes are relayed
	// but not recorded (only session.started and session.ended are
	// audited), so this is a fail-open choice: false, the default, refuses
	// every subsystem and scp.
	UnrecordedSFTP bool
	// CheckGrant returns nil while the grant is active. It is called at
	// authentication and at the start of every session. Required.
	CheckGrant func(ctx context.Context, grantID string) error
	// UpstreamSigner returns the key and certificate to log in to the target
	// with; it is called once per upstream connection. Required.
	UpstreamSigner func(ctx context.Context, t Target) (gossh.Signer, error)
	// OpenRecording starts the recording of a shell or exec session; an
	// error refuses the session. Required.
	OpenRecording func(ctx context.Context, s SessionInfo) (Recording, error)
	// Event reports session events (the Event* constants); nil drops them.
	// It is called synchronously from the session's goroutine.
	Event func(ctx context.Context, typ string, s SessionInfo, details map[string]string)
}

// Proxy is the recording SSH proxy. It is safe for concurrent use.
type Proxy struct {
	cfg Config
	log *slog.Logger

	mu    sync.Mutex
	conns map[string]map[*conn]struct{} // grant id -> live connections
}

// New validates cfg and returns a Proxy.
func New(cfg Config) (*Proxy, error) {
	switch {
	case cfg.UserCAs == nil:
		return nil, errors.New("sshproxy: Config.UserCAs is required")
	case cfg.CheckGrant == nil:
		return nil, errors.New("sshproxy: Config.CheckGrant is required")
	case cfg.UpstreamSigner == nil:
		return nil, errors.New("sshproxy: Config.UpstreamSigner is required")
	case cfg.OpenRecording == nil:
		return nil, errors.New("sshproxy: Config.OpenRecording is required")
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Event == nil {
		cfg.Event = func(context.Context, string, SessionInfo, map[string]string) {}
	}
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Proxy{cfg: cfg, log: log, conns: make(map[string]map[*conn]struct{})}, nil
}

func (t *Target) validate() (*hostKeySpec, error) {
	switch {
	case t.GrantID == "":
		return nil, errors.New("target has no grant id")
	case t.Name == "":
		return nil, errors.New("target has no name")
	case t.Login == "":
		return nil, errors.New("target has no login")
	case !t.Source.IsValid():
		return nil, errors.New("target has no source address")
	case t.HostSigner == nil:
		return nil, errors.New("target has no host signer")
	case t.Dial == nil:
		return nil, errors.New("target has no dial function")
	case t.Ends.IsZero():
		return nil, errors.New("target has no end time")
	}
	return parseHostKey(t.UpstreamHostKey)
}

// HandleConn serves one SSH connection for target t and blocks until it
// ends. It closes conn. When ctx is done, live sessions are ended with a
// reason, as by EndGrant. All goroutines it starts have stopped when it
// returns.
func (p *Proxy) HandleConn(ctx context.Context, nc net.Conn, t Target) {
	log := p.log.With("grant", t.GrantID, "target", t.Name, "remote", nc.RemoteAddr().String())
	hostKey, err := t.validate()
	if err != nil {
		log.Error("refusing SSH connection: bad target", "err", err)
		nc.Close()
		return
	}
	c := &conn{
		p: p, t: t, nc: nc, log: log, hostKey: hostKey,
		sessions: make(map[*session]struct{}),
		endCh:    make(chan struct{}),
		gone:     make(chan struct{}),
	}
	c.ctx, c.cancel = context.WithCancel(context.WithoutCancel(ctx))
	defer c.cancel()
	p.register(c)
	defer p.unregister(c)

	stopShutdown := context.AfterFunc(ctx, func() { c.end("the pinhole broker is shutting down") })
	defer stopShutdown()
	endsTimer := time.AfterFunc(t.Ends.Sub(p.cfg.Clock()), func() { c.end("access grant expired") })
	defer endsTimer.Stop()
	authTimer := time.AfterFunc(handshakeTimeout, func() {
		if !c.authed.Load() {
			log.Info("closing SSH connection: no successful authentication in time")
			nc.Close()
		}
	})
	defer authTimer.Stop()

	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		c.watch()
	}()

	srv := &gliderssh.Server{
		Version:          "pinhole",
		HostSigners:      []gliderssh.Signer{t.HostSigner},
		PublicKeyHandler: c.authPublicKey,
		// HandleConn without Serve never installs default handlers: name
		// every channel type we accept. Only "session": no direct-tcpip, no
		// forwarded-tcpip, no agent channels. RequestHandlers stays nil, so
		// tcpip-forward and every other global request is refused.
		ChannelHandlers: map[string]gliderssh.ChannelHandler{"session": c.handleSession},
		ServerConfigCallback: func(gliderssh.Context) *gossh.ServerConfig {
			return &gossh.ServerConfig{MaxAuthTries: 6}
		},
		ConnectionFailedCallback: func(_ net.Conn, err error) {
			log.Debug("SSH handshake failed", "err", err)
		},
	}
	srv.HandleConn(nc)

	close(c.gone)
	c.shutdown()
	c.wg.Wait()
}

func (p *Proxy) register(c *conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := p.conns[c.t.GrantID]
	if m == nil {
		m = make(map[*conn]struct{})
		p.conns[c.t.GrantID] = m
	}
	m[c] = struct{}{}
}

func (p *Proxy) unregister(c *conn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	m := p.conns[c.t.GrantID]
	delete(m, c)
	if len(m) == 0 {
		delete(p.conns, c.t.GrantID)
	}
}

// EndGrant ends every live session of grantID: the user's terminal gets
// "pinhole: <reason>" on stderr, the session exits with status 255, and the
// connection is closed shortly after. It returns how many sessions it ended
// once every ended connection is gone (the client hung up after reading the
// reason, or the proxy closed it after closeGrace), and never later than
// endGrantMax, so the caller can then tear the network path down without
// cutting off the reason.
func (p *Proxy) EndGrant(grantID, reason string) int {
	p.mu.Lock()
	var conns []*conn
	for c := range p.conns[grantID] {
		conns = append(conns, c)
	}
	p.mu.Unlock()

	var done []<-chan struct{}
	for _, c := range conns {
		done = append(done, c.end(reason)...)
	}
	timer := time.NewTimer(endGrantMax)
	defer timer.Stop()
	for _, d := range done {
		select {
		case <-d:
		case <-timer.C:
			return len(done)
		}
	}
	for _, c := range conns {
		select {
		case <-c.gone:
		case <-timer.C:
			return len(done)
		}
	}
	return len(done)
}

// conn is one user connection.
type conn struct {
	p       *Proxy
	t       Target
	nc      net.Conn
	log     *slog.Logger
	hostKey *hostKeySpec
	ctx     context.Context // cancelled when HandleConn returns
	cancel  context.CancelFunc
	authed  atomic.Bool
	wg      sync.WaitGroup // session goroutines and the watcher
	gone    chan struct{}  // closed when the SSH connection is over

	mu        sync.Mutex
	cert      *gossh.Certificate // the accepted user certificate
	sessions  map[*session]struct{}
	closed    bool // no new sessions: ending or shut down
	endReason string
	endCh     chan struct{} // closed by end
}

// end ends the connection's sessions with reason and returns their done
// channels. It is idempotent.
func (c *conn) end(reason string) []<-chan struct{} {
	reason = cleanReason(reason)
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.endReason == "" {
		c.endReason = reason
		close(c.endCh)
	}
	c.closed = true
	var done []<-chan struct{}
	for s := range c.sessions {
		s.end(c.endReason)
		done = append(done, s.done)
	}
	return done
}

// watch closes the network connection a little after end, in case the
// client does not hang up by itself.
func (c *conn) watch() {
	select {
	case <-c.gone:
		return
	case <-c.endCh:
	}
	c.mu.Lock()
	var done []<-chan struct{}
	for s := range c.sessions {
		done = append(done, s.done)
	}
	c.mu.Unlock()
	timer := time.NewTimer(endWait)
	defer timer.Stop()
wait:
	for _, d := range done {
		select {
		case <-d:
		case <-timer.C:
			break wait
		case <-c.gone:
			return
		}
	}
	timer.Reset(closeGrace)
	select {
	case <-c.gone:
	case <-timer.C:
		c.log.Debug("closing ended SSH connection")
		c.nc.Close()
	}
}

// shutdown stops accepting sessions and cancels the live ones after the SSH
// connection ended.
func (c *conn) shutdown() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	for s := range c.sessions {
		s.end("")
	}
}

func (c *conn) addSession(s *session) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || len(c.sessions) >= maxSessionsPerConn {
		return false
	}
	c.sessions[s] = struct{}{}
	c.wg.Add(1)
	return true
}

func (c *conn) removeSession(s *session) {
	c.mu.Lock()
	delete(c.sessions, s)
	c.mu.Unlock()
	c.wg.Done()
}

func (c *conn) userCert() *gossh.Certificate {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.cert
}

// authPublicKey decides whether key may log in. It runs on the SSH
// handshake goroutine.
func (c *conn) authPublicKey(ctx gliderssh.Context, key gliderssh.PublicKey) bool {
	cert, reason, err := c.checkKey(ctx.User(), ctx.RemoteAddr(), key)
	if err != nil {
		details := map[string]string{"reason": reason, "remote": ctx.RemoteAddr().String()}
		attrs := []any{"reason", reason, "err", err}
		if cert != nil {
			details["key_id"] = cert.KeyId
			details["serial"] = fmt.Sprint(cert.Serial)
			attrs = append(attrs, "key_id", cert.KeyId, "serial", cert.Serial)
		}
		c.log.Warn("SSH authentication refused", attrs...)
		c.p.cfg.Event(context.WithoutCancel(c.ctx), EventAuthRefused, SessionInfo{
			GrantID: c.t.GrantID, Requester: c.t.Requester, Target: c.t.Name, Login: c.t.Login,
		}, details)
		return false
	}
	c.mu.Lock()
	c.cert = cert
	c.mu.Unlock()
	c.authed.Store(true)
	c.log.Info("SSH user authenticated", "key_id", cert.KeyId, "serial", cert.Serial, "user", ctx.User())
	return true
}

// checkKey returns the certificate and nil when key may log in as user from
// remote, or a short reason and an error.
func (c *conn) checkKey(user string, remote net.Addr, key gossh.PublicKey) (*gossh.Certificate, string, error) {
	cert, ok := key.(*gossh.Certificate)
	if !ok {
		return nil, "not a certificate", fmt.Errorf("key %s is not a certificate", gossh.FingerprintSHA256(key))
	}
	if user != c.t.Login {
		return cert, "wrong login", fmt.Errorf("login %q, want %q", user, c.t.Login)
	}
	now := c.p.cfg.Clock()
	if !now.Before(c.t.Ends) {
		return cert, "grant ended", fmt.Errorf("grant ended at %s", c.t.Ends.UTC().Format(time.RFC3339))
	}
	if err := sshca.CheckUserCert(c.p.cfg.UserCAs(), cert, c.t.Login, now); err != nil {
		return cert, "invalid certificate", err
	}
	prefixes, err := sshca.SourceAddresses(cert)
	if err != nil {
		return cert, "invalid certificate", err
	}
	if len(prefixes) == 0 {
		return cert, "no source-address", errors.New("certificate has no source-address critical option")
	}
	addr, err := addrOf(remote)
	if err != nil {
		return cert, "unknown source", err
	}
	if addr != c.t.Source.Unmap() {
		return cert, "wrong source", fmt.Errorf("connection from %s, the grant's tunnel address is %s", addr, c.t.Source)
	}
	covered := false
	for _, p := range prefixes {
		if p.Contains(addr) {
			covered = true
			break
		}
	}
	if !covered {
		return cert, "source-address mismatch", fmt.Errorf("source-address %v does not cover %s", prefixes, addr)
	}
	if err := c.p.cfg.CheckGrant(c.ctx, c.t.GrantID); err != nil {
		return cert, "grant not active", fmt.Errorf("checking grant: %w", err)
	}
	return cert, "", nil
}

func addrOf(a net.Addr) (netip.Addr, error) {
	if a == nil {
		return netip.Addr{}, errors.New("connection has no remote address")
	}
	if tcp, ok := a.(*net.TCPAddr); ok {
		ip, ok := netip.AddrFromSlice(tcp.IP)
		if !ok {
			return netip.Addr{}, fmt.Errorf("bad remote address %v", a)
		}
		return ip.Unmap(), nil
	}
	ap, err := netip.ParseAddrPort(a.String())
	if err != nil {
		return netip.Addr{}, fmt.Errorf("remote address %q is not ip:port: %w", a.String(), err)
	}
	return ap.Addr().Unmap(), nil
}

// cleanReason makes reason safe and short for a user's terminal.
func cleanReason(reason string) string {
	out := make([]rune, 0, len(reason))
	for _, r := range reason {
		if len(out) >= maxReasonLen {
			break
		}
		if unicode.IsControl(r) || r == unicode.ReplacementChar {
			r = ' '
		}
		out = append(out, r)
	}
	if len(out) == 0 {
		return "session ended"
	}
	return string(out)
}

// discardRequests answers every request on in with false until it closes.
func discardRequests(in <-chan *gossh.Request) {
	for req := range in {
		if req.WantReply {
			_ = req.Reply(false, nil)
		}
	}
}
