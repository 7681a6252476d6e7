// Package api serves the broker's JSON API (/v1/) to agents and the CLI. It
// authenticates the calling device by the Ed25519 key of its TLS client
// certificate and is the one place where service errors become HTTP status
// codes.
package api

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/go-json-experiment/json/jsontext"

	"github.com/pinhole-dev/pinhole/broker/ratelimit"
	"github.com/pinhole-dev/pinhole/broker/service"
	"github.com/pinhole-dev/pinhole/internal/devicekey"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
	"golang.org/x/crypto/ssh"
)

// Server is the JSON API handler.
type Server struct {
	svc    *service.Service
	log    *slog.Logger
	userCA ssh.PublicKey
	hostCA ssh.PublicKey
	mux    *http.ServeMux
	// enrolls bounds enrollment attempts per client network: enrolling
	// needs only a self-made key, so it must not be free to flood.
	enrolls *ratelimit.Limiter
}

// Enrollment attempts allowed per client network per minute.
const enrollsPerMinute = 10

// New returns the API handler.
func New(svc *service.Service, userCA, hostCA ssh.PublicKey, log *slog.Logger) *Server {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	s := &Server{svc: svc, log: log, userCA: userCA, hostCA: hostCA, mux: http.NewServeMux(),
		enrolls: ratelimit.New(enrollsPerMinute, time.Minute, svc.Now)}
	s.mux.HandleFunc("GET "+wire.PathCA, s.ca)
	s.mux.HandleFunc("GET "+wire.PathHealth, func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok\n") })
	s.mux.HandleFunc("POST "+wire.PathEnroll, s.enroll)
	s.mux.HandleFunc("GET "+wire.PathDevice, s.device(true, s.getDevice))
	s.mux.HandleFunc("GET "+wire.PathEvents, s.device(true, s.events))
	s.mux.HandleFunc("POST "+wire.PathPostureNonce, s.device(false, s.postureNonce))
	s.mux.HandleFunc("POST "+wire.PathPosture, s.device(false, s.posture))
	s.mux.HandleFunc("POST "+wire.PathRequests, s.device(false, s.createRequest))
	s.mux.HandleFunc("GET "+wire.PathRequest, s.device(false, s.getRequest))
	s.mux.HandleFunc("POST "+wire.PathActivate, s.device(false, s.activate))
	s.mux.HandleFunc("POST "+wire.PathRevoke, s.device(false, s.revoke))
	s.mux.HandleFunc("POST "+wire.PathAdminUsers, s.device(false, s.inviteUser))
	s.mux.HandleFunc("GET "+wire.PathAuditEvents, s.device(false, s.auditEvents))
	s.mux.HandleFunc("GET "+wire.PathAuditCheckpt, s.device(false, s.auditCheckpoint))
	s.mux.HandleFunc("GET "+wire.PathRecordings, s.device(false, s.recordings))
	s.mux.HandleFunc("GET "+wire.PathRecordingData, s.device(false, s.recordingData))
	s.mux.HandleFunc("/v1/", func(w http.ResponseWriter, r *http.Request) {
		writeError(w, http.StatusNotFound, "not_found", "no API endpoint "+r.Method+" "+r.URL.Path)
	})
	return s
}

// ServeHTTP serves the API.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("X-Content-Type-Options", "nosniff")
	s.mux.ServeHTTP(w, r)
}

// Status maps a service error kind to its HTTP status and code. This is the
// one place that choice is made.
func Status(err error) (int, string) {
	switch service.KindOf(err) {
	case service.KindBadInput:
		return http.StatusBadRequest, "bad_request"
	case service.KindUnauthenticated:
		return http.StatusUnauthorized, "unauthenticated"
	case service.KindForbidden:
		return http.StatusForbidden, "forbidden"
	case service.KindNotFound:
		return http.StatusNotFound, "not_found"
	case service.KindConflict:
		return http.StatusConflict, "conflict"
	case service.KindPolicy:
		return http.StatusForbidden, "policy"
	case service.KindGone:
		return http.StatusGone, "gone"
	}
	return http.StatusInternalServerError, "internal"
}

// WriteServiceError answers with err's status; internal errors are logged
// and hidden.
func WriteServiceError(w http.ResponseWriter, log *slog.Logger, err error) {
	if errors.Is(err, context.Canceled) {
		// The client went away or the broker is shutting down: nobody to
		// tell, nothing wrong.
		log.Debug("request canceled", "err", err)
		writeError(w, 499, "canceled", "request canceled")
		return
	}
	status, code := Status(err)
	msg := err.Error()
	if status == http.StatusInternalServerError {
		log.Error("internal error", "err", err)
		msg = "internal error"
	}
	writeError(w, status, code, msg)
}

func writeError(w http.ResponseWriter, status int, code, msg string) {
	writeJSON(w, status, wire.Error{Error: msg, Code: code})
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(v)
}

// DecodeBody reads a bounded JSON object into v, refusing unknown fields,
// non-objects and trailing data, with an error that names the problem.
func DecodeBody(w http.ResponseWriter, r *http.Request, v any) error {
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		return fmt.Errorf("content type %q: want application/json", ct)
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, wire.MaxBodyBytes))
	if err != nil {
		var mbe *http.MaxBytesError
		if errors.As(err, &mbe) {
			return fmt.Errorf("request body is larger than %d bytes", wire.MaxBodyBytes)
		}
		return fmt.Errorf("reading request body: %v", err)
	}
	trimmed := bytes.TrimLeft(body, " \t\r\n")
	switch {
	case len(trimmed) == 0:
		return errors.New("request body is empty; want a JSON object")
	case trimmed[0] != '{' && json.Valid(trimmed):
		return fmt.Errorf("request body: want a JSON object, got JSON %s", jsonKind(trimmed[0]))
	}
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		var se *json.SyntaxError
		var te *json.UnmarshalTypeError
		switch {
		case errors.Is(err, io.ErrUnexpectedEOF):
			return errors.New("request body is not valid JSON: it ends in the middle of a value")
		case errors.As(err, &se):
			return fmt.Errorf("request body is not valid JSON at byte %d: %v", se.Offset, err)
		case errors.As(err, &te) && te.Field == "":
			return fmt.Errorf("request body: want a JSON object, got JSON %s", te.Value)
		case errors.As(err, &te):
			return fmt.Errorf("field %q: want %s, got JSON %s", te.Field, te.Type, te.Value)
		case strings.HasPrefix(err.Error(), "json: unknown field"):
			return fmt.Errorf("unknown field %s", strings.TrimPrefix(err.Error(), "json: unknown field "))
		}
		return fmt.Errorf("reading request body: %v", err)
	}
	if rest := bytes.TrimSpace(body[dec.InputOffset():]); len(rest) > 0 {
		return errors.New("request body has data after the JSON object")
	}
	return checkNames(body, v)
}

// checkNames closes what encoding/json lets through: a name given twice at
// any depth (it would keep the last), and a top-level field name in another
// case than the one defined (it would match case-insensitively).
func checkNames(body []byte, v any) error {
	want := fieldNames(v)
	d := jsontext.NewDecoder(bytes.NewReader(body))
	for {
		tok, err := d.ReadToken()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if errors.Is(err, jsontext.ErrDuplicateName) {
				var se *jsontext.SyntacticError
				if errors.As(err, &se) {
					return fmt.Errorf("field %s appears more than once", se.JSONPointer)
				}
				return errors.New("a field appears more than once")
			}
			return fmt.Errorf("reading request body: %v", err)
		}
		if want == nil || d.StackDepth() != 1 || tok.Kind() != '"' {
			continue
		}
		if _, n := d.StackIndex(1); n%2 == 1 { // an object name, not a value
			if name := tok.String(); !want[name] {
				return fmt.Errorf("unknown field %q (names are case-sensitive)", name)
			}
		}
	}
}

// fieldNames returns the JSON names of the struct v points to, or nil.
func fieldNames(v any) map[string]bool {
	t := reflect.TypeOf(v)
	for t != nil && t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t == nil || t.Kind() != reflect.Struct {
		return nil
	}
	names := map[string]bool{}
	for f := range t.Fields() {
		if !f.IsExported() {
			continue
		}
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch name {
		case "-":
			continue
		case "":
			name = f.Name
		}
		names[name] = true
	}
	return names
}

func jsonKind(first byte) string {
	switch first {
	case '[':
		return "array"
	case '"':
		return "string"
	case 'n':
		return "null"
	case 't', 'f':
		return "bool"
	}
	return "number"
}

type caller struct {
	dev  store.Device
	user store.User
}

// device authenticates the calling device; pending devices pass only when
// allowPending.
func (s *Server) device(allowPending bool, h func(http.ResponseWriter, *http.Request, caller)) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		pub, err := devicekey.FromConnectionState(r.TLS)
		if err != nil {
			writeError(w, http.StatusUnauthorized, "unauthenticated", "device certificate required: "+err.Error())
			return
		}
		d, u, err := s.svc.AuthenticateDevice(r.Context(), pub)
		if err != nil {
			WriteServiceError(w, s.log, err)
			return
		}
		if d.State != store.DeviceActive && !allowPending {
			writeError(w, http.StatusForbidden, "forbidden", "device is "+d.State+"; confirm it with the link from enrollment first")
			return
		}
		h(w, r, caller{dev: d, user: u})
	}
}

func (s *Server) ca(w http.ResponseWriter, _ *http.Request) {
	ca := wire.CA{UserCAKeys: []string{sshca.AuthorizedKey(s.userCA)}, HostCAKeys: []string{sshca.AuthorizedKey(s.hostCA)}}
	if k := s.svc.AuditPublicKey(); k != nil {
		ca.AuditKeys = []string{base64.StdEncoding.EncodeToString(k)}
	}
	writeJSON(w, http.StatusOK, ca)
}

func (s *Server) auditCheckpoint(w http.ResponseWriter, r *http.Request, c caller) {
	cp, err := s.svc.LatestCheckpoint(r.Context(), c.user)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusOK, wire.Checkpoint{Seq: cp.Seq, Hash: cp.Hash, Time: cp.Time, KeyID: cp.KeyID, Signature: cp.Signature})
}

func (s *Server) enroll(w http.ResponseWriter, r *http.Request) {
	pub, err := devicekey.FromConnectionState(r.TLS)
	if err != nil {
		writeError(w, http.StatusUnauthorized, "unauthenticated", "device certificate required: "+err.Error())
		return
	}
	key := ratelimit.Key(r)
	if s.enrolls.Over(key) {
		w.Header().Set("Retry-After", "60")
		writeError(w, http.StatusTooManyRequests, "rate_limited", "too many enrollment attempts from your network; wait a minute")
		return
	}
	s.enrolls.Add(key)
	var in wire.EnrollRequest
	if err := DecodeBody(w, r, &in); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	out, err := s.svc.Enroll(r.Context(), pub, in.User, in.Hostname)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, out)
}

func (s *Server) getDevice(w http.ResponseWriter, _ *http.Request, c caller) {
	writeJSON(w, http.StatusOK, wire.Device{ID: c.dev.ID, User: c.dev.User, Hostname: c.dev.Hostname, State: c.dev.State,
		Fingerprint: devicekey.Fingerprint(c.dev.PublicKey), CreatedAt: c.dev.CreatedAt})
}

func (s *Server) events(w http.ResponseWriter, r *http.Request, c caller) {
	q := r.URL.Query()
	after, err := queryInt(q, "after", 0, math.MaxInt64)
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	wait := 25 * time.Second
	if v := q.Get("wait"); v != "" {
		if wait, err = time.ParseDuration(v); err != nil || wait < 0 {
			writeError(w, http.StatusBadRequest, "bad_request", "wait: want a duration such as 25s")
			return
		}
	}
	out, err := s.svc.Events(r.Context(), c.dev, after, wait)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) postureNonce(w http.ResponseWriter, r *http.Request, c caller) {
	out, err := s.svc.PostureNonce(r.Context(), c.dev)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) posture(w http.ResponseWriter, r *http.Request, c caller) {
	var in wire.PostureSubmit
	if err := DecodeBody(w, r, &in); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	out, err := s.svc.SubmitPosture(r.Context(), c.dev, in)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) createRequest(w http.ResponseWriter, r *http.Request, c caller) {
	var in wire.CreateRequest
	if err := DecodeBody(w, r, &in); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	out, err := s.svc.CreateRequest(r.Context(), c.dev, c.user, in)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, out)
}

func (s *Server) getRequest(w http.ResponseWriter, r *http.Request, c caller) {
	out, err := s.svc.Request(r.Context(), c.user, r.PathValue("id"))
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) activate(w http.ResponseWriter, r *http.Request, c caller) {
	var in wire.ActivateRequest
	if err := DecodeBody(w, r, &in); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	out, err := s.svc.Activate(r.Context(), c.dev, c.user, r.PathValue("id"), in)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) revoke(w http.ResponseWriter, r *http.Request, c caller) {
	var in wire.RevokeRequest
	if err := DecodeBody(w, r, &in); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	out, err := s.svc.Revoke(r.Context(), c.user, r.PathValue("id"), in.Reason)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) inviteUser(w http.ResponseWriter, r *http.Request, c caller) {
	var in wire.InviteUser
	if err := DecodeBody(w, r, &in); err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	out, err := s.svc.RequestInvite(r.Context(), c.user, c.dev, in.Name, in.Role)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusCreated, out)
}

// maxAuditPage is the most audit events one page holds.
const maxAuditPage = 1000

// queryInt parses the optional integer query parameter name: 0 when absent,
// else a value in [lo, hi] or an error naming the parameter.
func queryInt(q url.Values, name string, lo, hi int64) (int64, error) {
	v := q.Get(name)
	if v == "" {
		return 0, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err == nil && n >= lo && n <= hi {
		return n, nil
	}
	if hi == math.MaxInt64 {
		return 0, fmt.Errorf("%s: want an integer of at least %d", name, lo)
	}
	return 0, fmt.Errorf("%s: want an integer from %d to %d", name, lo, hi)
}

func (s *Server) auditEvents(w http.ResponseWriter, r *http.Request, c caller) {
	var limit int
	q := r.URL.Query()
	after, err := queryInt(q, "after", 0, math.MaxInt64)
	if err == nil {
		var l int64
		l, err = queryInt(q, "limit", 1, maxAuditPage)
		limit = int(l)
	}
	if err != nil {
		writeError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	if limit == 0 {
		limit = maxAuditPage
	}
	evs, err := s.svc.AuditEvents(r.Context(), c.user, after, limit+1)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	page := wire.AuditPage{Events: []json.RawMessage{}, Next: after}
	for i, e := range evs {
		if i == limit {
			page.More = true
			break
		}
		b, err := json.Marshal(e)
		if err != nil {
			WriteServiceError(w, s.log, err)
			return
		}
		page.Events = append(page.Events, b)
		page.Next = e.Seq
	}
	writeJSON(w, http.StatusOK, page)
}

func (s *Server) recordings(w http.ResponseWriter, r *http.Request, c caller) {
	out, err := s.svc.Recordings(r.Context(), c.user)
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	writeJSON(w, http.StatusOK, out)
}

func (s *Server) recordingData(w http.ResponseWriter, r *http.Request, c caller) {
	rc, err := s.svc.OpenCast(r.Context(), c.user, r.PathValue("id"))
	if err != nil {
		WriteServiceError(w, s.log, err)
		return
	}
	defer rc.Close()
	w.Header().Set("Content-Type", "application/x-asciicast")
	io.Copy(w, rc)
}
