package broker

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/pinhole-dev/pinhole/broker/service"
)

func TestOutboxFileIsOwnerOnlyJSONLines(t *testing.T) {
	t.Parallel()
	path := filepath.Join(t.TempDir(), "outbox.jsonl")
	o := &outboxFile{path: path}
	for _, a := range []string{"bob", "carol"} {
		if err := o.NotifyApprover(context.Background(), service.ApprovalNotice{Approver: a, Request: "r-1", URL: "https://x/grant/T-" + a}); err != nil {
			t.Fatal(err)
		}
	}
	fi, err := os.Stat(path)
	if err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("outbox mode %v, err %v", fi.Mode(), err)
	}
	f, _ := os.Open(path)
	defer f.Close()
	var got []string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var n service.ApprovalNotice
		if err := json.Unmarshal(sc.Bytes(), &n); err != nil {
			t.Fatal(err)
		}
		got = append(got, n.Approver)
	}
	if strings.Join(got, ",") != "bob,carol" {
		t.Fatalf("outbox has %v", got)
	}
}

func TestWebhookPostsNoticeAndReportsFailure(t *testing.T) {
	t.Parallel()
	var got service.ApprovalNotice
	ok := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewDecoder(r.Body).Decode(&got)
	}))
	defer ok.Close()
	bad := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { http.Error(w, "no", 500) }))
	defer bad.Close()
	n := service.ApprovalNotice{Approver: "bob", Request: "r-1"}
	if err := (&webhook{url: ok.URL, client: ok.Client()}).NotifyApprover(context.Background(), n); err != nil || got.Approver != "bob" {
		t.Fatalf("webhook: %v, got %+v", err, got)
	}
	if err := (&webhook{url: bad.URL, client: bad.Client()}).NotifyApprover(context.Background(), n); err == nil {
		t.Fatal("a failing webhook was reported as delivered")
	}
}

func TestOpenRefusesBadWebhookURL(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "pinhole.yaml")
	os.WriteFile(cfg, []byte("roles: [dba]\n"), 0o600)
	for _, u := range []string{"not a url", "ftp://x/y", "https://"} {
		_, err := Open(context.Background(), Config{DataDir: filepath.Join(dir, "data"), ConfigFile: cfg, NotifyWebhook: u})
		if err == nil || !strings.Contains(err.Error(), "notify webhook") {
			t.Errorf("webhook %q: got %v", u, err)
		}
	}
}

func TestOpenRefusesConfigWritableByOthers(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	cfg := filepath.Join(dir, "pinhole.yaml")
	os.WriteFile(cfg, []byte("roles: [dba]\n"), 0o600)
	if err := os.Chmod(cfg, 0o666); err != nil {
		t.Fatal(err)
	}
	_, err := Open(context.Background(), Config{DataDir: filepath.Join(dir, "data"), ConfigFile: cfg})
	if err == nil || !strings.Contains(err.Error(), "writable by others") {
		t.Fatalf("world-writable config: %v", err)
	}
	if _, err := os.Stat(filepath.Join(dir, "data")); err == nil {
		t.Fatal("the data dir was created for a refused config")
	}
}

// TestWebhookErrorHidesURL: a webhook URL can carry a token; a delivery
// error names the host only, since it is logged (invariant 12).
func TestWebhookErrorHidesURL(t *testing.T) {
	t.Parallel()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close() // nothing listens there now: the POST fails to connect
	w := &webhook{url: "http://" + addr + "/hooks/T0K3N-secret?key=s3cr3t", client: &http.Client{Timeout: 2 * time.Second}}
	err = w.NotifyApprover(context.Background(), service.ApprovalNotice{Approver: "bob", Request: "r-1"})
	if err == nil {
		t.Fatal("delivery to a closed port succeeded")
	}
	if strings.Contains(err.Error(), "T0K3N") || strings.Contains(err.Error(), "s3cr3t") || !strings.Contains(err.Error(), addr) {
		t.Errorf("error %q: want the host only, never the path or query", err)
	}
}

// TestWebhookDoesNotFollowRedirects: a webhook answering 3xx is a failed
// delivery; the notice, which holds a grant link, is not sent on to the
// Location.
func TestWebhookDoesNotFollowRedirects(t *testing.T) {
	t.Parallel()
	for _, code := range []int{http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther, http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
		t.Run(fmt.Sprintf("deny/%d", code), func(t *testing.T) {
			t.Parallel()
			var forwarded atomic.Int32
			elsewhere := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { forwarded.Add(1) }))
			defer elsewhere.Close()
			redirecting := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				http.Redirect(w, r, elsewhere.URL+"/steal?token=s3cr3t", code)
			}))
			defer redirecting.Close()
			w := &webhook{url: redirecting.URL + "/hook", client: &http.Client{Timeout: 5 * time.Second}}
			err := w.NotifyApprover(context.Background(), service.ApprovalNotice{Approver: "bob", Request: "r-1", URL: "https://x/grant/T"})
			if err == nil {
				t.Fatal("a redirect was reported as delivered")
			}
			if got := forwarded.Load(); got != 0 {
				t.Errorf("the notice was sent on to the redirect target %d time(s)", got)
			}
			if strings.Contains(err.Error(), "s3cr3t") || strings.Contains(err.Error(), "/hook") {
				t.Errorf("error %q names the path or query of a URL", err)
			}
		})
	}
}

func TestCheckWebhookURL(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		url     string
		wantErr string // empty: accepted
	}{
		{name: "ok/https", url: "https://hooks.example.com/T0K3N"},
		{name: "ok/https with port", url: "https://hooks.example.com:8443/T0K3N"},
		{name: "ok/http to 127.0.0.1", url: "http://127.0.0.1:9000/notify"},
		{name: "ok/http to another loopback IPv4", url: "http://127.1.2.3/notify"},
		{name: "ok/http to ::1", url: "http://[::1]:9000/notify"},
		{name: "ok/http to localhost", url: "http://localhost:9000/notify"},
		{name: "ok/http to LOCALHOST", url: "http://LOCALHOST/notify"},
		{name: "deny/http to a remote name", url: "http://hooks.example.com/T0K3N?key=s3cr3t", wantErr: "cleartext"},
		{name: "deny/http to a private address", url: "http://10.0.0.1/T0K3N", wantErr: "cleartext"},
		{name: "deny/http to the unspecified address", url: "http://0.0.0.0/T0K3N", wantErr: "cleartext"},
		{name: "deny/http to a localhost lookalike", url: "http://localhost.example.com/T0K3N", wantErr: "cleartext"},
		{name: "deny/http to a name under localhost", url: "http://evil.localhost/T0K3N", wantErr: "cleartext"},
		{name: "deny/other scheme", url: "ftp://x/T0K3N", wantErr: "want https"},
		{name: "deny/not a URL", url: "not a url", wantErr: "want an https://host/path URL"},
		{name: "deny/no host", url: "https://", wantErr: "want an https://host/path URL"},
		{name: "deny/no scheme", url: "hooks.example.com/T0K3N", wantErr: "want an https://host/path URL"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := checkWebhookURL(tt.url)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("checkWebhookURL(%q) = %v, want nil", tt.url, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "notify webhook") {
				t.Fatalf("checkWebhookURL(%q) = %v, want an error about the notify webhook containing %q", tt.url, err, tt.wantErr)
			}
			if strings.Contains(err.Error(), "T0K3N") || strings.Contains(err.Error(), "s3cr3t") {
				t.Errorf("error %q names the path or query of the URL", err)
			}
		})
	}
}

// TestNotifiersSplitKeepsOutboxQuick: the broker's notifier list splits
// into the outbox, written inside the request's API call, and the webhook,
// which the service calls in the background. The quick part never touches
// the webhook, so one that never answers cannot hold the request up.
func TestNotifiersSplitKeepsOutboxQuick(t *testing.T) {
	t.Parallel()
	var posted atomic.Int32
	release := make(chan struct{})
	hanging := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		posted.Add(1)
		<-release // never answers while the test runs
	}))
	defer hanging.Close()
	defer close(release) // before Close, which waits for the handler
	path := filepath.Join(t.TempDir(), "outbox.jsonl")
	hook := &webhook{url: hanging.URL + "/notify", client: &http.Client{Timeout: 5 * time.Second}}
	quick, slow := notifiers{&outboxFile{path: path}, hook}.Split()

	if got, want := fmt.Sprintf("%T %d", quick, len(quick.(notifiers))), "broker.notifiers 1"; got != want {
		t.Fatalf("quick part %s, want %s (the outbox)", got, want)
	}
	if _, ok := quick.(notifiers)[0].(*outboxFile); !ok {
		t.Fatalf("quick part is %T, want the outbox", quick.(notifiers)[0])
	}
	if s, ok := slow.(notifiers); !ok || len(s) != 1 || s[0] != service.Notifier(hook) {
		t.Fatalf("slow part is %#v, want the webhook alone", slow)
	}

	n := service.ApprovalNotice{Approver: "bob", Request: "r-1", URL: "https://x/grant/T"}
	if err := quick.NotifyApprover(context.Background(), n); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(path); err != nil || !strings.Contains(string(b), `"approver":"bob"`) {
		t.Fatalf("outbox after the quick part: %q, %v", b, err)
	}
	if got := posted.Load(); got != 0 {
		t.Errorf("the quick part posted to the webhook %d time(s)", got)
	}

	// The slow part is the webhook: it waits on the receiver until its
	// deadline, and says so naming the host only.
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	err := slow.NotifyApprover(ctx, n)
	if err == nil || !errors.Is(err, context.DeadlineExceeded) || strings.Contains(err.Error(), "/notify") {
		t.Errorf("slow part against a receiver that never answers: %v, want a deadline error naming the host only", err)
	}

	if q, s := (notifiers{&outboxFile{path: path}}).Split(); q == nil || s != nil {
		t.Errorf("without a webhook: quick %v, slow %v; want the outbox and no slow part", q, s)
	}
}
