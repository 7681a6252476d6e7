// Package agent is the composition root of pinhole-agent, the program on a
// privileged workstation. It enrolls the workstation's device key with the
// broker (Enroll) and then runs (Agent.Run): it serves the local API the
// pinhole CLI talks to, sends signed posture reports, long-polls the broker
// for the device's events, and for every grant makes fresh WireGuard and SSH
// keys, activates the grant and brings a userspace tunnel up on a loopback
// port until the grant ends. Agent.Probe tries one TCP connection through a
// live tunnel, to show which ports the gateway lets through.
//
// State directory layout (all secrets 0600):
//
//	device.key                      Ed25519 device key (package devicekey)
//	agent.json                      {broker_url, device_id, user}
//	broker-ca.pem                   the broker's TLS CA, copied at enroll
//	agent.sock                      local API socket
//	grants/<request-id>/id_ed25519  per-grant SSH key (OpenSSH format)
//	grants/<request-id>/id_ed25519-cert.pub
//	grants/<request-id>/known_hosts @cert-authority lines for the host CA
//
// Grant files exist only while the grant's tunnel is up.
package agent

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pinhole-dev/pinhole/agent/localapi"
	agentposture "github.com/pinhole-dev/pinhole/agent/posture"
	"github.com/pinhole-dev/pinhole/agent/tunnel"
	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/posture"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// Defaults for Config fields left zero.
const (
	DefaultPostureEvery = 60 * time.Second
	// eventWait is the server-side wait of one events long-poll.
	eventWait = 25 * time.Second
	// keepAlive is the WireGuard persistent keepalive of grant tunnels.
	keepAlive = 25 * time.Second
	// expiryGrace is how long after a grant's end the agent tears the tunnel
	// down on its own when the broker has not already ended it.
	expiryGrace = 2 * time.Second
	// goodbyeGrace is how long after a grant's end (its expiry, or the
	// moment the broker's word of a revoke arrives) the agent lets the
	// grant's connections run down before it closes them: the broker tells
	// SSH users why and cuts the flows itself, and closing them first would
	// swallow that reason. No new connection is accepted meanwhile.
	goodbyeGrace = 600 * time.Millisecond
	// maxEnded bounds how many ended requests the agent remembers for Wait.
	maxEnded = 1024
	// callTimeout bounds one broker call (beyond a long-poll's own wait), so
	// a stalled connection cannot wedge a loop.
	callTimeout = 30 * time.Second
)

// Collector gathers the local machine's posture. Device and Nonce of the
// report are filled in by the agent.
type Collector interface {
	Collect(ctx context.Context) (posture.Report, error)
}

// Tunnel is one grant's running tunnel (tunnel.Userspace in production).
type Tunnel interface {
	// Listen forwards connections accepted on local to dst through the
	// tunnel until Close, and returns the bound address.
	Listen(local string, dst netip.AddrPort) (net.Addr, error)
	// DialContext opens a TCP connection through the tunnel to dst, a port
	// on the granted target address. A port the gateway does not grant is
	// refused (a TCP reset).
	DialContext(ctx context.Context, dst netip.AddrPort) (net.Conn, error)
	// Drain stops accepting local connections and waits until the
	// forwarded ones have ended by themselves or ctx is done.
	Drain(ctx context.Context) bool
	// Close tears the tunnel down and closes every forwarded connection.
	Close() error
}

var _ Tunnel = (*tunnel.Userspace)(nil)

// Config configures Enroll and New.
type Config struct {
	// StateDir holds the agent's keys and state (see the package doc).
	// Required.
	StateDir string
	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger
	// PostureEvery is the interval between posture reports; zero means
	// DefaultPostureEvery.
	PostureEvery time.Duration
	// Collector collects posture reports; nil means the real Linux
	// collector (package agent/posture) on the root filesystem.
	Collector Collector
	// Version is the agent's version, reported in posture reports; empty
	// means "dev".
	Version string
	// NewTunnel brings a grant's tunnel up; nil means tunnel.New
	// (userspace WireGuard). Tests inject a fake.
	NewTunnel func(tunnel.Config) (Tunnel, error)
	// Now returns the current time; nil means time.Now.
	Now func() time.Time
	// Rand is the source of the per-grant keys; nil means crypto/rand.
	Rand io.Reader
}

// withDefaults validates c and fills in its zero fields.
func (c Config) withDefaults() (Config, error) {
	if c.StateDir == "" {
		return c, errors.New("agent: state directory is required")
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.PostureEvery < 0 {
		return c, fmt.Errorf("agent: posture interval %v is negative", c.PostureEvery)
	}
	if c.PostureEvery == 0 {
		c.PostureEvery = DefaultPostureEvery
	}
	if c.Version == "" {
		c.Version = "dev"
	}
	if c.Collector == nil {
		c.Collector = &agentposture.Collector{Logger: c.Logger, AgentVersion: c.Version}
	}
	if c.NewTunnel == nil {
		c.NewTunnel = func(tc tunnel.Config) (Tunnel, error) {
			u, err := tunnel.New(tc)
			if err != nil {
				return nil, err
			}
			return u, nil
		}
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Rand == nil {
		c.Rand = rand.Reader
	}
	return c, nil
}

// Agent is an enrolled agent. Create it with New and start it with Run.
type Agent struct {
	cfg       Config
	log       *slog.Logger
	key       ed25519.PrivateKey
	enr       enrollment
	brokerURL *url.URL
	transport http.RoundTripper
	client    *client.Client
	running   atomic.Bool

	// grantWG joins every grant goroutine.
	grantWG sync.WaitGroup

	mu         sync.Mutex
	grants     map[string]*grant     // guarded by mu; live or activating grants
	ended      map[string]endedGrant // guarded by mu; requests that will get no tunnel
	endedOrder []string              // guarded by mu; FIFO of ended keys, for eviction
	changed    chan struct{}         // guarded by mu; closed and replaced on every change
}

// endedGrant is why a request has no tunnel and never will.
type endedGrant struct {
	state, reason string
}

// New loads the enrolled state from cfg.StateDir.
func New(cfg Config) (*Agent, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	enr, err := loadEnrollment(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	u, err := parseBrokerURL(enr.BrokerURL)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	key, err := devicekey.LoadOrCreate(filepath.Join(cfg.StateDir, deviceKeyFile))
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	hc, err := client.DeviceHTTPClient(filepath.Join(cfg.StateDir, brokerCAFile), key)
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	return &Agent{
		cfg:       cfg,
		log:       cfg.Logger,
		key:       key,
		enr:       enr,
		brokerURL: u,
		transport: hc.Transport,
		client:    client.New(enr.BrokerURL, hc),
		grants:    make(map[string]*grant),
		ended:     make(map[string]endedGrant),
		changed:   make(chan struct{}),
	}, nil
}

// parseBrokerURL accepts an https URL without query or fragment.
func parseBrokerURL(s string) (*url.URL, error) {
	u, err := url.Parse(s)
	if err != nil {
		return nil, fmt.Errorf("broker URL %q: %w", s, err)
	}
	if u.Scheme != "https" || u.Host == "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, fmt.Errorf("broker URL %q: want https://host[:port]", s)
	}
	return u, nil
}

// Run serves the local API on <state>/agent.sock, reports posture, follows
// the device's events and keeps each grant's tunnel up while the grant
// lasts. It returns when ctx is done, after every tunnel is closed and its
// key files deleted; the error is nil then. It fails early when the local
// API socket cannot be opened. Run may be called once.
func (a *Agent) Run(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return errors.New("agent: Run called twice")
	}
	// Lock the state dir itself (a socket or lock file could be deleted),
	// then take the socket: while another agent serves this state dir,
	// its grant files must stay.
	lock, err := lockDir(a.cfg.StateDir)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	defer lock.Close()
	sock := SocketPath(a.cfg.StateDir)
	ln, err := localapi.ListenUnix(sock)
	if err != nil {
		return fmt.Errorf("agent: %w", err)
	}
	if err := a.removeGrantFiles(); err != nil {
		ln.Close()
		return fmt.Errorf("agent: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	srv := localapi.New(localapi.Config{
		BrokerURL: a.brokerURL,
		Transport: a.transport,
		Status:    a.Status,
		Wait:      a.Wait,
		Probe:     a.probeWithin,
		Logger:    a.log.With("component", "localapi"),
	})
	var (
		wg     sync.WaitGroup
		srvErr error
	)
	wg.Go(func() {
		if err := srv.Serve(ctx, ln); err != nil {
			srvErr = err
			cancel()
		}
	})
	wg.Go(func() { a.postureLoop(ctx) })
	wg.Go(func() { a.eventLoop(ctx) })
	a.log.Info("agent running", "device", a.enr.DeviceID, "user", a.enr.User, "broker", a.enr.BrokerURL, "socket", sock)

	<-ctx.Done()
	wg.Wait()
	a.grantWG.Wait()
	a.log.Info("agent stopped")
	if srvErr != nil {
		return fmt.Errorf("agent: %w", srvErr)
	}
	return nil
}

// removeGrantFiles deletes grant key files a crashed agent left behind.
func (a *Agent) removeGrantFiles() error {
	dir := filepath.Join(a.cfg.StateDir, grantsDir)
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("removing stale grant files: %w", err)
	}
	return nil
}

// Status reports the agent's device, user, broker and live tunnels.
func (a *Agent) Status() wire.LocalStatus {
	a.mu.Lock()
	tunnels := make([]wire.Tunnel, 0, len(a.grants))
	for _, g := range a.grants {
		if g.up {
			tunnels = append(tunnels, g.info)
		}
	}
	a.mu.Unlock()
	sort.Slice(tunnels, func(i, j int) bool { return tunnels[i].Request < tunnels[j].Request })
	return wire.LocalStatus{Device: a.enr.DeviceID, User: a.enr.User, Broker: a.enr.BrokerURL, Tunnels: tunnels}
}

// postureLoop reports posture now and every PostureEvery; a failed report is
// retried sooner, with backoff.
func (a *Agent) postureLoop(ctx context.Context) {
	var bo backoff
	for {
		next := a.cfg.PostureEvery
		if err := sendPosture(ctx, a.client, a.cfg.Collector, a.key, a.enr.DeviceID); err != nil {
			if ctx.Err() != nil {
				return
			}
			next = min(next, bo.next())
			a.log.Warn("posture report failed", "err", err, "retry_in", next.Round(time.Millisecond))
		} else {
			bo.reset()
			a.log.Debug("posture report accepted")
		}
		if !sleep(ctx, next) {
			return
		}
	}
}

// sendPosture collects, signs and submits one posture report answering a
// fresh broker nonce.
func sendPosture(ctx context.Context, c *client.Client, col Collector, key ed25519.PrivateKey, deviceID string) error {
	ctx, cancel := context.WithTimeout(ctx, callTimeout)
	defer cancel()
	n, err := c.PostureNonce(ctx)
	if err != nil {
		return fmt.Errorf("getting posture nonce: %w", err)
	}
	r, err := col.Collect(ctx)
	if err != nil {
		return fmt.Errorf("collecting posture: %w", err)
	}
	r.Device = deviceID
	r.Nonce = n.Nonce
	s, err := posture.Sign(key, r)
	if err != nil {
		return fmt.Errorf("signing posture report: %w", err)
	}
	res, err := c.SubmitPosture(ctx, wire.PostureSubmit{Report: s.Report, Signature: s.Signature})
	if err != nil {
		return fmt.Errorf("submitting posture report: %w", err)
	}
	if !res.Accepted {
		return errors.New("broker did not accept the posture report")
	}
	return nil
}

// eventLoop long-polls the device's events and acts on them, reconnecting
// with backoff while the broker is unreachable.
func (a *Agent) eventLoop(ctx context.Context) {
	var (
		after int64
		bo    backoff
	)
	for ctx.Err() == nil {
		cctx, cancel := context.WithTimeout(ctx, eventWait+callTimeout)
		evs, err := a.client.Events(cctx, after, eventWait)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return
			}
			d := bo.next()
			a.log.Warn("broker events unavailable; retrying", "err", err, "retry_in", d.Round(time.Millisecond))
			sleep(ctx, d)
			continue
		}
		bo.reset()
		a.handleEvents(ctx, evs.Events)
		next := evs.Next
		for _, e := range evs.Events {
			next = max(next, e.Seq)
		}
		after = max(after, next)
	}
}

// handleEvents acts on one batch of events in order. A grant issued and
// ended in the same batch is never activated.
func (a *Agent) handleEvents(ctx context.Context, events []wire.Event) {
	endedInBatch := make(map[string]bool)
	for _, e := range events {
		if e.Type == wire.EventGrantEnded || e.Type == wire.EventRequestClosed {
			endedInBatch[e.Request] = true
		}
	}
	for _, e := range events {
		log := a.log.With("seq", e.Seq, "type", e.Type, "request", e.Request)
		switch e.Type {
		case wire.EventGrantIssued, wire.EventGrantEnded, wire.EventRequestClosed:
			if !validRequestID(e.Request) {
				log.Warn("ignoring event with an invalid request ID")
				continue
			}
		}
		switch e.Type {
		case wire.EventGrantIssued:
			if endedInBatch[e.Request] {
				log.Debug("grant already ended; not activating")
				continue
			}
			a.startGrant(ctx, e.Request)
		case wire.EventGrantEnded:
			a.endGrant(e.Request, "ended", e.Reason)
		case wire.EventRequestClosed:
			a.endGrant(e.Request, "closed", e.Reason)
		case wire.EventDeviceConfirmed:
			log.Debug("device confirmed")
		default:
			log.Debug("ignoring unknown event")
		}
	}
}

// Wait blocks until the tunnel of requestID is up and returns it. It
// returns a *localapi.RefusedError when the request was denied, expired or
// cancelled, or its grant ended or failed; a *client.APIError when the
// broker does not know the request; or ctx's error.
func (a *Agent) Wait(ctx context.Context, requestID string) (wire.Tunnel, error) {
	askedBroker := false
	for {
		a.mu.Lock()
		if g := a.grants[requestID]; g != nil && g.up {
			t := g.info
			a.mu.Unlock()
			return t, nil
		}
		if e, ok := a.ended[requestID]; ok {
			a.mu.Unlock()
			return wire.Tunnel{}, &localapi.RefusedError{Request: requestID, State: e.state, Reason: e.reason}
		}
		changed := a.changed
		a.mu.Unlock()

		if !askedBroker {
			askedBroker = true
			// The request may have been decided before the agent heard of
			// it, or may not exist: ask the broker once.
			cctx, cancel := context.WithTimeout(ctx, callTimeout)
			r, err := a.client.Request(cctx, requestID)
			cancel()
			var apiErr *client.APIError
			switch {
			case errors.As(err, &apiErr):
				return wire.Tunnel{}, err
			case err != nil && ctx.Err() != nil:
				return wire.Tunnel{}, ctx.Err()
			case err != nil:
				a.log.Warn("looking up request failed; waiting for events", "request", requestID, "err", err)
			case r.Device != "" && r.Device != a.enr.DeviceID:
				return wire.Tunnel{}, &localapi.RefusedError{Request: requestID, State: r.State, Reason: "the request belongs to another device"}
			case r.State != "pending" && r.State != "granted":
				return wire.Tunnel{}, &localapi.RefusedError{Request: requestID, State: r.State, Reason: r.EndReason}
			}
			continue
		}
		select {
		case <-changed:
		case <-ctx.Done():
			return wire.Tunnel{}, ctx.Err()
		}
	}
}

// notifyLocked wakes every Wait. a.mu must be held.
func (a *Agent) notifyLocked() {
	close(a.changed)
	a.changed = make(chan struct{})
}

// recordEndedLocked remembers that id will get no tunnel. a.mu must be held.
func (a *Agent) recordEndedLocked(id, state, reason string) {
	if _, ok := a.ended[id]; !ok {
		a.endedOrder = append(a.endedOrder, id)
		if len(a.endedOrder) > maxEnded {
			delete(a.ended, a.endedOrder[0])
			a.endedOrder = a.endedOrder[1:]
		}
	}
	a.ended[id] = endedGrant{state: state, reason: reason}
	a.notifyLocked()
}

// lockDir takes an exclusive, non-blocking flock on dir, held until the
// returned file is closed.
func lockDir(dir string) (*os.File, error) {
	f, err := os.Open(dir)
	if err != nil {
		return nil, fmt.Errorf("opening state dir for locking: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, fmt.Errorf("state dir %s is in use by another pinhole-agent", dir)
		}
		return nil, fmt.Errorf("locking state dir: %w", err)
	}
	return f, nil
}
