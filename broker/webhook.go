package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/pinhole-dev/pinhole/broker/service"
	"github.com/pinhole-dev/pinhole/internal/audit"
)

// webhookTimeout bounds one POST when the webhook has no client of its own.
const webhookTimeout = 5 * time.Second

// webhook posts each approval notice as JSON to a URL. It is the slow part
// of a delivery (see service.SplitNotifier): the service calls it off the
// request's API call, after the outbox has the link.
type webhook struct {
	url string
	// client is optional; nil means one with webhookTimeout. Its
	// CheckRedirect is ignored: redirects are never followed.
	client *http.Client
}

var (
	_ service.SplitNotifier = (*webhook)(nil)
	_ service.SplitNotifier = notifiers(nil)
)

// Split reports that a webhook is slow in all of its delivery.
func (w *webhook) Split() (quick, slow service.Notifier) { return nil, w }

// NotifyApprover posts n and waits for a 2xx answer. A redirect counts as a
// failure and is not followed: it would have the link, a secret, posted on
// to wherever the answer points.
func (w *webhook) NotifyApprover(ctx context.Context, n service.ApprovalNotice) error {
	body, err := json.Marshal(n)
	if err != nil {
		return fmt.Errorf("encoding notice: %w", err)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, w.url, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("webhook request: %w", err)
	}
	req.Header.Set("Content-Type", "application/json")
	resp, err := w.httpClient().Do(req)
	if err != nil {
		// The URL can hold a secret (a token in its path or query): name
		// only its host.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return fmt.Errorf("posting to webhook at %s: %w", req.URL.Host, err)
	}
	defer resp.Body.Close()
	io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
	switch {
	case resp.StatusCode/100 == 3:
		// Not the Location: it may hold a secret too.
		return fmt.Errorf("webhook at %s answered %s; redirects are not followed, point --notify-webhook at the final URL", req.URL.Host, resp.Status)
	case resp.StatusCode/100 != 2:
		return fmt.Errorf("webhook at %s answered %s", req.URL.Host, resp.Status)
	}
	return nil
}

// httpClient returns a copy of w's client that never follows a redirect, so
// that Do returns the 3xx answer itself.
func (w *webhook) httpClient() *http.Client {
	c := http.Client{Timeout: webhookTimeout}
	if w.client != nil {
		c = *w.client
	}
	c.CheckRedirect = func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }
	return &c
}

// checkWebhookURL validates a --notify-webhook URL: https, or plain http
// only to this host (a loopback address or localhost), since each POST
// carries a grant link, a secret. Its errors name the host at most, never
// the path or query, which can hold a token.
func checkWebhookURL(raw string) error {
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || u.Opaque != "" {
		return errors.New("notify webhook: want an https://host/path URL")
	}
	switch u.Scheme {
	case "https":
		return nil
	case "http":
		if isLoopbackHost(u.Hostname()) {
			return nil
		}
		return fmt.Errorf("notify webhook at %s: plain http would send grant links in cleartext; use https (http is allowed only to localhost or a loopback address)", u.Host)
	default:
		return fmt.Errorf("notify webhook at %s: scheme %q, want https", u.Host, u.Scheme)
	}
}

// isLoopbackHost reports whether host (without port or brackets) is
// localhost or a loopback IP address.
func isLoopbackHost(host string) bool {
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.Unmap().IsLoopback()
}

// outboxFile appends each approval notice as a JSON line to a 0600 file, for
// deployments that deliver links by other means (a mail pipeline, an
// operator reading it). Links are secrets: the file is owner-only.
type outboxFile struct {
	mu   sync.Mutex
	path string
}

func (o *outboxFile) NotifyApprover(_ context.Context, n service.ApprovalNotice) error {
	line, err := json.Marshal(n)
	if err != nil {
		return fmt.Errorf("encoding notice: %w", err)
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	f, err := os.OpenFile(o.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("opening outbox: %w", err)
	}
	if _, err := f.Write(append(line, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("writing outbox: %w", err)
	}
	return f.Close()
}

// witnessFile appends each signed audit checkpoint as a JSON line and syncs
// it, so that a checkpoint the broker acknowledged survives a crash.
type witnessFile struct {
	mu   sync.Mutex
	path string
}

func (w *witnessFile) Witness(_ context.Context, cp audit.Checkpoint) error {
	line, err := json.Marshal(cp)
	if err != nil {
		return fmt.Errorf("encoding checkpoint: %w", err)
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	f, err := os.OpenFile(w.path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o600)
	if err != nil {
		return fmt.Errorf("opening witness file: %w", err)
	}
	if _, err := f.Write(append(line, '\n')); err != nil {
		f.Close()
		return fmt.Errorf("writing witness file: %w", err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("syncing witness file: %w", err)
	}
	return f.Close()
}

// notifiers delivers a notice through each notifier in turn; every one is
// tried, and the errors are joined. Split sorts them into the quick parts
// (kept in order, so the outbox stays first) and the slow ones.
type notifiers []service.Notifier

func (ns notifiers) NotifyApprover(ctx context.Context, n service.ApprovalNotice) error {
	var errs []error
	for _, x := range ns {
		if err := x.NotifyApprover(ctx, n); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// Split returns the quick parts of ns and the slow parts of those that are
// service.SplitNotifiers; a notifier that is not one is quick. Either result
// is nil when empty.
func (ns notifiers) Split() (quick, slow service.Notifier) {
	var q, s notifiers
	for _, x := range ns {
		xq, xs := x, service.Notifier(nil)
		if sn, ok := x.(service.SplitNotifier); ok {
			xq, xs = sn.Split()
		}
		if xq != nil {
			q = append(q, xq)
		}
		if xs != nil {
			s = append(s, xs)
		}
	}
	if len(q) > 0 {
		quick = q
	}
	if len(s) > 0 {
		slow = s
	}
	return quick, slow
}
