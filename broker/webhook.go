package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"sync"

	"github.com/pinhole-dev/pinhole/broker/service"
	"github.com/pinhole-dev/pinhole/internal/audit"
)

// webhook posts each approval notice as JSON to a URL.
type webhook struct {
	url    string
	client *http.Client
}

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
	resp, err := w.client.Do(req)
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
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("webhook answered %s", resp.Status)
	}
	return nil
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
// tried, and the errors are joined.
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
