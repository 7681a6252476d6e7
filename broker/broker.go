// Package broker is the broker's composition root: it loads or creates the
// broker's keys, opens the store, reads the rules, and wires the service, the
// JSON API, the web pages, the WireGuard gateway and the recording SSH proxy
// into one process that Run serves until its context ends.
package broker

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/crypto/ssh"
	"golang.org/x/sync/errgroup"

	"github.com/pinhole-dev/pinhole/broker/api"
	"github.com/pinhole-dev/pinhole/broker/gateway"
	"github.com/pinhole-dev/pinhole/broker/service"
	"github.com/pinhole-dev/pinhole/broker/sshproxy"
	"github.com/pinhole-dev/pinhole/broker/tlsfile"
	"github.com/pinhole-dev/pinhole/broker/web"
	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/fido"
	"github.com/pinhole-dev/pinhole/internal/policy"
	"github.com/pinhole-dev/pinhole/internal/policy/policyfile"
	"github.com/pinhole-dev/pinhole/internal/recording"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/store/sqlstore"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
)

// Config configures a broker. DataDir and ConfigFile are required.
type Config struct {
	// DataDir holds the store, keys and recordings (created 0700).
	DataDir string
	// ConfigFile is the YAML file of targets, roles and rules.
	ConfigFile string
	// Listen is the HTTPS address; empty means 127.0.0.1:8443.
	Listen string
	// PublicURL is the https URL people and agents use; empty means
	// https://localhost:<port of Listen>. Its host is the WebAuthn RP ID.
	PublicURL string
	// WireGuardPort is the gateway's UDP port; 0 picks a free one.
	WireGuardPort int
	// WireGuardHost is the host agents send WireGuard to; empty means 127.0.0.1.
	WireGuardHost string
	// NotifyWebhook, when set, receives a JSON POST per grant link.
	NotifyWebhook string
	// AuditWitness, when set, is a file every signed audit checkpoint is
	// appended to (JSON lines). Put it where the broker's admin cannot
	// rewrite it; `pinhole audit verify --witness` checks the log against it.
	AuditWitness string
	// UAPIName, when set, exposes the gateway to `wg show NAME`.
	UAPIName string
	// Logger is the operational log; nil discards.
	Logger *slog.Logger
}

// Broker is a running broker.
type Broker struct {
	cfg      Config
	log      *slog.Logger
	store    *sqlstore.Store
	svc      *service.Service
	policy   *atomic.Pointer[policy.Config]
	gw       *gateway.Gateway
	proxy    *sshproxy.Proxy
	ln       net.Listener
	srv      *http.Server
	userCA   ssh.Signer
	hostCA   ssh.Signer
	hostKey  ssh.Signer
	hostCert *hostCerts
	lock     *os.File // flock on DataDir itself, held until Close
	// CAFile is the PEM of the broker's TLS certificate (agents trust it).
	CAFile string
	// URL is the public URL.
	URL string
}

func (c *Config) defaults() error {
	if c.DataDir == "" || c.ConfigFile == "" {
		return errors.New("broker: data dir and config file are required")
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8443"
	}
	if c.WireGuardHost == "" {
		c.WireGuardHost = "127.0.0.1"
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// Open prepares the parts that need no network: data dir, keys, store,
// rules and the service. Bootstrap uses it alone; New builds on it.
func Open(ctx context.Context, cfg Config) (*Broker, error) {
	if err := cfg.defaults(); err != nil {
		return nil, err
	}
	// Rules first: a bad config must not touch the data dir.
	if fi, err := os.Stat(cfg.ConfigFile); err == nil && fi.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("config file %s is writable by others (mode %v): whoever can write it decides who gets access; make it 0644 or stricter", cfg.ConfigFile, fi.Mode().Perm())
	}
	pc, err := policyfile.Load(cfg.ConfigFile)
	if err != nil {
		return nil, err
	}
	if len(pc.Targets) == 0 || len(pc.Rules) == 0 {
		cfg.Logger.Warn("the config grants nothing: it has no targets or no rules", "config", cfg.ConfigFile)
	}
	if err := os.MkdirAll(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("creating data dir: %w", err)
	}
	if err := os.Chmod(cfg.DataDir, 0o700); err != nil {
		return nil, fmt.Errorf("securing data dir: %w", err)
	}
	lock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	b := &Broker{cfg: cfg, log: cfg.Logger, policy: new(atomic.Pointer[policy.Config]), lock: lock}
	b.policy.Store(pc)
	ok := false
	defer func() {
		if !ok {
			b.Close()
		}
	}()
	keys := filepath.Join(cfg.DataDir, "keys")
	if b.userCA, err = sshca.LoadOrCreateKey(filepath.Join(keys, "ssh_user_ca")); err != nil {
		return nil, fmt.Errorf("user CA: %w", err)
	}
	if b.hostCA, err = sshca.LoadOrCreateKey(filepath.Join(keys, "ssh_host_ca")); err != nil {
		return nil, fmt.Errorf("host CA: %w", err)
	}
	if b.hostKey, err = sshca.LoadOrCreateKey(filepath.Join(keys, "ssh_proxy_host_key")); err != nil {
		return nil, fmt.Errorf("proxy host key: %w", err)
	}
	auditKey, err := devicekey.LoadOrCreate(filepath.Join(keys, "audit_signing_key.pem"))
	if err != nil {
		return nil, fmt.Errorf("audit signing key: %w", err)
	}
	var witness service.Witness
	if cfg.AuditWitness != "" {
		// Fail now rather than log every 10 s: an audit witness that cannot
		// be written is no witness.
		f, err := os.OpenFile(cfg.AuditWitness, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
		if err != nil {
			return nil, fmt.Errorf("audit witness: %w", err)
		}
		f.Close()
		witness = &witnessFile{path: cfg.AuditWitness}
	}
	if b.URL, err = publicURL(cfg); err != nil {
		return nil, err
	}
	u, _ := url.Parse(b.URL)
	f, err := fido.New(fido.Config{RPID: u.Hostname(), RPDisplayName: "pinhole", Origins: []string{b.URL}})
	if err != nil {
		return nil, fmt.Errorf("webauthn: %w", err)
	}
	rec, err := recording.NewFileStore(filepath.Join(cfg.DataDir, "recordings"))
	if err != nil {
		return nil, err
	}
	if b.store, err = sqlstore.Open(ctx, filepath.Join(cfg.DataDir, "pinhole.db"), b.log); err != nil {
		return nil, err
	}
	// Every grant link lands in the owner-only outbox first, so a webhook
	// that is down loses nothing; the webhook then delivers it.
	notifier := notifiers{&outboxFile{path: filepath.Join(cfg.DataDir, "outbox.jsonl")}}
	if cfg.NotifyWebhook != "" {
		u, err := url.Parse(cfg.NotifyWebhook)
		if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
			return nil, fmt.Errorf("notify webhook %q: want an http(s)://host/path URL", cfg.NotifyWebhook)
		}
		notifier = append(notifier, &webhook{url: cfg.NotifyWebhook, client: &http.Client{Timeout: 5 * time.Second}})
	}
	b.svc, err = service.New(service.Config{Store: b.store, Policy: b.policy, FIDO: f, UserCA: b.userCA, HostCA: b.hostCA,
		PublicURL: b.URL, Notifier: notifier, Logger: b.log, Recordings: rec, AuditKey: auditKey, Witness: witness})
	if err != nil {
		return nil, err
	}
	ok = true
	return b, nil
}

func publicURL(cfg Config) (string, error) {
	if cfg.PublicURL != "" {
		u, err := url.Parse(cfg.PublicURL)
		if err != nil || u.Scheme != "https" || u.Host == "" || u.Path != "" && u.Path != "/" {
			return "", fmt.Errorf("public URL %q: want https://host[:port]", cfg.PublicURL)
		}
		if ip := net.ParseIP(u.Hostname()); ip != nil {
			return "", fmt.Errorf("public URL %q: WebAuthn needs a host name, not an IP address (use localhost)", cfg.PublicURL)
		}
		return "https://" + u.Host, nil
	}
	_, port, err := net.SplitHostPort(cfg.Listen)
	if err != nil {
		return "", fmt.Errorf("listen address %q: %w", cfg.Listen, err)
	}
	return "https://localhost:" + port, nil
}

// Service returns the use-case layer (for bootstrap and tests).
func (b *Broker) Service() *service.Service { return b.svc }

// New opens the broker and starts its listeners: HTTPS and the WireGuard
// gateway. Call Run to serve.
func New(ctx context.Context, cfg Config) (*Broker, error) {
	if cfg.Listen == "" {
		cfg.Listen = "127.0.0.1:8443"
	}
	// Listen first so that a port of 0 is known before the public URL
	// (and with it the WebAuthn origin) is derived from it.
	ln, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", cfg.Listen, err)
	}
	cfg.Listen = ln.Addr().String()
	b, err := Open(ctx, cfg)
	if err != nil {
		ln.Close()
		return nil, err
	}
	b.ln = ln
	if err := b.start(ctx); err != nil {
		b.Close()
		return nil, err
	}
	return b, nil
}

func (b *Broker) start(ctx context.Context) error {
	u, _ := url.Parse(b.URL)
	cert, caFile, err := tlsfile.LoadOrCreate(filepath.Join(b.cfg.DataDir, "tls"), []string{u.Hostname(), "localhost", "127.0.0.1", "::1"}, time.Now())
	if err != nil {
		return err
	}
	b.CAFile = caFile
	if b.cfg.NotifyWebhook == "" {
		b.log.Warn("no notify webhook: grant links go only to the outbox file", "path", filepath.Join(b.cfg.DataDir, "outbox.jsonl"))
	}
	wgPriv, err := loadOrCreateWGKey(filepath.Join(b.cfg.DataDir, "keys", "wireguard.key"))
	if err != nil {
		return err
	}
	b.hostCert = &hostCerts{ca: b.hostCA, key: b.hostKey, certs: map[string]hostCert{}}
	b.proxy, err = sshproxy.New(sshproxy.Config{
		UserCAs:        func() []ssh.PublicKey { return []ssh.PublicKey{b.userCA.PublicKey()} },
		Clock:          b.svc.Now,
		Logger:         b.log.With("part", "sshproxy"),
		CheckGrant:     b.svc.CheckGrant,
		UpstreamSigner: b.upstreamSigner,
		OpenRecording:  b.openRecording,
		Event:          b.sessionEvent,
	})
	if err != nil {
		return fmt.Errorf("ssh proxy: %w", err)
	}
	b.gw, err = gateway.New(gateway.Config{PrivateKey: wgPriv, ListenPort: b.cfg.WireGuardPort, Logger: b.log.With("part", "gateway"),
		Decide: b.decide, UAPIName: b.cfg.UAPIName})
	if err != nil {
		return fmt.Errorf("gateway: %w", err)
	}
	b.svc.SetDataPlane(b.gw, b.proxy)
	b.svc.SetGatewayEndpoint(net.JoinHostPort(b.cfg.WireGuardHost, fmt.Sprint(b.gw.ListenPort())))
	if err := b.svc.Restore(ctx); err != nil {
		return fmt.Errorf("restoring grants: %w", err)
	}
	webh, err := web.New(b.svc, b.log.With("part", "web"))
	if err != nil {
		return err
	}
	apih := api.New(b.svc, b.userCA.PublicKey(), b.hostCA.PublicKey(), b.log.With("part", "api"))
	mux := http.NewServeMux()
	mux.Handle("/v1/", apih)
	mux.Handle("/healthz", apih)
	mux.Handle("/", webh)
	b.srv = &http.Server{
		Handler:           mux,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    32 << 10,
		ErrorLog:          slog.NewLogLogger(b.log.Handler(), slog.LevelDebug),
		TLSConfig: &tls.Config{
			MinVersion:   tls.VersionTLS13,
			Certificates: []tls.Certificate{cert},
			ClientAuth:   tls.RequestClientCert, // devices present their key; people's browsers do not
		},
	}
	return nil
}

// UserCAKey is the user CA's public key as an authorized_keys line (what
// targets put in TrustedUserCAKeys).
func (b *Broker) UserCAKey() string { return sshca.AuthorizedKey(b.userCA.PublicKey()) }

// Addr is the HTTPS listener's address.
func (b *Broker) Addr() net.Addr { return b.ln.Addr() }

// WireGuardPort is the gateway's UDP port.
func (b *Broker) WireGuardPort() int { return b.gw.ListenPort() }

// Gateway exposes the data plane (tests count peers).
func (b *Broker) Gateway() *gateway.Gateway { return b.gw }

// Run serves until ctx is done, then shuts everything down.
func (b *Broker) Run(ctx context.Context) error {
	defer b.Close()
	g, gctx := errgroup.WithContext(ctx)
	// Requests run under gctx, so shutdown ends long-polls at once instead
	// of waiting them out.
	b.srv.BaseContext = func(net.Listener) context.Context { return gctx }
	g.Go(func() error {
		if err := b.srv.ServeTLS(b.ln, "", ""); err != nil && !errors.Is(err, http.ErrServerClosed) {
			return fmt.Errorf("https: %w", err)
		}
		return nil
	})
	g.Go(func() error { return b.svc.Run(gctx) })
	g.Go(func() error { return b.svc.RunCheckpoints(gctx) })
	g.Go(func() error {
		<-gctx.Done()
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		return b.srv.Shutdown(sctx)
	})
	b.log.Info("broker running", "url", b.URL, "listen", b.ln.Addr().String(), "wireguard_port", b.gw.ListenPort())
	return g.Wait()
}

// Close releases everything New opened.
func (b *Broker) Close() error {
	var errs []error
	if b.srv != nil {
		errs = append(errs, b.srv.Close())
	}
	if b.ln != nil {
		b.ln.Close() // already closed by srv.Close once served
	}
	if b.gw != nil {
		errs = append(errs, b.gw.Close())
	}
	if b.store != nil {
		errs = append(errs, b.store.Close())
	}
	if b.lock != nil {
		errs = append(errs, b.lock.Close()) // releases the flock
	}
	return errors.Join(errs...)
}

// lockDataDir takes an exclusive lock on the data dir so that two brokers
// never share one store: each would hold its own peers and flows, and a
// revocation on one would not cut the other's.
func lockDataDir(dir string) (*os.File, error) {
	// The lock is on the directory itself: a lock file could be deleted.
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("opening data dir for locking: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("data dir %s is in use by another pinhole-broker", dir)
		}
		return nil, fmt.Errorf("locking data dir: %w", err)
	}
	return f, nil
}

func loadOrCreateWGKey(path string) (wgkey.Private, error) {
	b, err := os.ReadFile(path)
	if errors.Is(err, os.ErrNotExist) {
		k, err := wgkey.NewPrivate(nil)
		if err != nil {
			return wgkey.Private{}, err
		}
		txt, _ := k.MarshalText()
		if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
			return wgkey.Private{}, fmt.Errorf("creating key dir: %w", err)
		}
		if err := os.WriteFile(path, append(txt, '\n'), 0o600); err != nil {
			return wgkey.Private{}, fmt.Errorf("writing WireGuard key: %w", err)
		}
		return k, nil
	}
	if err != nil {
		return wgkey.Private{}, fmt.Errorf("reading WireGuard key: %w", err)
	}
	if fi, err := os.Stat(path); err != nil || fi.Mode().Perm()&0o077 != 0 {
		return wgkey.Private{}, fmt.Errorf("WireGuard key %s must be mode 0600", path)
	}
	var k wgkey.Private
	if err := k.UnmarshalText([]byte(trimNL(string(b)))); err != nil {
		return wgkey.Private{}, fmt.Errorf("WireGuard key %s: %w", path, err)
	}
	return k, nil
}

func trimNL(s string) string {
	for len(s) > 0 && (s[len(s)-1] == '\n' || s[len(s)-1] == '\r') {
		s = s[:len(s)-1]
	}
	return s
}

// decide is the gateway's per-SYN decision: the service authorizes (and
// audits) the flow; allowed flows go to the recorder for the target's protocol.
func (b *Broker) decide(ctx context.Context, f gateway.Flow) (gateway.Handler, error) {
	g, err := b.svc.AuthorizeFlow(ctx, f.Src, f.Dst)
	if err != nil {
		return nil, err
	}
	tg, ok := b.policy.Load().Target(g.Target)
	if !ok {
		return nil, fmt.Errorf("target %s is no longer configured", g.Target)
	}
	dial := func(ctx context.Context) (net.Conn, error) {
		d := net.Dialer{Timeout: 10 * time.Second}
		return d.DialContext(ctx, "tcp", tg.Address)
	}
	switch tg.Protocol {
	case policy.ProtocolSSH:
		signer, err := b.hostCert.signer(tg, b.svc.Now())
		if err != nil {
			return nil, err
		}
		t := sshproxy.Target{GrantID: g.Request, Requester: g.User, Name: tg.Name, Login: tg.Login, Source: f.Src.Addr(),
			HostSigner: signer, Dial: dial, UpstreamHostKey: tg.HostKey, Ends: g.Ends}
		return func(ctx context.Context, conn net.Conn) { b.proxy.HandleConn(ctx, conn, t) }, nil
	case policy.ProtocolTCP:
		// TCP targets are spliced; a TCP stream recorder comes with a later issue.
		return func(ctx context.Context, conn net.Conn) {
			up, err := dial(ctx)
			if err != nil {
				b.log.Warn("dialing target failed", "target", tg.Name, "err", err)
				conn.Close()
				return
			}
			gateway.Splice(ctx, conn, up)
		}, nil
	default:
		return nil, fmt.Errorf("target %s: protocol %q has no handler", tg.Name, tg.Protocol)
	}
}

func (b *Broker) upstreamSigner(ctx context.Context, t sshproxy.Target) (ssh.Signer, error) {
	key, err := sshca.NewKey(nil)
	if err != nil {
		return nil, err
	}
	now := b.svc.Now()
	cert, err := sshca.IssueUser(nil, b.userCA, sshca.UserCert{Key: key.PublicKey(),
		KeyID:      fmt.Sprintf("pinhole proxy grant=%s user=%s target=%s", t.GrantID, t.Requester, t.Name),
		Principals: []string{t.Login}, ValidAfter: now.Add(-time.Minute), ValidBefore: t.Ends, PermitPTY: true})
	if err != nil {
		return nil, fmt.Errorf("minting upstream certificate: %w", err)
	}
	return sshca.CertSigner(cert, key)
}

func (b *Broker) openRecording(ctx context.Context, s sshproxy.SessionInfo) (sshproxy.Recording, error) {
	return b.svc.OpenRecording(ctx, meta(s))
}

func (b *Broker) sessionEvent(ctx context.Context, typ string, s sshproxy.SessionInfo, details map[string]string) {
	b.svc.SessionEvent(ctx, typ, meta(s), details)
}

func meta(s sshproxy.SessionInfo) service.SessionMeta {
	return service.SessionMeta{ID: s.ID, Request: s.GrantID, User: s.Requester, Target: s.Target, Login: s.Login, Kind: s.Kind,
		Command: s.Command, Term: s.Term, Width: s.Width, Height: s.Height, Started: s.Started}
}
