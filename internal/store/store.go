// Package store declares the persistence seam of the broker: the Store and Tx
// interfaces every backend implements, the records they keep and the sentinel
// errors callers branch on. A state change and its audit event are written in
// one Tx, so there is never a grant without its audit record.
package store

import (
	"context"
	"errors"
	"net/netip"
	"time"

	"github.com/pinhole-dev/pinhole/internal/access"
	"github.com/pinhole-dev/pinhole/internal/audit"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// Sentinel errors.
var (
	// ErrNotFound means the record does not exist.
	ErrNotFound = errors.New("not found")
	// ErrConflict means the write lost against the stored state (already
	// exists, already used, changed meanwhile).
	ErrConflict = errors.New("conflict")
)

// Store is a transactional broker store.
type Store interface {
	// Update runs fn in one read-write transaction; fn's error rolls it back.
	Update(ctx context.Context, fn func(Tx) error) error
	// View runs fn in a read transaction.
	View(ctx context.Context, fn func(Tx) error) error
	// Close releases the store.
	Close() error
}

// User is a person who may sign in with FIDO2 credentials.
type User struct {
	Name       string
	Role       string
	WebAuthnID []byte // random 32-byte user handle
	Disabled   bool
	CreatedAt  time.Time
}

// Credential is one registered WebAuthn credential.
type Credential struct {
	ID        []byte // credential ID
	User      string
	Data      []byte // the library's credential record (JSON), incl. public key and sign count
	CreatedAt time.Time
}

// Token kinds.
const (
	TokenInvite = "invite" // registers a user's first credential
	TokenDevice = "device" // confirms a device enrollment
	TokenGrant  = "grant"  // one approver's grant link for one request
	// TokenInviteConfirm is an admin's invite waiting for that admin's
	// security key: User is the invitee, Role their role, Device the
	// admin's device the invite was asked from.
	TokenInviteConfirm = "invite-confirm"
)

// Token is a single-use link. Only the SHA-256 of the secret is stored.
type Token struct {
	Hash      string // hex SHA-256 of the secret
	Kind      string
	User      string // invitee, device owner, or approver
	Device    string
	Request   string
	Role      string // the invitee's role (TokenInviteConfirm)
	CreatedAt time.Time
	ExpiresAt time.Time
	UsedAt    time.Time
}

// Ceremony is server-side WebAuthn session data between begin and finish.
type Ceremony struct {
	ID        string // token hash + purpose
	Data      []byte
	ViewHash  string // hash of the content an approval commits to
	ExpiresAt time.Time
}

// MaxNoncesPerDevice bounds the unused posture nonces kept per device, so a
// device asking for nonces it never uses cannot grow the store.
const MaxNoncesPerDevice = 8

// Device states.
const (
	DevicePending  = "pending"
	DeviceActive   = "active"
	DeviceDisabled = "disabled"
)

// Device is an enrolled workstation.
type Device struct {
	ID          string
	User        string
	Hostname    string
	PublicKey   []byte // Ed25519
	State       string
	CreatedAt   time.Time
	ConfirmedAt time.Time
}

// Posture is the newest accepted posture report of a device.
type Posture struct {
	Device      string
	CollectedAt time.Time
	ReceivedAt  time.Time
	Report      []byte // the signed JSON bytes
	Signature   []byte
}

// Activation records the data plane of one grant.
type Activation struct {
	Request     string
	Device      string
	TunnelAddr  netip.Addr
	WGPublicKey string // base64
	Destination netip.AddrPort
	CertSerial  uint64
	CreatedAt   time.Time
	Ended       bool
}

// Recording describes one recorded session.
type Recording = wire.Recording

// Tx is one transaction.
type Tx interface {
	CreateUser(ctx context.Context, u User) error
	User(ctx context.Context, name string) (User, error)
	UserByHandle(ctx context.Context, handle []byte) (User, error)
	UsersWithRole(ctx context.Context, role string) ([]User, error)

	AddCredential(ctx context.Context, c Credential) error
	UpdateCredential(ctx context.Context, c Credential) error
	Credentials(ctx context.Context, user string) ([]Credential, error)

	PutToken(ctx context.Context, t Token) error
	Token(ctx context.Context, hash string) (Token, error)
	// UseToken marks an unused token used; ErrConflict if it already was.
	UseToken(ctx context.Context, hash string, at time.Time) error

	PutCeremony(ctx context.Context, c Ceremony) error
	// TakeCeremony returns and deletes a ceremony (single use).
	TakeCeremony(ctx context.Context, id string) (Ceremony, error)

	CreateDevice(ctx context.Context, d Device) error
	UpdateDevice(ctx context.Context, d Device) error
	Device(ctx context.Context, id string) (Device, error)
	DeviceByKey(ctx context.Context, pub []byte) (Device, error)

	// PutNonce stores a posture nonce for device. A device keeps at most
	// MaxNoncesPerDevice unused nonces: storing one more drops those that
	// expire first.
	PutNonce(ctx context.Context, device, nonce string, expires time.Time) error
	// TakeNonce consumes an unexpired nonce of device; ErrNotFound otherwise.
	TakeNonce(ctx context.Context, device, nonce string, now time.Time) error
	PutPosture(ctx context.Context, p Posture) error
	Posture(ctx context.Context, device string) (Posture, error)

	CreateRequest(ctx context.Context, r access.Request) error
	UpdateRequest(ctx context.Context, r access.Request) error
	Request(ctx context.Context, id string) (access.Request, error)
	// OpenRequests returns pending and granted requests (the ones a clock can end).
	OpenRequests(ctx context.Context) ([]access.Request, error)
	// RequestsOfDevice returns pending and granted requests of one device.
	RequestsOfDevice(ctx context.Context, device string) ([]access.Request, error)

	// PutActivation creates or replaces the activation of a request.
	PutActivation(ctx context.Context, a Activation) error
	Activation(ctx context.Context, request string) (Activation, error)
	// LiveTunnelAddrs lists the tunnel addresses of activations not ended.
	LiveTunnelAddrs(ctx context.Context) ([]netip.Addr, error)
	EndActivation(ctx context.Context, request string) error

	// AppendDeviceEvent stores e for device and returns it with its Seq.
	AppendDeviceEvent(ctx context.Context, device string, e wire.Event) (wire.Event, error)
	DeviceEvents(ctx context.Context, device string, after int64, limit int) ([]wire.Event, error)

	// AppendAudit seals e onto the chain (Seq, PrevHash, Hash) and stores it.
	AppendAudit(ctx context.Context, e audit.Event) (audit.Event, error)
	AuditEvents(ctx context.Context, after int64, limit int) ([]audit.Event, error)
	// AuditHead returns the newest audit event; ErrNotFound when there is none.
	AuditHead(ctx context.Context) (audit.Event, error)
	// PutCheckpoint stores a signed checkpoint (one per seq).
	PutCheckpoint(ctx context.Context, cp audit.Checkpoint) error
	// LatestCheckpoint returns the checkpoint with the highest seq; ErrNotFound when there is none.
	LatestCheckpoint(ctx context.Context) (audit.Checkpoint, error)

	PutRecording(ctx context.Context, r Recording) error
	Recording(ctx context.Context, id string) (Recording, error)
	Recordings(ctx context.Context, limit int) ([]Recording, error)
}
