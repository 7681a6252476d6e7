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
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"strings"
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
	// DataDir holds the store, keys and recordings. A missing dir is
	// created 0700 and an empty one tightened to 0700; a non-empty one that
	// group or others can reach is refused.
	DataDir string
	// ConfigFile is the YAML file of targets, roles and rules: a regular
	// file that only its owner can write.
	ConfigFile string
	// Listen is the HTTPS address; empty means 127.0.0.1:8443.
	Listen string
	// PublicURL is the https URL people and agents use; empty means
	// https://localhost:<port of Listen>. Its host is the WebAuthn RP ID,
	// and the TLS certificate in DataDir must be valid for it.
	PublicURL string
	// WireGuardPort is the gateway's UDP port (up to 65535); 0 picks a
	// free one.
	WireGuardPort int
	// WireGuardHost is the host agents send WireGuard to; empty means 127.0.0.1.
	WireGuardHost string
	// NotifyWebhook, when set, receives a JSON POST per grant link.
	NotifyWebhook string
	// AuditWitness, when set, is a file every signed audit checkpoint is
	// appended to (JSON lines). Put it where the broker's admin cannot
	// rewrite it; a path inside DataDir is refused. `pinhole audit verify
	// --witness` checks the log against it.
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
	userCA   ssh.Signer // trusted by targets; signs the proxy's upstream certificates
	clientCA ssh.Signer // trusted by the proxy only; signs workstations' grant certificates
	hostCA   ssh.Signer
	hostKey  ssh.Signer
	hostCert *hostCerts
	lock     *os.File // flock on DataDir itself, held until Close
	// CAFile is the PEM of the broker's TLS certificate (agents trust it).
	CAFile string
	// URL is the public URL.
	URL string
}

// check fills in c's defaults and validates every field that can be
// checked without the data dir, so that a bad flag is refused before the
// data dir is created or a key is generated.
func (c *Config) check() error {
	if c.DataDir == "" || c.ConfigFile == "" {
		return errors.New("broker: data dir and config file are required")
	}
	if c.Listen == "" {
		c.Listen = "127.0.0.1:8443"
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		return fmt.Errorf("listen address %q: %w", c.Listen, err)
	}
	if _, err := publicURL(*c); err != nil {
		return err
	}
	if c.WireGuardPort < 0 || c.WireGuardPort > 65535 {
		return fmt.Errorf("WireGuard port %d is out of range: want 1-65535, or 0 for any free port", c.WireGuardPort)
	}
	if c.WireGuardHost == "" {
		c.WireGuardHost = "127.0.0.1"
	}
	if _, err := netip.ParseAddr(c.WireGuardHost); err != nil && !hostNameRE.MatchString(c.WireGuardHost) {
		return fmt.Errorf("WireGuard host %q: want a host name or an IP address, without a port", c.WireGuardHost)
	}
	if c.NotifyWebhook != "" {
		if err := checkWebhookURL(c.NotifyWebhook); err != nil {
			return err
		}
	}
	// gateway.New checks this too, but only once the keys exist.
	if c.UAPIName != "" {
		if err := gateway.CheckUAPIName(c.UAPIName); err != nil {
			return err
		}
	}
	if c.AuditWitness != "" {
		if err := checkWitnessPath(c.AuditWitness, c.DataDir); err != nil {
			return err
		}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return nil
}

// hostNameRE is what Config.WireGuardHost may be when it is not an IP
// address: a DNS name, which agents are given as their endpoint.
var hostNameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$`)

// Open prepares the parts that need no network: data dir, keys, store,
// rules and the service. Bootstrap uses it alone; New builds on it.
func Open(ctx context.Context, cfg Config) (*Broker, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	// Flags, rules and the witness first: a bad one must not touch the
	// data dir.
	pc, err := loadRules(cfg.ConfigFile)
	if err != nil {
		return nil, err
	}
	if len(pc.Targets) == 0 || len(pc.Rules) == 0 {
		cfg.Logger.Warn("the config grants nothing: it has no targets or no rules", "config", cfg.ConfigFile)
	}
	var witness service.Witness
	if cfg.AuditWitness != "" {
		// Fail now rather than log every 10 s: an audit witness that cannot
		// be written is no witness.
		if err := openWitness(cfg.AuditWitness); err != nil {
			return nil, err
		}
		witness = &witnessFile{path: cfg.AuditWitness}
	}
	pub, err := publicURL(cfg)
	if err != nil {
		return nil, err
	}
	u, _ := url.Parse(pub)
	f, err := fido.New(fido.Config{RPID: u.Hostname(), RPDisplayName: "pinhole", Origins: []string{pub}})
	if err != nil {
		return nil, fmt.Errorf("webauthn: %w", err)
	}
	if err := prepareDataDir(cfg.DataDir); err != nil {
		return nil, err
	}
	lock, err := lockDataDir(cfg.DataDir)
	if err != nil {
		return nil, err
	}
	b := &Broker{cfg: cfg, log: cfg.Logger, policy: new(atomic.Pointer[policy.Config]), lock: lock, URL: pub}
	b.policy.Store(pc)
	ok := false
	defer func() {
		if !ok {
			b.Close()
		}
	}()
	if err := checkRPID(cfg.DataDir, u.Hostname()); err != nil {
		return nil, err
	}
	keys := filepath.Join(cfg.DataDir, "keys")
	if b.userCA, err = sshca.LoadOrCreateKey(filepath.Join(keys, "ssh_user_ca")); err != nil {
		return nil, fmt.Errorf("user CA: %w", err)
	}
	// Workstations' per-grant certificates come from a CA of their own that
	// only the recording proxy trusts (see service.Config.ClientCA).
	if b.clientCA, err = sshca.LoadOrCreateKey(filepath.Join(keys, "ssh_client_ca")); err != nil {
		return nil, fmt.Errorf("client CA: %w", err)
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
	if cfg.NotifyWebhook != "" { // checked by cfg.check
		notifier = append(notifier, &webhook{url: cfg.NotifyWebhook, client: &http.Client{Timeout: 5 * time.Second}})
	}
	b.svc, err = service.New(service.Config{Store: b.store, Policy: b.policy, FIDO: f, ClientCA: b.clientCA, HostCA: b.hostCA,
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
	if err := cfg.check(); err != nil {
		return nil, err
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
	cert, caFile, err := b.loadTLS()
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
		UserCAs:        func() []ssh.PublicKey { return []ssh.PublicKey{b.clientCA.PublicKey()} },
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

// loadTLS loads the broker's TLS certificate, creating one for the public
// URL's host (and localhost) on first start. A certificate made for another
// host, before the public URL changed, is refused: browsers and agents would
// refuse it anyway, with a less helpful message.
func (b *Broker) loadTLS() (tls.Certificate, string, error) {
	u, _ := url.Parse(b.URL)
	host := u.Hostname()
	dir := filepath.Join(b.cfg.DataDir, "tls")
	cert, caFile, err := tlsfile.LoadOrCreate(dir, []string{host, "localhost", "127.0.0.1", "::1"}, time.Now())
	if err != nil {
		return tls.Certificate{}, "", err
	}
	if err := tlsfile.CheckHost(cert, host); err != nil {
		return tls.Certificate{}, "", fmt.Errorf("%w, the host of the public URL %s (certificate %s). "+
			"If the broker's host name has changed for good, remove %s and start again: the broker makes a new certificate for %s, which agents must then trust in place of the old one. "+
			"Security keys are bound to the public URL's host (the WebAuthn RP ID), so keys registered under the old host do not work under %s and must be registered again. "+
			"Otherwise start with the public URL the certificate was made for",
			err, b.URL, caFile, dir, host, host)
	}
	return cert, caFile, nil
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

// loadRules reads the rules from path. It refuses anything but a regular
// file before opening it, and opens without blocking, so that a FIFO or a
// device can neither hang start-up nor pass for a config. A file others can
// write is refused too: whoever can write it decides who gets access.
func loadRules(path string) (*policy.Config, error) {
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return nil, fmt.Errorf("config file %s is not a regular file (it is %s)", path, fileKind(fi.Mode()))
	}
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NONBLOCK|syscall.O_NOCTTY, 0)
	if err != nil {
		return nil, fmt.Errorf("config file: %w", err)
	}
	defer f.Close()
	// Check what was opened, not what the name pointed at a moment ago.
	ofi, err := f.Stat()
	if err != nil {
		return nil, fmt.Errorf("config file %s: %w", path, err)
	}
	if !ofi.Mode().IsRegular() || !os.SameFile(fi, ofi) {
		return nil, fmt.Errorf("config file %s changed while it was opened; start again", path)
	}
	if ofi.Mode().Perm()&0o022 != 0 {
		return nil, fmt.Errorf("config file %s is writable by others (mode %v): whoever can write it decides who gets access; make it 0644 or stricter", path, ofi.Mode().Perm())
	}
	data, err := io.ReadAll(io.LimitReader(f, policyfile.MaxSize+1))
	if err != nil {
		return nil, fmt.Errorf("reading config file %s: %w", path, err)
	}
	return policyfile.Parse(path, data)
}

// fileKind names what kind of file m is, for errors.
func fileKind(m fs.FileMode) string {
	switch {
	case m.IsDir():
		return "a directory"
	case m&fs.ModeNamedPipe != 0:
		return "a FIFO"
	case m&fs.ModeSocket != 0:
		return "a socket"
	case m&fs.ModeCharDevice != 0:
		return "a character device"
	case m&fs.ModeDevice != 0:
		return "a device"
	case m&fs.ModeSymlink != 0:
		return "a symbolic link"
	default:
		return "not a regular file"
	}
}

// checkWitnessPath refuses an audit witness inside the data dir: there the
// broker's admin can rewrite it along with the log it witnesses, and the
// broker would append JSON to its own keys or store. Both paths are made
// absolute and cleaned, and their longest existing prefixes have their
// symbolic links resolved, so neither "..", a relative path nor a link
// hides where the witness really is.
func checkWitnessPath(witness, dataDir string) error {
	w, err := resolvePath(witness)
	if err != nil {
		return fmt.Errorf("audit witness %s: %w", witness, err)
	}
	d, err := resolvePath(dataDir)
	if err != nil {
		return fmt.Errorf("data dir %s: %w", dataDir, err)
	}
	if within(d, w) {
		return fmt.Errorf("audit witness %s is inside the data dir %s: the witness must live where the broker's admin cannot rewrite it (another disk, user or host), outside the data dir", witness, dataDir)
	}
	return nil
}

// resolvePath returns p absolute and cleaned, with the symbolic links of its
// longest existing prefix resolved. A dangling symbolic link is an error:
// creating the file would create the link's target, wherever that is.
func resolvePath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	rest := ""
	for cur := abs; ; {
		resolved, err := filepath.EvalSymlinks(cur)
		if err == nil {
			return filepath.Join(resolved, rest), nil
		}
		if _, lerr := os.Lstat(cur); lerr == nil {
			return "", fmt.Errorf("resolving %s: %w", cur, err)
		}
		parent := filepath.Dir(cur)
		if parent == cur {
			return abs, nil
		}
		rest = filepath.Join(filepath.Base(cur), rest)
		cur = parent
	}
}

// within reports whether path is dir or below it; both are clean and absolute.
func within(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator))
}

// openWitness checks that the audit witness can be appended to, creating it
// (0600) when missing. It opens without blocking, so a FIFO put there
// after checkWitnessPath cannot hang start-up.
func openWitness(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE|syscall.O_NONBLOCK|syscall.O_NOCTTY, 0o600)
	if err != nil {
		return fmt.Errorf("audit witness: %w", err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("audit witness: %w", err)
	}
	if !fi.Mode().IsRegular() {
		return fmt.Errorf("audit witness %s is not a regular file (it is %s)", path, fileKind(fi.Mode()))
	}
	return nil
}

// prepareDataDir makes dir the broker's private directory. A missing dir is
// created 0700 and an empty one is tightened to 0700. An existing non-empty
// dir that group or others can reach is refused rather than tightened: its
// files may already have been read or planted by others, and it is likely
// not the broker's own (a home directory, /tmp).
func prepareDataDir(dir string) error {
	if err := os.MkdirAll(filepath.Dir(filepath.Clean(dir)), 0o700); err != nil {
		return fmt.Errorf("creating data dir: %w", err)
	}
	err := os.Mkdir(dir, 0o700)
	if err == nil {
		// Ours from the start; the chmod only undoes an odd umask.
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("securing data dir: %w", err)
		}
		return nil
	}
	if !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("creating data dir: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("data dir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("data dir %s is not a directory (it is %s)", dir, fileKind(fi.Mode()))
	}
	if fi.Mode().Perm()&0o077 == 0 {
		return nil
	}
	refuse := fmt.Errorf("data dir %s has mode %s and is not empty, so others may have read or planted files in it: use a dedicated directory for the broker's data (one that does not exist yet is created with mode 0700)", dir, octalMode(fi.Mode()))
	if empty, err := emptyDir(dir); err != nil {
		return err
	} else if !empty {
		return refuse
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return fmt.Errorf("securing data dir: %w", err)
	}
	// Someone else may have added a file between the look and the chmod;
	// after the chmod no one else can.
	if empty, err := emptyDir(dir); err != nil {
		return err
	} else if !empty {
		return refuse
	}
	return nil
}

// emptyDir reports whether dir has no entries.
func emptyDir(dir string) (bool, error) {
	f, err := os.Open(dir)
	if err != nil {
		return false, fmt.Errorf("reading data dir: %w", err)
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if errors.Is(err, io.EOF) {
		return true, nil
	}
	if err != nil {
		return false, fmt.Errorf("reading data dir: %w", err)
	}
	return len(names) == 0, nil
}

// octalMode formats m's permission and special bits the way chmod takes
// them, like "1777" for /tmp.
func octalMode(m fs.FileMode) string {
	o := uint32(m.Perm())
	if m&fs.ModeSetuid != 0 {
		o |= 0o4000
	}
	if m&fs.ModeSetgid != 0 {
		o |= 0o2000
	}
	if m&fs.ModeSticky != 0 {
		o |= 0o1000
	}
	return fmt.Sprintf("%04o", o)
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
	g, tg, err := b.svc.AuthorizeFlow(ctx, f.Src, f.Dst)
	if err != nil {
		return nil, err
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

// checkRPID pins the WebAuthn RP ID (the public URL's host) in the data dir
// on first start and refuses a later start under another host: every
// registered security key is bound to the first one and would silently stop
// working.
func checkRPID(dataDir, host string) error {
	path := filepath.Join(dataDir, "rp_id")
	b, err := os.ReadFile(path)
	switch {
	case err == nil:
		if pinned := strings.TrimSpace(string(b)); pinned != host {
			return fmt.Errorf("this broker's security keys are bound to the host %s (its first public URL's); the public URL now names %s, where every registered key would stop working: start it with --public-url https://%s[:port], or set up a new broker with a fresh data dir", pinned, host, pinned)
		}
		return nil
	case errors.Is(err, fs.ErrNotExist):
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(host+"\n"), 0o600); err != nil {
			return fmt.Errorf("pinning the WebAuthn RP ID: %w", err)
		}
		if err := os.Rename(tmp, path); err != nil {
			return fmt.Errorf("pinning the WebAuthn RP ID: %w", err)
		}
		return nil
	default:
		return fmt.Errorf("reading the pinned WebAuthn RP ID: %w", err)
	}
}
