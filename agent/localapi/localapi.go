// Package localapi serves the agent's local API on a unix socket: the CLI's
// only way in. It forwards /v1/ calls to the broker with the device's TLS
// identity, reports the agent's status, lets the CLI wait for a request's
// tunnel and probe a port through a live tunnel. Access control is the socket's file mode (0600, see ListenUnix):
// whoever can connect acts as the device.
//
// Routes (package wire): GET|POST /v1/... forwarded; GET /local/status;
// GET /local/wait?request=ID&timeout=60s (timeout at most MaxWait);
// GET /local/probe?target=NAME&port=N&timeout=3s (port optional, timeout at
// most MaxProbeTimeout). Only GET
// and POST are accepted, request bodies are bounded by wire.MaxBodyBytes, and
// every error is a wire.Error.
package localapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// Bounds of GET /local/wait.
const (
	// DefaultWait is the wait when the timeout parameter is absent.
	DefaultWait = 60 * time.Second
	// MaxWait is the longest timeout accepted.
	MaxWait = 10 * time.Minute
	// maxRequestIDLen bounds the request parameter.
	maxRequestIDLen = 128
	// DefaultProbeTimeout is the probe timeout when the parameter is absent.
	DefaultProbeTimeout = 3 * time.Second
	// MaxProbeTimeout is the longest probe timeout accepted.
	MaxProbeTimeout = 30 * time.Second
	// MaxTargetLen bounds the target parameter of GET /local/probe.
	MaxTargetLen = 64
	// shutdownGrace bounds how long Serve waits for handlers after ctx ends.
	shutdownGrace = 5 * time.Second
)

// Config configures a Server. Every nil field makes the routes that need it
// answer 503.
type Config struct {
	// BrokerURL is the broker's base URL; /v1/ calls are forwarded to it.
	BrokerURL *url.URL
	// Transport carries forwarded calls; it must present the device's TLS
	// client certificate (the transport of client.DeviceHTTPClient).
	Transport http.RoundTripper
	// Status reports the agent's status for GET /local/status.
	Status func() wire.LocalStatus
	// Wait blocks until the tunnel of a request is up and returns it, or
	// returns an error: a *RefusedError when the request will never get one,
	// a *client.APIError from the broker, or ctx's error.
	Wait func(ctx context.Context, requestID string) (wire.Tunnel, error)
	// Probe opens one TCP connection through the live tunnel of target to
	// the grant's destination address and port (0 means the granted port),
	// closes it at once and reports the outcome. ctx carries the deadline
	// of timeout. It returns an error wrapping ErrNoTunnel when target has
	// no live tunnel, or ctx's error when the caller went away; refusals and
	// timeouts are outcomes, not errors.
	Probe func(ctx context.Context, target string, port int, timeout time.Duration) (wire.LocalProbe, error)
	// Logger receives operational logs; nil discards them.
	Logger *slog.Logger
}

// ErrNoTunnel is wrapped by a Probe error when the target has no live tunnel.
var ErrNoTunnel = errors.New("no live tunnel")

// RefusedError says a request will never get a tunnel.
type RefusedError struct {
	// Request is the request ID.
	Request string
	// State is the request's final state: "denied", "expired",
	// "cancelled", "ended", ...
	State string
	// Reason is the broker's reason, if it gave one.
	Reason string
}

// Error describes the refusal with the broker's reason.
func (e *RefusedError) Error() string {
	var s string
	if e.State == "ended" {
		s = fmt.Sprintf("grant %s ended", e.Request)
	} else {
		s = fmt.Sprintf("request %s %s", e.Request, e.State)
	}
	if e.Reason != "" {
		s += ": " + e.Reason
	}
	return s
}

// Server is the agent's local API.
type Server struct {
	cfg     Config
	log     *slog.Logger
	proxy   http.Handler // nil when the broker is not configured
	handler http.Handler
}

// New returns a Server for cfg.
func New(cfg Config) *Server {
	s := &Server{cfg: cfg, log: cfg.Logger}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	if cfg.BrokerURL != nil && cfg.Transport != nil {
		base := cfg.BrokerURL
		s.proxy = &httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				pr.SetURL(base)
				pr.Out.Header.Del("Cookie")
				pr.Out.Header.Del("Authorization")
			},
			Transport: cfg.Transport,
			ErrorLog:  slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
			ErrorHandler: func(w http.ResponseWriter, r *http.Request, err error) {
				var mbe *http.MaxBytesError
				if errors.As(err, &mbe) {
					writeError(w, http.StatusRequestEntityTooLarge, "too_large", fmt.Sprintf("request body is larger than %d bytes", mbe.Limit))
					return
				}
				s.log.Warn("forwarding to broker failed", "path", r.URL.Path, "err", err)
				writeError(w, http.StatusBadGateway, "broker_unreachable", fmt.Sprintf("the agent cannot reach the broker: %v", err))
			},
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/v1/", s.forward)
	mux.HandleFunc(wire.PathLocalStatus, getOnly(s.status))
	mux.HandleFunc(wire.PathLocalWait, getOnly(s.wait))
	mux.HandleFunc(wire.PathLocalProbe, getOnly(s.probe))
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", fmt.Sprintf("no such path %s %s", r.Method, r.URL.Path))
	})
	s.handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet && r.Method != http.MethodPost {
			w.Header().Set("Allow", "GET, POST")
			writeError(w, http.StatusMethodNotAllowed, "method_not_allowed", fmt.Sprintf("method %s is not allowed", r.Method))
			return
		}
		r.Body = http.MaxBytesReader(w, r.Body, wire.MaxBodyBytes)
		mux.ServeHTTP(w, r)
	})
	return s
}

// Handler returns the API's HTTP handler (Serve uses it).
func (s *Server) Handler() http.Handler { return s.handler }

// Serve answers connections from ln until ctx is done, then shuts down:
// in-flight calls (whose contexts derive from ctx) get a few seconds to end.
// It closes ln and returns nil after a shutdown caused by ctx.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	srv := &http.Server{
		Handler:           s.handler,
		ReadHeaderTimeout: 10 * time.Second,
		IdleTimeout:       2 * time.Minute,
		MaxHeaderBytes:    64 << 10,
		BaseContext:       func(net.Listener) context.Context { return ctx },
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving local API: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), shutdownGrace)
	defer cancel()
	if err := srv.Shutdown(sctx); err != nil {
		srv.Close()
	}
	<-errc
	return nil
}

// getOnly refuses every method but GET.
func getOnly(h http.HandlerFunc) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodGet {
			w.Header().Set("Allow", "GET")
			writeError(w, http.StatusMethodNotAllowed, "method_not_allowed", fmt.Sprintf("method %s is not allowed on %s", r.Method, r.URL.Path))
			return
		}
		h(w, r)
	}
}

func (s *Server) forward(w http.ResponseWriter, r *http.Request) {
	if s.proxy == nil {
		writeError(w, http.StatusServiceUnavailable, "unavailable", "the agent has no broker configured")
		return
	}
	s.log.Debug("forwarding to broker", "method", r.Method, "path", r.URL.Path)
	s.proxy.ServeHTTP(w, r)
}

func (s *Server) status(w http.ResponseWriter, _ *http.Request) {
	if s.cfg.Status == nil {
		writeError(w, http.StatusServiceUnavailable, "unavailable", "the agent has no status")
		return
	}
	st := s.cfg.Status()
	if st.Tunnels == nil {
		st.Tunnels = []wire.Tunnel{}
	}
	writeJSON(w, http.StatusOK, st)
}

// parseWait validates the parameters of GET /local/wait.
func parseWait(q url.Values) (id string, timeout time.Duration, err error) {
	id = q.Get("request")
	if id == "" {
		return "", 0, errors.New("parameter request is required")
	}
	if len(id) > maxRequestIDLen || strings.ContainsFunc(id, func(r rune) bool { return r < 0x21 || r == 0x7f }) {
		return "", 0, errors.New("parameter request is not a request ID")
	}
	timeout = DefaultWait
	if t := q.Get("timeout"); t != "" {
		timeout, err = time.ParseDuration(t)
		if err != nil || timeout <= 0 || timeout > MaxWait {
			return "", 0, fmt.Errorf("parameter timeout must be a duration between 0 and %s, got %q", MaxWait, t)
		}
	}
	return id, timeout, nil
}

func (s *Server) wait(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Wait == nil {
		writeError(w, http.StatusServiceUnavailable, "unavailable", "the agent cannot wait for tunnels")
		return
	}
	id, timeout, err := parseWait(r.URL.Query())
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	t, err := s.cfg.Wait(ctx, id)
	if err == nil {
		writeJSON(w, http.StatusOK, t)
		return
	}
	var refused *RefusedError
	var apiErr *client.APIError
	switch {
	case errors.As(err, &refused):
		writeError(w, http.StatusConflict, "refused", refused.Error())
	case errors.As(err, &apiErr):
		writeError(w, apiErr.Status, apiErr.Code, apiErr.Message)
	case r.Context().Err() != nil:
		writeError(w, http.StatusServiceUnavailable, "unavailable", "the agent is shutting down")
	case ctx.Err() != nil:
		writeError(w, http.StatusGatewayTimeout, "timeout", fmt.Sprintf("request %s has no tunnel after %s", id, timeout))
	default:
		s.log.Warn("waiting for tunnel failed", "request", id, "err", err)
		writeError(w, http.StatusBadGateway, "unavailable", err.Error())
	}
}

// parseProbe validates the parameters of GET /local/probe. A port of 0
// means the parameter was absent.
func parseProbe(q url.Values) (target string, port int, timeout time.Duration, err error) {
	target = q.Get("target")
	if target == "" {
		return "", 0, 0, errors.New("parameter target is required")
	}
	if len(target) > MaxTargetLen || strings.ContainsFunc(target, func(r rune) bool { return r < 0x21 || r == 0x7f }) {
		return "", 0, 0, fmt.Errorf("parameter target is not a target name (at most %d printable characters)", MaxTargetLen)
	}
	if p := q.Get("port"); p != "" {
		n, perr := strconv.ParseUint(p, 10, 16)
		if perr != nil || n == 0 {
			return "", 0, 0, fmt.Errorf("parameter port must be a number between 1 and 65535, got %q", p)
		}
		port = int(n)
	}
	timeout = DefaultProbeTimeout
	if t := q.Get("timeout"); t != "" {
		timeout, err = time.ParseDuration(t)
		if err != nil || timeout <= 0 || timeout > MaxProbeTimeout {
			return "", 0, 0, fmt.Errorf("parameter timeout must be a duration between 0 and %s, got %q", MaxProbeTimeout, t)
		}
	}
	return target, port, timeout, nil
}

func (s *Server) probe(w http.ResponseWriter, r *http.Request) {
	if s.cfg.Probe == nil {
		writeError(w, http.StatusServiceUnavailable, "unavailable", "the agent cannot probe tunnels")
		return
	}
	target, port, timeout, err := parseProbe(r.URL.Query())
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), timeout)
	defer cancel()
	p, err := s.cfg.Probe(ctx, target, port, timeout)
	switch {
	case err == nil:
		writeJSON(w, http.StatusOK, p)
	case errors.Is(err, ErrNoTunnel):
		writeError(w, http.StatusNotFound, "not_found", err.Error())
	case r.Context().Err() != nil:
		writeError(w, http.StatusServiceUnavailable, "unavailable", "the agent is shutting down")
	default:
		s.log.Warn("probe failed", "target", target, "port", port, "err", err)
		writeError(w, http.StatusBadGateway, "unavailable", err.Error())
	}
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, wire.Error{Error: msg, Code: code})
}

// ListenUnix listens on the unix socket at path with mode 0600. A stale
// socket left by a crashed agent is removed; a socket another process is
// serving, or any other kind of file, is an error.
func ListenUnix(path string) (net.Listener, error) {
	fi, err := os.Lstat(path)
	switch {
	case err == nil:
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("local API socket %s exists and is not a socket", path)
		}
		if c, derr := net.DialTimeout("unix", path, time.Second); derr == nil {
			c.Close()
			return nil, fmt.Errorf("local API socket %s: another agent is listening on it", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale local API socket: %w", err)
		}
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("checking local API socket: %w", err)
	}
	ln, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("listening on local API socket: %w", err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		ln.Close()
		return nil, fmt.Errorf("restricting local API socket: %w", err)
	}
	return ln, nil
}
