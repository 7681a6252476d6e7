package broker

import (
	"bufio"
	"context"
	"encoding/json"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
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
