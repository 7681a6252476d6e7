package web

import (
	"crypto/rand"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/broker/service"
	"github.com/pinhole-dev/pinhole/internal/fido"
	"github.com/pinhole-dev/pinhole/internal/policy"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/store/sqlstore"
)

// clock is a settable clock for tests.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func newClock() *clock { return &clock{t: time.Date(2031, 1, 2, 3, 4, 5, 0, time.UTC)} }

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// newTestServer builds a Server over a real service on a SQLite store in
// t.TempDir(). Nothing it starts needs stopping but the store.
func newTestServer(t *testing.T) (*Server, *service.Service, *clock) {
	t.Helper()
	clk := newClock()
	st, err := sqlstore.Open(t.Context(), filepath.Join(t.TempDir(), "pinhole.db"), nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { st.Close() })
	f, err := fido.New(fido.Config{RPID: "localhost", Origins: []string{"https://localhost:8443"}, Now: clk.Now})
	if err != nil {
		t.Fatal(err)
	}
	userCA, err := sshca.NewKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	hostCA, err := sshca.NewKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	var pol atomic.Pointer[policy.Config]
	pol.Store(&policy.Config{})
	svc, err := service.New(service.Config{
		Store: st, Policy: &pol, FIDO: f, ClientCA: userCA, HostCA: hostCA,
		PublicURL: "https://localhost:8443", Clock: clk.Now,
	})
	if err != nil {
		t.Fatal(err)
	}
	s, err := New(svc, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s, svc, clk
}

func serve(s *Server, method, path, remote string, hdr map[string]string, body string) *httptest.ResponseRecorder {
	r := httptest.NewRequest(method, "https://localhost:8443"+path, strings.NewReader(body))
	if remote != "" {
		r.RemoteAddr = remote
	}
	for k, v := range hdr {
		r.Header.Set(k, v)
	}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return w
}

func TestSecurityHeaders(t *testing.T) {
	t.Parallel()
	s, svc, _ := newTestServer(t)
	inv, err := svc.Bootstrap(t.Context(), "ada")
	if err != nil {
		t.Fatal(err)
	}
	invitePath := strings.TrimPrefix(inv.URL, "https://localhost:8443")

	tests := []struct {
		name       string
		method     string
		path       string
		hdr        map[string]string
		wantStatus int
		wantBody   string
	}{
		{"ok/home", http.MethodGet, "/", nil, http.StatusOK, "Open the link you were sent"},
		{"ok/invite_page", http.MethodGet, invitePath, nil, http.StatusOK, `data-kind="invite"`},
		{"ok/static_script", http.MethodGet, "/static/pinhole.js", nil, http.StatusOK, ""},
		{"deny/unknown_link", http.MethodGet, "/invite/" + strings.Repeat("x", 43), nil, http.StatusNotFound, "unknown link"},
		{"deny/cross_origin_post", http.MethodPost, invitePath + "/begin", map[string]string{"Sec-Fetch-Site": "cross-site"}, http.StatusForbidden, ""},
	}
	wantHeaders := map[string]string{
		"X-Frame-Options":           "DENY",
		"X-Content-Type-Options":    "nosniff",
		"Cache-Control":             "no-store",
		"Referrer-Policy":           "no-referrer",
		"Strict-Transport-Security": "max-age=31536000",
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			w := serve(s, tc.method, tc.path, "", tc.hdr, "{}")
			if w.Code != tc.wantStatus {
				t.Fatalf("status = %d, want %d; body %q", w.Code, tc.wantStatus, w.Body)
			}
			if !strings.Contains(w.Body.String(), tc.wantBody) {
				t.Errorf("body %q does not contain %q", w.Body, tc.wantBody)
			}
			for h, want := range wantHeaders {
				if got := w.Header().Get(h); got != want {
					t.Errorf("%s = %q, want %q", h, got, want)
				}
			}
			cspHeader := w.Header().Get("Content-Security-Policy")
			for _, d := range []string{"default-src 'none'", "script-src 'self'", "frame-ancestors 'none'", "base-uri 'none'", "form-action 'none'"} {
				if !strings.Contains(cspHeader, d) {
					t.Errorf("CSP %q lacks %q", cspHeader, d)
				}
			}
			if strings.Contains(cspHeader, "unsafe-inline") || strings.Contains(cspHeader, "unsafe-eval") {
				t.Errorf("CSP %q allows unsafe sources", cspHeader)
			}
		})
	}
}

func TestPagesHaveNoInlineScript(t *testing.T) {
	t.Parallel()
	s, svc, _ := newTestServer(t)
	inv, err := svc.Bootstrap(t.Context(), "ada")
	if err != nil {
		t.Fatal(err)
	}
	for _, path := range []string{"/", strings.TrimPrefix(inv.URL, "https://localhost:8443"), "/grant/" + strings.Repeat("y", 43)} {
		w := serve(s, http.MethodGet, path, "", nil, "")
		body, _ := io.ReadAll(w.Body)
		// The strict CSP would block inline code; a page must not depend on it.
		for _, bad := range []string{"<script>", "onclick=", "onload=", "style="} {
			if strings.Contains(string(body), bad) {
				t.Errorf("GET %s: page contains %q", path, bad)
			}
		}
	}
}

func TestTokenGuessingIsRateLimited(t *testing.T) {
	t.Parallel()
	s, svc, clk := newTestServer(t)
	inv, err := svc.Bootstrap(t.Context(), "ada")
	if err != nil {
		t.Fatal(err)
	}
	good := strings.TrimPrefix(inv.URL, "https://localhost:8443")
	const attacker, bystander = "198.51.100.7:40000", "203.0.113.9:40000"
	guess := func(i int) string { return fmt.Sprintf("/invite/%043d", i) }

	// A valid link does not count against the client.
	for range 40 {
		if w := serve(s, http.MethodGet, good, attacker, nil, ""); w.Code != http.StatusOK {
			t.Fatalf("valid link: status %d", w.Code)
		}
	}
	for i := range 30 {
		if w := serve(s, http.MethodGet, guess(i), attacker, nil, ""); w.Code != http.StatusNotFound {
			t.Fatalf("guess %d: status %d, want 404", i, w.Code)
		}
	}
	tests := []struct {
		name   string
		method string
		path   string
		remote string
		want   int
	}{
		{"deny/next_guess", http.MethodGet, guess(30), attacker, http.StatusTooManyRequests},
		{"ok/a_valid_link_still_works", http.MethodGet, good, attacker, http.StatusOK},
		{"deny/json_endpoint_guess", http.MethodPost, guess(31) + "/begin", attacker, http.StatusTooManyRequests},
		{"deny/other_page_kind", http.MethodGet, "/grant/" + strings.Repeat("z", 43), attacker, http.StatusTooManyRequests},
		{"ok/other_client", http.MethodGet, good, bystander, http.StatusOK},
	}
	for _, tc := range tests {
		w := serve(s, tc.method, tc.path, tc.remote, map[string]string{"Content-Type": "application/json"}, "{}")
		if w.Code != tc.want {
			t.Errorf("%s: status %d, want %d", tc.name, w.Code, tc.want)
		}
		if tc.want == http.StatusTooManyRequests && w.Header().Get("Retry-After") == "" {
			t.Errorf("%s: no Retry-After", tc.name)
		}
	}

	clk.Advance(time.Minute)
	if w := serve(s, http.MethodGet, guess(40), attacker, nil, ""); w.Code != http.StatusNotFound {
		t.Errorf("a guess after the window: status %d, want 404", w.Code)
	}
}

func TestBootstrapOnlyOnce(t *testing.T) {
	t.Parallel()
	_, svc, _ := newTestServer(t)
	if _, err := svc.Bootstrap(t.Context(), "ada"); err != nil {
		t.Fatal(err)
	}
	_, err := svc.Bootstrap(t.Context(), "eve")
	if service.KindOf(err) != service.KindConflict || !strings.Contains(err.Error(), "an admin already exists") {
		t.Fatalf("second bootstrap: %v", err)
	}
	// The first admin's lost invite can be reissued until they register.
	if _, err := svc.Bootstrap(t.Context(), "ada"); err != nil {
		t.Fatalf("reissuing ada's invite: %v", err)
	}
}
