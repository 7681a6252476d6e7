// Package service holds the broker's use cases: invite, enroll, posture,
// request, approve, deny, activate, authorize flows, expire and revoke. Every
// use case runs in one store transaction and writes its audit event in that
// same transaction; effects on the data plane (gateway peers, proxy
// sessions) happen after commit, ordered so that nothing outlives its grant.
package service

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/fido"
	"github.com/pinhole-dev/pinhole/internal/policy"
	"github.com/pinhole-dev/pinhole/internal/recording"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
)

// Gateway is the part of the data plane the service drives.
type Gateway interface {
	AddPeer(pub wgkey.Public, addr netip.Addr) error
	RemovePeer(pub wgkey.Public) error
	CloseFlows(addr netip.Addr) int
	PublicKey() wgkey.Public
}

// SessionCutter ends live proxied sessions of a grant with a reason.
type SessionCutter interface {
	EndGrant(grantID, reason string) int
}

// Notifier delivers grant links to approvers.
type Notifier interface {
	NotifyApprover(ctx context.Context, n ApprovalNotice) error
}

// ApprovalNotice is what an approver is told about a new request.
type ApprovalNotice struct {
	Approver  string    `json:"approver"`
	Request   string    `json:"request"`
	Requester string    `json:"requester"`
	Target    string    `json:"target"`
	Reason    string    `json:"reason"`
	TTL       string    `json:"ttl"`
	URL       string    `json:"url"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Config wires a Service. Every field is required unless it says otherwise.
type Config struct {
	Store  store.Store
	Policy *atomic.Pointer[policy.Config] // current rules; swapped on reload
	FIDO   *fido.FIDO
	// ClientCA signs the per-grant certificates workstations present to the
	// recording SSH proxy. Only the proxy trusts it: targets trust the
	// broker's user CA, which signs the proxy's own upstream certificates,
	// so a workstation's certificate can never log into a target directly,
	// around the recording.
	ClientCA ssh.Signer
	HostCA   ssh.Signer
	// PublicURL is the broker's https base URL used in links.
	PublicURL string
	// GatewayEndpoint is the UDP host:port agents send WireGuard to.
	GatewayEndpoint string
	// TunnelPrefix is where agent tunnel addresses are allocated; empty means 100.96.0.0/16.
	TunnelPrefix netip.Prefix
	// Notifier is optional; nil means links are only logged.
	Notifier Notifier
	// Clock is optional; nil means time.Now.
	Clock func() time.Time
	// Rand is optional; nil means crypto/rand.
	Rand   io.Reader
	Logger *slog.Logger
	// Recordings is where session recordings are written.
	Recordings *recording.FileStore
	// AuditKey signs audit checkpoints; nil means no checkpoints.
	AuditKey ed25519.PrivateKey
	// Witness, when set, receives every checkpoint outside the store.
	Witness Witness
	// CheckpointEvery is how often the chain head is checkpointed; 0 means 10s.
	CheckpointEvery time.Duration
	// InviteTTL is how long invite and device-confirmation links live; 0 means 24h / 15m.
	InviteTTL time.Duration
}

// Witness keeps checkpoints where the broker's own admin cannot rewrite
// them (an append-only file on another system, a log collector).
type Witness interface {
	Witness(ctx context.Context, cp audit.Checkpoint) error
}

// Service implements the use cases.
type Service struct {
	cfg   Config
	log   *slog.Logger
	now   func() time.Time
	rand  io.Reader
	hub   hub
	wake  chan struct{} // pokes the expiry loop
	gwMu  sync.Mutex
	gw    Gateway
	cut   SessionCutter
	flows flowTable
	// witnessed is the seq of the newest checkpoint the witness took.
	witnessed atomic.Int64
	// activateMu serializes activations (key checks against live grants).
	activateMu sync.Mutex
	// planeMu orders data-plane changes of a grant (peer in, peer out) so an
	// activation racing an expiry cannot leave a peer behind.
	planeMu sync.Mutex
	// bg runs the data-plane cuts of expired grants and the slow part of
	// grant-link delivery (a webhook); Run waits for it on exit.
	bg background
}

// New validates cfg and returns a Service. Attach the data plane with
// SetDataPlane before Restore and Run.
func New(cfg Config) (*Service, error) {
	if cfg.Store == nil || cfg.Policy == nil || cfg.Policy.Load() == nil || cfg.FIDO == nil || cfg.ClientCA == nil || cfg.HostCA == nil {
		return nil, fmt.Errorf("service: store, policy, fido and both CAs are required")
	}
	if cfg.PublicURL == "" {
		return nil, fmt.Errorf("service: public URL is required")
	}
	if !cfg.TunnelPrefix.IsValid() {
		cfg.TunnelPrefix = netip.MustParsePrefix("100.96.0.0/16")
	}
	if cfg.Clock == nil {
		cfg.Clock = time.Now
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Reader
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	if cfg.CheckpointEvery == 0 {
		cfg.CheckpointEvery = 10 * time.Second
	}
	if cfg.InviteTTL == 0 {
		cfg.InviteTTL = 24 * time.Hour
	}
	s := &Service{cfg: cfg, log: cfg.Logger, now: func() time.Time { return cfg.Clock().UTC() }, rand: cfg.Rand, wake: make(chan struct{}, 1)}
	s.hub.init()
	s.flows.init()
	return s, nil
}

// SetGatewayEndpoint sets the UDP host:port handed to agents.
func (s *Service) SetGatewayEndpoint(ep string) {
	s.gwMu.Lock()
	defer s.gwMu.Unlock()
	s.cfg.GatewayEndpoint = ep
}

// SetDataPlane attaches the gateway and the session cutter.
func (s *Service) SetDataPlane(gw Gateway, cut SessionCutter) {
	s.gwMu.Lock()
	defer s.gwMu.Unlock()
	s.gw, s.cut = gw, cut
}

func (s *Service) dataPlane() (Gateway, SessionCutter) {
	s.gwMu.Lock()
	defer s.gwMu.Unlock()
	return s.gw, s.cut
}

// Now is the service clock.
func (s *Service) Now() time.Time { return s.now() }

func (s *Service) policy() *policy.Config { return s.cfg.Policy.Load() }

// secret returns a fresh 256-bit token (base64url) and its stored hash.
func (s *Service) secret() (token, hash string, err error) {
	b := make([]byte, 32)
	if _, err := io.ReadFull(s.rand, b); err != nil {
		return "", "", fmt.Errorf("generating token: %w", err)
	}
	token = base64.RawURLEncoding.EncodeToString(b)
	return token, HashToken(token), nil
}

// HashToken is how a link token is stored and looked up.
func HashToken(token string) string {
	sum := sha256.Sum256([]byte(token))
	return hex.EncodeToString(sum[:])
}

// newID returns prefix + 16 random hex characters.
func (s *Service) newID(prefix string) (string, error) {
	b := make([]byte, 8)
	if _, err := io.ReadFull(s.rand, b); err != nil {
		return "", fmt.Errorf("generating id: %w", err)
	}
	return prefix + hex.EncodeToString(b), nil
}

// record appends an audit event inside tx.
func (s *Service) record(ctx context.Context, tx store.Tx, e audit.Event) error {
	if e.Time.IsZero() {
		e.Time = s.now()
	}
	if _, err := tx.AppendAudit(ctx, e); err != nil {
		return fmt.Errorf("writing audit event %s: %w", e.Type, err)
	}
	return nil
}

// Audit appends one event in its own transaction (for events with no other
// state change, such as a denied flow).
func (s *Service) Audit(ctx context.Context, e audit.Event) error {
	return s.cfg.Store.Update(ctx, func(tx store.Tx) error { return s.record(ctx, tx, e) })
}

func (s *Service) link(kind, token string) string {
	return s.cfg.PublicURL + "/" + kind + "/" + token
}

func (s *Service) gatewayEndpoint() string {
	s.gwMu.Lock()
	defer s.gwMu.Unlock()
	return s.cfg.GatewayEndpoint
}
