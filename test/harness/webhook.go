package harness

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"sync"
	"time"
)

// Notice is what the broker posts per grant link.
type Notice struct {
	Approver  string    `json:"approver"`
	Request   string    `json:"request"`
	Requester string    `json:"requester"`
	Target    string    `json:"target"`
	Reason    string    `json:"reason"`
	TTL       string    `json:"ttl"`
	URL       string    `json:"url"`
	ExpiresAt time.Time `json:"expires_at"`
}

// Webhook collects grant-link notices on a loopback HTTP server.
type Webhook struct {
	URL     string
	srv     *http.Server
	mu      sync.Mutex
	notices []Notice
	news    chan struct{}
}

// StartWebhook listens on 127.0.0.1.
func StartWebhook() (*Webhook, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	w := &Webhook{URL: "http://" + ln.Addr().String() + "/notify", news: make(chan struct{}, 1)}
	w.srv = &http.Server{ReadHeaderTimeout: 5 * time.Second, Handler: http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		var n Notice
		if err := json.NewDecoder(http.MaxBytesReader(rw, r.Body, 64<<10)).Decode(&n); err != nil {
			http.Error(rw, err.Error(), http.StatusBadRequest)
			return
		}
		w.mu.Lock()
		w.notices = append(w.notices, n)
		w.mu.Unlock()
		select {
		case w.news <- struct{}{}:
		default:
		}
	})}
	go w.srv.Serve(ln)
	return w, nil
}

// Close stops the server.
func (w *Webhook) Close() error { return w.srv.Close() }

// Wait returns the notice for request and approver, waiting until ctx ends.
func (w *Webhook) Wait(ctx context.Context, request, approver string) (Notice, error) {
	for {
		w.mu.Lock()
		for _, n := range w.notices {
			if n.Request == request && (approver == "" || n.Approver == approver) {
				w.mu.Unlock()
				return n, nil
			}
		}
		w.mu.Unlock()
		select {
		case <-w.news:
		case <-time.After(100 * time.Millisecond):
		case <-ctx.Done():
			return Notice{}, fmt.Errorf("no grant link for %s/%s: %w", request, approver, ctx.Err())
		}
	}
}

// All returns every notice so far.
func (w *Webhook) All() []Notice {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]Notice(nil), w.notices...)
}
