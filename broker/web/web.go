// Package web serves the pages people open from links: invite (register a
// security key), admin/invite (an admin confirms an invite they asked for),
// enroll (confirm a workstation) and grant (approve or deny a request).
// Pages are html/template with a strict CSP and one static script; every
// state-changing POST is behind http.CrossOriginProtection, and guessing link
// tokens is rate-limited per client address.
package web

import (
	"embed"
	"encoding/json"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"time"

	"github.com/pinhole-dev/pinhole/broker/api"
	"github.com/pinhole-dev/pinhole/broker/ratelimit"
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
	limit   *ratelimit.Limiter
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
	s := &Server{svc: svc, log: log, tmpl: t, limit: ratelimit.New(30, time.Minute, svc.Now)}
	mux := http.NewServeMux()
	static, _ := fs.Sub(staticFS, "static")
	mux.Handle("GET /static/", http.StripPrefix("/static/", http.FileServerFS(static)))
	mux.HandleFunc("GET /invite/{token}", s.invitePage)
	mux.HandleFunc("POST /invite/{token}/begin", s.inviteBegin)
	mux.HandleFunc("POST /invite/{token}/finish", s.inviteFinish)
	mux.HandleFunc("GET /enroll/{token}", s.enrollPage)
	mux.HandleFunc("POST /enroll/{token}/begin", s.enrollBegin)
	mux.HandleFunc("POST /enroll/{token}/finish", s.enrollFinish)
	mux.HandleFunc("GET /admin/invite/{token}", s.inviteConfirmPage)
	mux.HandleFunc("POST /admin/invite/{token}/begin", s.inviteConfirmBegin)
	mux.HandleFunc("POST /admin/invite/{token}/finish", s.inviteConfirmFinish)
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
	key := ratelimit.Key(r)
	over := s.limit.Over(key)
	s.limit.Add(key)
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

func (s *Server) inviteConfirmPage(w http.ResponseWriter, r *http.Request) {
	v, err := s.svc.ConfirmInviteInfo(r.Context(), r.PathValue("token"))
	if err != nil {
		s.errorPage(w, r, err)
		return
	}
	s.page(w, http.StatusOK, "inviteconfirm", map[string]any{"Title": "confirm invite", "View": v})
}

func (s *Server) inviteConfirmBegin(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.body(w, r); !ok {
		return
	}
	opts, err := s.svc.BeginInviteConfirm(r.Context(), r.PathValue("token"))
	if err != nil {
		s.jsonError(w, r, err)
		return
	}
	writeRaw(w, opts)
}

func (s *Server) inviteConfirmFinish(w http.ResponseWriter, r *http.Request) {
	b, ok := s.body(w, r)
	if !ok {
		return
	}
	inv, err := s.svc.FinishInviteConfirm(r.Context(), r.PathValue("token"), b.Credential)
	if err != nil {
		s.jsonError(w, r, err)
		return
	}
	out, _ := json.Marshal(inv)
	writeRaw(w, out)
}
