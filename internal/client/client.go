// Package client is the Go client of pinhole's broker API and of the agent's
// local API (package wire defines both). The agent talks to the broker over
// TLS with the device key as its client certificate (DeviceHTTPClient); the
// CLI talks to the agent over its unix socket (ForAgent), which forwards /v1/
// calls to the broker with the device identity.
//
// Every method maps a non-2xx answer to an *APIError carrying the server's
// message and code, and reads at most MaxResponseBytes of a JSON answer
// (MaxCastBytes of a recording).
package client

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/wire"
)

// Response size bounds.
const (
	// MaxResponseBytes bounds every JSON answer.
	MaxResponseBytes = 4 << 20
	// MaxCastBytes bounds a recording download.
	MaxCastBytes = 256 << 20
	// maxErrorBytes bounds how much of an error answer is read.
	maxErrorBytes = 64 << 10
)

// AgentBaseURL is the base URL used for the agent's local API; the host name
// is never resolved, every connection goes to the unix socket.
const AgentBaseURL = "http://pinhole-agent"

// ErrTooLarge is returned (wrapped) when an answer exceeds its size bound.
var ErrTooLarge = errors.New("response too large")

// APIError is a non-2xx answer from the broker or the agent.
type APIError struct {
	// Status is the HTTP status code.
	Status int
	// Code is the stable machine code of wire.Error ("forbidden", "policy",
	// ...), or "http_<status>" when the body was not a wire.Error.
	Code string
	// Message is the server's human-readable message.
	Message string
}

// Error returns the server's message.
func (e *APIError) Error() string { return e.Message }

// Client calls one API server. It is safe for concurrent use.
type Client struct {
	base string
	hc   *http.Client
}

// New returns a client of the server at baseURL (e.g. "https://broker:8443"),
// using hc (http.DefaultClient when nil). hc should have no overall Timeout:
// long-polls are bounded by their context.
func New(baseURL string, hc *http.Client) *Client {
	if hc == nil {
		hc = http.DefaultClient
	}
	return &Client{base: strings.TrimRight(baseURL, "/"), hc: hc}
}

// ForAgent returns a client of the agent's local API listening on the unix
// socket at socketPath. Broker calls made through it are forwarded by the
// agent.
func ForAgent(socketPath string) *Client {
	tr := &http.Transport{
		Proxy: nil, // never send the local API through a proxy
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socketPath)
		},
		MaxIdleConns:          4,
		IdleConnTimeout:       30 * time.Second,
		ResponseHeaderTimeout: 0, // /local/wait answers late by design
	}
	return New(AgentBaseURL, &http.Client{Transport: tr})
}

// DefaultStateDir returns the agent's state directory: $PINHOLE_STATE, or
// ~/.local/state/pinhole.
func DefaultStateDir() (string, error) {
	if d := os.Getenv("PINHOLE_STATE"); d != "" {
		return d, nil
	}
	home, err := os.UserHomeDir()
	if err != nil {
		return "", fmt.Errorf("finding the state directory (set PINHOLE_STATE): %w", err)
	}
	return filepath.Join(home, ".local", "state", "pinhole"), nil
}

// DefaultAgentSocket returns the agent's socket path: $PINHOLE_AGENT_SOCKET,
// or agent.sock in DefaultStateDir.
func DefaultAgentSocket() (string, error) {
	if s := os.Getenv("PINHOLE_AGENT_SOCKET"); s != "" {
		return s, nil
	}
	d, err := DefaultStateDir()
	if err != nil {
		return "", err
	}
	return filepath.Join(d, "agent.sock"), nil
}

// CA returns the broker's SSH certificate authorities.
func (c *Client) CA(ctx context.Context) (wire.CA, error) {
	var out wire.CA
	return out, c.do(ctx, http.MethodGet, wire.PathCA, nil, nil, &out)
}

// Enroll asks the broker to enroll the calling device.
func (c *Client) Enroll(ctx context.Context, req wire.EnrollRequest) (wire.EnrollResponse, error) {
	var out wire.EnrollResponse
	return out, c.do(ctx, http.MethodPost, wire.PathEnroll, nil, req, &out)
}

// Device describes the calling device.
func (c *Client) Device(ctx context.Context) (wire.Device, error) {
	var out wire.Device
	return out, c.do(ctx, http.MethodGet, wire.PathDevice, nil, nil, &out)
}

// PostureNonce fetches a single-use nonce for the next posture report.
func (c *Client) PostureNonce(ctx context.Context) (wire.PostureNonce, error) {
	var out wire.PostureNonce
	return out, c.do(ctx, http.MethodPost, wire.PathPostureNonce, nil, struct{}{}, &out)
}

// SubmitPosture sends a signed posture report.
func (c *Client) SubmitPosture(ctx context.Context, s wire.PostureSubmit) (wire.PostureResult, error) {
	var out wire.PostureResult
	return out, c.do(ctx, http.MethodPost, wire.PathPosture, nil, s, &out)
}

// CreateRequest asks for access to a target.
func (c *Client) CreateRequest(ctx context.Context, req wire.CreateRequest) (wire.Request, error) {
	var out wire.Request
	return out, c.do(ctx, http.MethodPost, wire.PathRequests, nil, req, &out)
}

// Request returns one access request.
func (c *Client) Request(ctx context.Context, id string) (wire.Request, error) {
	var out wire.Request
	return out, c.do(ctx, http.MethodGet, withID(wire.PathRequest, id), nil, nil, &out)
}

// Events long-polls the calling device's events after seq after, waiting at
// most wait (server-side) for one to arrive.
func (c *Client) Events(ctx context.Context, after int64, wait time.Duration) (wire.Events, error) {
	q := url.Values{}
	q.Set("after", strconv.FormatInt(after, 10))
	if wait > 0 {
		q.Set("wait", wait.String())
	}
	var out wire.Events
	return out, c.do(ctx, http.MethodGet, wire.PathEvents, q, nil, &out)
}

// Activate sends the public halves of a grant's fresh keys and returns the
// tunnel configuration. The grant ID is the request ID.
func (c *Client) Activate(ctx context.Context, grantID string, req wire.ActivateRequest) (wire.Activation, error) {
	var out wire.Activation
	return out, c.do(ctx, http.MethodPost, withID(wire.PathActivate, grantID), nil, req, &out)
}

// Revoke ends a grant, or cancels a pending request, early.
func (c *Client) Revoke(ctx context.Context, id string, req wire.RevokeRequest) (wire.Request, error) {
	var out wire.Request
	return out, c.do(ctx, http.MethodPost, withID(wire.PathRevoke, id), nil, req, &out)
}

// InviteUser creates a user and returns its one-time invite link.
func (c *Client) InviteUser(ctx context.Context, req wire.InviteUser) (wire.Invite, error) {
	var out wire.Invite
	return out, c.do(ctx, http.MethodPost, wire.PathAdminUsers, nil, req, &out)
}

// AuditEvents returns a page of at most limit audit events after seq after
// (limit <= 0 lets the broker choose).
func (c *Client) AuditEvents(ctx context.Context, after int64, limit int) (wire.AuditPage, error) {
	q := url.Values{}
	q.Set("after", strconv.FormatInt(after, 10))
	if limit > 0 {
		q.Set("limit", strconv.Itoa(limit))
	}
	var out wire.AuditPage
	return out, c.do(ctx, http.MethodGet, wire.PathAuditEvents, q, nil, &out)
}

// AuditCheckpoint fetches the newest signed audit checkpoint.
func (c *Client) AuditCheckpoint(ctx context.Context) (wire.Checkpoint, error) {
	var out wire.Checkpoint
	return out, c.do(ctx, http.MethodGet, wire.PathAuditCheckpt, nil, nil, &out)
}

// Recordings lists recorded sessions.
func (c *Client) Recordings(ctx context.Context) ([]wire.Recording, error) {
	var out []wire.Recording
	return out, c.do(ctx, http.MethodGet, wire.PathRecordings, nil, nil, &out)
}

// RecordingCast downloads a recording's asciicast v2 bytes. The caller must
// close the reader; reading past MaxCastBytes fails with ErrTooLarge.
func (c *Client) RecordingCast(ctx context.Context, id string) (io.ReadCloser, error) {
	resp, err := c.send(ctx, http.MethodGet, withID(wire.PathRecordingData, id), nil, nil)
	if err != nil {
		return nil, err
	}
	if resp.ContentLength > MaxCastBytes {
		resp.Body.Close()
		return nil, fmt.Errorf("recording %s: %w (%d bytes, max %d)", id, ErrTooLarge, resp.ContentLength, MaxCastBytes)
	}
	return &boundedBody{rc: resp.Body, left: MaxCastBytes, max: MaxCastBytes}, nil
}

// LocalStatus returns the agent's view of itself.
func (c *Client) LocalStatus(ctx context.Context) (wire.LocalStatus, error) {
	var out wire.LocalStatus
	return out, c.do(ctx, http.MethodGet, wire.PathLocalStatus, nil, nil, &out)
}

// LocalWait waits up to timeout (the agent caps it) for the tunnel of
// requestID to be up. A denied, expired or ended request is an *APIError
// whose message is the broker's reason.
func (c *Client) LocalWait(ctx context.Context, requestID string, timeout time.Duration) (wire.Tunnel, error) {
	q := url.Values{}
	q.Set("request", requestID)
	if timeout > 0 {
		q.Set("timeout", timeout.String())
	}
	var out wire.Tunnel
	return out, c.do(ctx, http.MethodGet, wire.PathLocalWait, q, nil, &out)
}

// LocalProbe asks the agent to open one TCP connection through the live
// tunnel of target to the grant's destination address and port (0 means the
// granted port), waiting up to timeout (0 means the agent's default; the
// agent caps it). A refusal or a timeout is an answer (wire.LocalProbe with
// Error wire.ProbeRefused or wire.ProbeTimedOut), not an error; a target
// without a live tunnel is an *APIError with Status 404.
func (c *Client) LocalProbe(ctx context.Context, target string, port int, timeout time.Duration) (wire.LocalProbe, error) {
	q := url.Values{}
	q.Set("target", target)
	if port != 0 {
		q.Set("port", strconv.Itoa(port))
	}
	if timeout > 0 {
		q.Set("timeout", timeout.String())
	}
	var out wire.LocalProbe
	return out, c.do(ctx, http.MethodGet, wire.PathLocalProbe, q, nil, &out)
}

// withID fills the {id} parameter of a wire path.
func withID(path, id string) string {
	return strings.Replace(path, "{id}", url.PathEscape(id), 1)
}

// do sends a JSON request and decodes a JSON answer into out.
func (c *Client) do(ctx context.Context, method, path string, q url.Values, in, out any) error {
	resp, err := c.send(ctx, method, path, q, in)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, MaxResponseBytes+1))
	if err != nil {
		return fmt.Errorf("%s %s: reading answer: %w", method, path, err)
	}
	if len(b) > MaxResponseBytes {
		return fmt.Errorf("%s %s: %w (more than %d bytes)", method, path, ErrTooLarge, MaxResponseBytes)
	}
	if err := json.Unmarshal(b, out); err != nil {
		return fmt.Errorf("%s %s: decoding answer: %w", method, path, err)
	}
	return nil
}

// send performs the request and returns a 2xx response or an error; a
// non-2xx answer becomes an *APIError.
func (c *Client) send(ctx context.Context, method, path string, q url.Values, in any) (*http.Response, error) {
	u := c.base + path
	if len(q) > 0 {
		u += "?" + q.Encode()
	}
	var body io.Reader
	if in != nil {
		b, err := json.Marshal(in)
		if err != nil {
			return nil, fmt.Errorf("%s %s: encoding request: %w", method, path, err)
		}
		body = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, u, body)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	req.Header.Set("Accept", "application/json")
	if in != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.hc.Do(req)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		defer resp.Body.Close()
		return nil, apiError(resp)
	}
	return resp, nil
}

// apiError turns a non-2xx answer into an *APIError.
func apiError(resp *http.Response) *APIError {
	b, _ := io.ReadAll(io.LimitReader(resp.Body, maxErrorBytes))
	e := &APIError{Status: resp.StatusCode}
	var we wire.Error
	if json.Unmarshal(b, &we) == nil && we.Error != "" {
		e.Code, e.Message = we.Code, we.Error
		if e.Code == "" {
			e.Code = "http_" + strconv.Itoa(resp.StatusCode)
		}
		return e
	}
	e.Code = "http_" + strconv.Itoa(resp.StatusCode)
	msg := strings.TrimSpace(string(b))
	if len(msg) > 200 {
		msg = msg[:200] + "…"
	}
	if msg == "" {
		msg = http.StatusText(resp.StatusCode)
	}
	e.Message = fmt.Sprintf("%s (HTTP %d)", msg, resp.StatusCode)
	return e
}

// boundedBody fails reads once more than left bytes have been read.
type boundedBody struct {
	rc   io.ReadCloser
	left int64
	max  int64
}

func (b *boundedBody) Read(p []byte) (int, error) {
	if b.left < 0 {
		return 0, fmt.Errorf("recording: %w (more than %d bytes)", ErrTooLarge, b.max)
	}
	if int64(len(p)) > b.left+1 {
		p = p[:b.left+1]
	}
	n, err := b.rc.Read(p)
	b.left -= int64(n)
	if b.left < 0 {
		return 0, fmt.Errorf("recording: %w (more than %d bytes)", ErrTooLarge, b.max)
	}
	return n, err
}

func (b *boundedBody) Close() error { return b.rc.Close() }
