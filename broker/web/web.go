// Package web serves the pages people open from links: invite (register a
// security key), enroll (confirm a workstation) and grant (approve or deny a
// request). Pages are html/template with a strict CSP and one static script;
// every state-changing POST is behind http.CrossOriginProtection, and guessing
// link tokens is rate-limited per client address.
package web

import (
	"embed"
	"encoding/json"
	"html/template"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"time"

	"github.com/pinhole-dev/pinhole/broker/api"
	"github.com/pinhole-dev/pinhole/broker/service"
)

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

const csp = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

// Server is the web handler.
type Server struct {
	svc     *service.Service
	log     *slog.Logger
	tmpl    *template.Template
	handler http.Handler
	limit   *limiter
}

// New returns the web handler.
func New(svc *service.Service, log *slog.Logger) (*Server, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	t, err := template.ParseFS(templateFS, "templates/*.html")
	if err != nil {
		return nil, err
	}
	s := &Server{svc: svc, log: log, tmpl: t, limit: newLimiter(30, time.Minute, svc.Now)}
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	mux.HandleFunc("GET /invite/{token}", s.invitePage)
	mux.HandleFunc("POST /invite/{token}/begin", s.inviteBegin)
	mux.HandleFunc("POST /invite/{token}/finish", s.inviteFinish)
	mux.HandleFunc("GET /enroll/{token}", s.enrollPage)
	mux.HandleFunc("POST /enroll/{token}/begin", s.enrollBegin)
	mux.HandleFunc("POST /enroll/{token}/finish", s.enrollFinish)
	mux.HandleFunc("GET /grant/{token}", s.grantPage)
	mux.HandleFunc("POST /grant/{token}/begin", s.grantBegin)
	mux.HandleFunc("POST /grant/{token}/finish", s.grantFinish)
	mux.HandleFunc("GET /{$}", func(w http.ResponseWriter, r *http.Request) {
		s.page(w, http.StatusOK, "error", map[string]any{"Title": "broker", "Message": "pinhole broker. Open the link you were sent."})
	})
	cop := http.NewCrossOriginProtection()
	s.handler = cop.Handler(mux)
	return s, nil
}

// ServeHTTP serves the pages with security headers.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Content-Security-Policy", csp)
	h.Set("X-Frame-Options", "DENY")
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cache-Control", "no-store")
	h.Set("Strict-Transport-Security", "max-age=31536000")
	s.handler.ServeHTTP(w, r)
}

func (s *Server) page(w http.ResponseWriter, status int, name string, data map[string]any) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.WriteHeader(status)
	if err := s.tmpl.ExecuteTemplate(w, name, data); err != nil {
		s.log.Error("rendering page", "page", name, "err", err)
	}
}

// refuseGuess counts a failed token lookup against the client's network and
// answers 429 once that network is over the limit. Only misses are counted
// and refused: a valid link always works, so a guesser sharing a NAT with
// approvers cannot lock them out, while guessing (already hopeless against
// 256-bit tokens) is slowed to a trickle.
func (s *Server) refuseGuess(w http.ResponseWriter, r *http.Request, err error) bool {
	k := service.KindOf(err)
	if k != service.KindNotFound && k != service.KindGone && k != service.KindConflict {
		return false
	}
	key := limitKey(r)
	over := s.limit.over(key)
	s.limit.add(key)
	if !over {
		return false
	}
	w.Header().Set("Retry-After", "60")
	http.Error(w, "too many failed link attempts from your network; wait a minute", http.StatusTooManyRequests)
	return true
}

func (s *Server) errorPage(w http.ResponseWriter, r *http.Request, err error) {
	if s.refuseGuess(w, r, err) {
		return
	}
	status, _ := api.Status(err)
	msg := err.Error()
	if status == http.StatusInternalServerError {
		s.log.Error("internal error", "err", err)
		msg = "internal error"
	}
	s.page(w, status, "error", map[string]any{"Title": "error", "Message": msg})
}

func (s *Server) jsonError(w http.ResponseWriter, r *http.Request, err error) {
	if s.refuseGuess(w, r, err) {
		return
	}
	api.WriteServiceError(w, s.log, err)
}

func writeRaw(w http.ResponseWriter, b []byte) {
	w.Header().Set("Content-Type", "application/json")
	w.Write(b)
}

type credentialBody struct {
	Decision   string          `json:"decision,omitempty"`
	ViewHash   string          `json:"view_hash,omitempty"`
	Credential json.RawMessage `json:"credential,omitempty"`
}

func (s *Server) body(w http.ResponseWriter, r *http.Request) (credentialBody, bool) {
	var b credentialBody
	if err := api.DecodeBody(w, r, &b); err != nil {
		http.Error(w, `{"error":`+jsonString(err.Error())+`,"code":"bad_request"}`, http.StatusBadRequest)
		return b, false
	}
	return b, true
}

func jsonString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

func (s *Server) invitePage(w http.ResponseWriter, r *http.Request) {
	u, err := s.svc.InviteInfo(r.Context(), r.PathValue("token"))
	if err != nil {
		s.errorPage(w, r, err)
		return
	}
	s.page(w, http.StatusOK, "invite", map[string]any{"Title": "register", "User": u.Name, "Role": u.Role})
}

func (s *Server) inviteBegin(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.body(w, r); !ok {
		return
	}
	opts, err := s.svc.BeginRegistration(r.Context(), r.PathValue("token"))
	if err != nil {
		s.jsonError(w, r, err)
		return
	}
	writeRaw(w, opts)
}

func (s *Server) inviteFinish(w http.ResponseWriter, r *http.Request) {
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	if err := s.svc.FinishRegistration(r.Context(), r.PathValue("token"), b.Credential); err != nil {
		s.jsonError(w, r, err)
		return
	}
	writeRaw(w, []byte(`{"ok":true}`))
}

func (s *Server) enrollPage(w http.ResponseWriter, r *http.Request) {
	v, err := s.svc.DeviceConfirmInfo(r.Context(), r.PathValue("token"))
	if err != nil {
		s.errorPage(w, r, err)
		return
	}
	s.page(w, http.StatusOK, "enroll", map[string]any{"Title": "confirm workstation", "View": v})
}

func (s *Server) enrollBegin(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.body(w, r); !ok {
		return
	}
	opts, err := s.svc.BeginDeviceConfirm(r.Context(), r.PathValue("token"))
	if err != nil {
		s.jsonError(w, r, err)
		return
	}
	writeRaw(w, opts)
}

func (s *Server) enrollFinish(w http.ResponseWriter, r *http.Request) {
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	if err := s.svc.FinishDeviceConfirm(r.Context(), r.PathValue("token"), b.Credential); err != nil {
		s.jsonError(w, r, err)
		return
	}
	writeRaw(w, []byte(`{"ok":true}`))
}

func (s *Server) grantPage(w http.ResponseWriter, r *http.Request) {
	v, err := s.svc.GrantLinkView(r.Context(), r.PathValue("token"))
	if err != nil {
		s.errorPage(w, r, err)
		return
	}
	s.page(w, http.StatusOK, "grant", map[string]any{"Title": "access request " + v.Request, "View": v, "Hash": v.Hash()})
}

func (s *Server) grantBegin(w http.ResponseWriter, r *http.Request) {
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	opts, err := s.svc.BeginDecision(r.Context(), r.PathValue("token"), service.Decision(b.Decision), b.ViewHash)
	if err != nil {
		s.jsonError(w, r, err)
		return
	}
	writeRaw(w, opts)
}

func (s *Server) grantFinish(w http.ResponseWriter, r *http.Request) {
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	out, err := s.svc.FinishDecision(r.Context(), r.PathValue("token"), service.Decision(b.Decision), b.Credential)
	if err != nil {
		s.jsonError(w, r, err)
		return
	}
	b2, _ := json.Marshal(out)
	writeRaw(w, b2)
}

func clientIP(r *http.Request) string {
	host, _, err := net.SplitHostPort(r.RemoteAddr)
	if err != nil {
		return r.RemoteAddr
	}
	return host
}

// limiter counts failed token lookups per client network in fixed windows.
// Only failures create entries; when maxKeys networks are being tracked and
// none of their windows has run out, networks not yet tracked are refused
// too (fail closed under a spread-out guessing attack) until windows expire.
type limiter struct {
	mu      sync.Mutex
	max     int
	window  time.Duration
	now     func() time.Time
	maxKeys int
	counts  map[string]*window // guarded by mu
}

type window struct {
	start time.Time
	n     int
}

func newLimiter(max int, win time.Duration, now func() time.Time) *limiter {
	return &limiter{max: max, window: win, now: now, maxKeys: 100000, counts: make(map[string]*window)}
}

// liveLocked returns key's window if it has not run out.
func (l *limiter) liveLocked(key string, now time.Time) (*window, bool) {
	w, ok := l.counts[key]
	if !ok || now.Sub(w.start) >= l.window {
		return nil, false
	}
	return w, true
}

// pruneLocked drops every window that has run out.
func (l *limiter) pruneLocked(now time.Time) {
	for k, w := range l.counts {
		if now.Sub(w.start) >= l.window {
			delete(l.counts, k)
		}
	}
}

func (l *limiter) add(key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if w, ok := l.liveLocked(key, now); ok {
		w.n++
		return
	}
	if len(l.counts) >= l.maxKeys {
		l.pruneLocked(now)
		if len(l.counts) >= l.maxKeys {
			return // full of live offenders: over() refuses untracked keys
		}
	}
	l.counts[key] = &window{start: now, n: 1}
}

func (l *limiter) over(key string) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := l.now()
	if w, ok := l.liveLocked(key, now); ok {
		return w.n >= l.max
	}
	if len(l.counts) >= l.maxKeys {
		l.pruneLocked(now)
		return len(l.counts) >= l.maxKeys
	}
	return false
}

// limitKey is the network a client is counted by: its IPv4 address, or the
// /64 of its IPv6 address (one host usually owns a whole /64).
func limitKey(r *http.Request) string {
	a, err := netip.ParseAddr(clientIP(r))
	if err != nil {
		return clientIP(r)
	}
	a = a.Unmap()
	if a.Is6() {
		p, _ := a.Prefix(64)
		return p.String()
	}
	return a.String()
}
