// Package wire holds the JSON types exchanged by the broker, the agent and the
// CLI, and the paths of the broker's API. It has no logic: every type here is a
// stored or transmitted format, so fields are only ever added, never renamed.
//
// Authentication: every /v1/ call except GET /v1/ca is made over TLS with the
// device's Ed25519 key as a self-signed client certificate (package
// devicekey). The broker maps that key to an enrolled device and its user.
// The CLI reaches the broker through the agent's local API, which forwards
// /v1/ calls with the device identity.
package wire

import (
	"encoding/json"
	"time"
)

// API paths served by the broker over TLS. {id} is a path parameter.
const (
	PathCA            = "/v1/ca"                   // GET: CA public keys (no auth)
	PathEnroll        = "/v1/enroll"               // POST EnrollRequest -> EnrollResponse
	PathDevice        = "/v1/device"               // GET -> Device (the calling device)
	PathPostureNonce  = "/v1/posture/nonce"        // POST -> PostureNonce
	PathPosture       = "/v1/posture"              // POST PostureSubmit -> PostureResult
	PathRequests      = "/v1/requests"             // POST CreateRequest -> Request
	PathRequest       = "/v1/requests/{id}"        // GET -> Request
	PathEvents        = "/v1/events"               // GET ?after=SEQ&wait=25s -> Events (long-poll, device scoped)
	PathActivate      = "/v1/grants/{id}/activate" // POST ActivateRequest -> Activation
	PathRevoke        = "/v1/grants/{id}/revoke"   // POST RevokeRequest -> Request
	PathAdminUsers    = "/v1/admin/users"          // POST InviteUser -> Invite with ConfirmURL (admin role)
	PathAuditEvents   = "/v1/audit/events"         // GET ?after=SEQ&limit=N -> AuditPage (admin role)
	PathAuditCheckpt  = "/v1/audit/checkpoint"     // GET -> Checkpoint, the newest signed one (admin role)
	PathRecordings    = "/v1/recordings"           // GET -> []Recording
	PathRecordingData = "/v1/recordings/{id}/cast" // GET -> asciicast v2 bytes
	PathHealth        = "/healthz"                 // GET -> "ok"
	MaxBodyBytes      = 64 << 10                   // every JSON request body is refused above this
)

// Error is the body of every non-2xx API answer.
type Error struct {
	Error string `json:"error"` // human-readable, specific
	Code  string `json:"code"`  // stable machine code, e.g. "bad_request", "forbidden", "not_found", "conflict", "policy"
}

// CA lists the broker's SSH certificate authorities (authorized_keys lines).
type CA struct {
	UserCAKeys []string `json:"user_ca_keys"`
	HostCAKeys []string `json:"host_ca_keys"`
	// AuditKeys are the base64 Ed25519 keys that sign audit checkpoints.
	AuditKeys []string `json:"audit_keys,omitempty"`
}

// Checkpoint is a signed audit checkpoint (package audit's Checkpoint).
type Checkpoint struct {
	Seq       int64     `json:"seq"`
	Hash      string    `json:"hash"`
	Time      time.Time `json:"time"`
	KeyID     string    `json:"key_id"`
	Signature []byte    `json:"signature"`
}

// EnrollRequest asks the broker to enroll the calling device (its key is the
// TLS client certificate's) for User.
type EnrollRequest struct {
	User     string `json:"user"`
	Hostname string `json:"hostname"`
}

// EnrollResponse says where the user confirms the enrollment.
type EnrollResponse struct {
	DeviceID   string    `json:"device_id"`
	ConfirmURL string    `json:"confirm_url"`
	ExpiresAt  time.Time `json:"expires_at"`
}

// Device describes an enrolled device.
type Device struct {
	ID          string    `json:"id"`
	User        string    `json:"user"`
	Hostname    string    `json:"hostname"`
	State       string    `json:"state"` // "pending", "active", "disabled"
	Fingerprint string    `json:"fingerprint"`
	CreatedAt   time.Time `json:"created_at"`
	PostureAt   time.Time `json:"posture_at,omitzero"`
}

// PostureNonce is a single-use nonce the next posture report must carry.
type PostureNonce struct {
	Nonce     string    `json:"nonce"`
	ExpiresAt time.Time `json:"expires_at"`
}

// PostureSubmit carries a signed posture report (package posture's Signed).
type PostureSubmit struct {
	Report    []byte `json:"report"`
	Signature []byte `json:"signature"`
}

// PostureResult acknowledges an accepted report.
type PostureResult struct {
	Accepted    bool      `json:"accepted"`
	CollectedAt time.Time `json:"collected_at"`
}

// CreateRequest asks for access to one target for TTL (a Go duration, "45m").
type CreateRequest struct {
	Target string `json:"target"`
	TTL    string `json:"ttl"`
	Reason string `json:"reason"`
}

// Approval is one recorded approval.
type Approval struct {
	Approver string    `json:"approver"`
	At       time.Time `json:"at"`
}

// Request is an access request and, once granted, its grant.
type Request struct {
	ID                string     `json:"id"`
	Requester         string     `json:"requester"`
	Device            string     `json:"device"`
	Target            string     `json:"target"`
	Reason            string     `json:"reason"`
	TTL               string     `json:"ttl"`
	State             string     `json:"state"` // "pending", "granted", "denied", "expired", "ended", "cancelled"
	CreatedAt         time.Time  `json:"created_at"`
	PendingUntil      time.Time  `json:"pending_until"`
	RequiredApprovals int        `json:"required_approvals"`
	Approvals         []Approval `json:"approvals"`
	GrantedAt         time.Time  `json:"granted_at,omitzero"`
	GrantEnds         time.Time  `json:"grant_ends,omitzero"`
	EndedAt           time.Time  `json:"ended_at,omitzero"`
	EndReason         string     `json:"end_reason,omitempty"`
}

// Device event types delivered on PathEvents.
const (
	EventDeviceConfirmed = "device.confirmed"
	EventGrantIssued     = "grant.issued"
	EventGrantEnded      = "grant.ended"
	EventRequestClosed   = "request.closed" // denied, expired or cancelled before a grant
)

// Event is one device-scoped notification.
type Event struct {
	Seq     int64     `json:"seq"`
	Type    string    `json:"type"`
	Request string    `json:"request,omitempty"`
	Reason  string    `json:"reason,omitempty"`
	Time    time.Time `json:"time"`
}

// Events is one long-poll answer; Next is the "after" of the next call.
type Events struct {
	Events []Event `json:"events"`
	Next   int64   `json:"next"`
}

// ActivateRequest carries the public halves of the per-grant keys the agent made.
type ActivateRequest struct {
	WireGuardPublicKey string `json:"wireguard_public_key"` // base64
	SSHPublicKey       string `json:"ssh_public_key"`       // authorized_keys line
}

// Activation is everything the agent needs to bring one grant's tunnel up.
type Activation struct {
	Request          string    `json:"request"`
	Target           string    `json:"target"`
	Protocol         string    `json:"protocol"` // "ssh" or "tcp"
	Login            string    `json:"login,omitempty"`
	TunnelAddress    string    `json:"tunnel_address"`     // the agent's address inside the tunnel
	GatewayPublicKey string    `json:"gateway_public_key"` // base64
	GatewayEndpoint  string    `json:"gateway_endpoint"`   // UDP host:port
	Destination      string    `json:"destination"`        // tunnel ip:port; AllowedIPs is its /32
	SSHCertificate   string    `json:"ssh_certificate,omitempty"`
	HostCAKeys       []string  `json:"host_ca_keys,omitempty"`
	HostKeyAlias     string    `json:"host_key_alias,omitempty"`
	ExpiresAt        time.Time `json:"expires_at"`
}

// RevokeRequest ends a grant (or cancels a pending request) early.
type RevokeRequest struct {
	Reason string `json:"reason"`
}

// InviteUser creates a user and an invite link.
type InviteUser struct {
	Name string `json:"name"`
	Role string `json:"role"`
}

// Invite is a one-time registration link, or, for an admin's request, the
// link the admin confirms it with first.
type Invite struct {
	User string `json:"user"`
	// URL is the invitee's registration link; empty until confirmed.
	URL string `json:"url,omitempty"`
	// ConfirmURL is where the admin confirms the invite with their security
	// key; that page then shows URL. Empty once confirmed.
	ConfirmURL string    `json:"confirm_url,omitempty"`
	ExpiresAt  time.Time `json:"expires_at"`
}

// AuditPage is a page of audit events (package audit's Event encoding).
type AuditPage struct {
	Events []json.RawMessage `json:"events"`
	Next   int64             `json:"next"`
	More   bool              `json:"more"`
}

// Recording describes one recorded session.
type Recording struct {
	ID      string    `json:"id"`
	Request string    `json:"request"`
	User    string    `json:"user"`
	Target  string    `json:"target"`
	Kind    string    `json:"kind"`
	Started time.Time `json:"started"`
	Ended   time.Time `json:"ended,omitzero"`
	SHA256  string    `json:"sha256,omitempty"`
	Size    int64     `json:"size"`
}

// Local API of the agent (unix socket), used by the CLI. /v1/ paths are
// forwarded to the broker with the device identity.
const (
	PathLocalStatus = "/local/status" // GET -> LocalStatus
	PathLocalWait   = "/local/wait"   // GET ?request=ID&timeout=60s -> Tunnel once up, or Error
	PathLocalProbe  = "/local/probe"  // GET ?target=NAME&port=N&timeout=3s -> LocalProbe, or Error (404: no live tunnel)
)

// LocalStatus is the agent's view of itself.
type LocalStatus struct {
	Device  string   `json:"device"`
	User    string   `json:"user"`
	Broker  string   `json:"broker"`
	Tunnels []Tunnel `json:"tunnels"`
}

// Tunnel is one live tunnel of the agent.
type Tunnel struct {
	Request        string    `json:"request"`
	Target         string    `json:"target"`
	Protocol       string    `json:"protocol"`
	Login          string    `json:"login,omitempty"`
	Local          string    `json:"local"` // 127.0.0.1:PORT
	ExpiresAt      time.Time `json:"expires_at"`
	KeyFile        string    `json:"key_file,omitempty"`
	CertFile       string    `json:"cert_file,omitempty"`
	KnownHostsFile string    `json:"known_hosts_file,omitempty"`
	HostKeyAlias   string    `json:"host_key_alias,omitempty"`
}

// Values of LocalProbe.Error the CLI branches on; any other non-empty value
// is a human-readable description of the failure.
const (
	// ProbeRefused: the gateway refused the connection (TCP RST), which it
	// does for every port the grant does not cover.
	ProbeRefused = "connection refused"
	// ProbeTimedOut: no answer came through the tunnel before the timeout.
	ProbeTimedOut = "timed out"
)

// LocalProbe is the outcome of one TCP connection attempt through a live
// tunnel. The connection is closed at once; no data is sent.
type LocalProbe struct {
	Target      string `json:"target"`
	Destination string `json:"destination"` // the tunnel ip:port dialed
	Port        int    `json:"port"`
	Connected   bool   `json:"connected"`
	Error       string `json:"error,omitempty"` // ProbeRefused, ProbeTimedOut or a description; empty when Connected
}
