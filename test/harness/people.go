// Package harness drives pinhole the way people and machines around it do:
// a person with a (software) security key opening links, a webhook that
// receives grant links, and a real OpenSSH sshd as the target. The
// end-to-end tests and the demo program share it. It lives under test/ and is
// never linked into the production binaries.
package harness

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"html"
	"io"
	"net/http"
	"net/url"
	"os"
	"regexp"
	"strings"
	"time"

	"github.com/pinhole-dev/pinhole/internal/fido/fidotest"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// Person is someone with one security key and a browser.
type Person struct {
	Name   string
	Key    *fidotest.Authenticator
	client *http.Client
	origin string
}

// NewPerson makes a person whose browser trusts the broker certificate in
// caFile and whose security key is bound to brokerURL's origin.
func NewPerson(name, brokerURL, caFile string) (*Person, error) {
	pem, err := os.ReadFile(caFile)
	if err != nil {
		return nil, fmt.Errorf("reading broker certificate: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("no certificate in %s", caFile)
	}
	u, err := url.Parse(brokerURL)
	if err != nil {
		return nil, err
	}
	return &Person{
		Name:   name,
		Key:    fidotest.New(u.Hostname(), brokerURL),
		client: &http.Client{Timeout: 20 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}}},
		origin: brokerURL,
	}, nil
}

// Page is a fetched page.
type Page struct {
	Status int
	Body   string
}

// Open GETs a link like a browser.
func (p *Person) Open(ctx context.Context, link string) (Page, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, link, nil)
	if err != nil {
		return Page{}, err
	}
	resp, err := p.client.Do(req)
	if err != nil {
		return Page{}, fmt.Errorf("opening %s: %w", link, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	return Page{Status: resp.StatusCode, Body: string(b)}, err
}

// post sends JSON the way the page's script does (same-origin fetch).
func (p *Person) post(ctx context.Context, link string, body any) ([]byte, error) {
	b, err := json.Marshal(body)
	if err != nil {
		return nil, err
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, link, bytes.NewReader(b))
	if err != nil {
		return nil, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Origin", p.origin)
	req.Header.Set("Sec-Fetch-Site", "same-origin")
	resp, err := p.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("posting %s: %w", link, err)
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(io.LimitReader(resp.Body, 1<<20))
	if err != nil {
		return nil, err
	}
	if resp.StatusCode/100 != 2 {
		var e struct{ Error string }
		if json.Unmarshal(out, &e) == nil && e.Error != "" {
			return nil, &HTTPError{Status: resp.StatusCode, Msg: e.Error}
		}
		return nil, &HTTPError{Status: resp.StatusCode, Msg: strings.TrimSpace(string(out))}
	}
	return out, nil
}

// HTTPError is a refused page action.
type HTTPError struct {
	Status int
	Msg    string
}

func (e *HTTPError) Error() string { return fmt.Sprintf("%d: %s", e.Status, e.Msg) }

// Register opens an invite link and registers the person's security key.
func (p *Person) Register(ctx context.Context, link string) error {
	if pg, err := p.Open(ctx, link); err != nil || pg.Status != http.StatusOK {
		return fmt.Errorf("invite page: status %d: %v", pg.Status, err)
	}
	opts, err := p.post(ctx, link+"/begin", struct{}{})
	if err != nil {
		return fmt.Errorf("starting registration: %w", err)
	}
	resp, err := p.Key.Register(opts)
	if err != nil {
		return fmt.Errorf("security key: %w", err)
	}
	if _, err := p.post(ctx, link+"/finish", map[string]json.RawMessage{"credential": resp}); err != nil {
		return fmt.Errorf("finishing registration: %w", err)
	}
	return nil
}

// ConfirmDevice opens a device-confirmation link and confirms with the key.
func (p *Person) ConfirmDevice(ctx context.Context, link string) (Page, error) {
	pg, _, err := p.confirm(ctx, link)
	return pg, err
}

// ConfirmInvite opens the invite-confirmation link an admin was given by
// `pinhole admin user add`, confirms with the key and returns the invite the
// page then shows.
func (p *Person) ConfirmInvite(ctx context.Context, link string) (wire.Invite, error) {
	_, out, err := p.confirm(ctx, link)
	if err != nil {
		return wire.Invite{}, err
	}
	var inv wire.Invite
	if err := json.Unmarshal(out, &inv); err != nil || inv.URL == "" {
		return wire.Invite{}, fmt.Errorf("invite confirmation answered %q", out)
	}
	return inv, nil
}

// confirm runs a confirmation page's assertion and returns the page and the
// finish answer.
func (p *Person) confirm(ctx context.Context, link string) (Page, []byte, error) {
	pg, err := p.Open(ctx, link)
	if err != nil || pg.Status != http.StatusOK {
		if err == nil {
			err = &HTTPError{Status: pg.Status, Msg: TextOf(pg.Body)}
		}
		return pg, nil, fmt.Errorf("confirmation page: %w", err)
	}
	opts, err := p.post(ctx, link+"/begin", struct{}{})
	if err != nil {
		return pg, nil, fmt.Errorf("starting confirmation: %w", err)
	}
	resp, err := p.Key.Assert(opts)
	if err != nil {
		return pg, nil, fmt.Errorf("security key: %w", err)
	}
	out, err := p.post(ctx, link+"/finish", map[string]json.RawMessage{"credential": resp})
	if err != nil {
		return pg, nil, fmt.Errorf("finishing confirmation: %w", err)
	}
	return pg, out, nil
}

var viewRE = regexp.MustCompile(`data-view="([0-9a-f]{64})"`)

// ViewHash extracts the content hash a grant page commits to.
func ViewHash(page string) (string, error) {
	m := viewRE.FindStringSubmatch(page)
	if m == nil {
		return "", fmt.Errorf("grant page has no view hash")
	}
	return m[1], nil
}

// Decide opens a grant link and approves (or denies) with the security key.
// It returns the page the person saw.
func (p *Person) Decide(ctx context.Context, link string, approve bool) (Page, error) {
	pg, err := p.Open(ctx, link)
	if err != nil {
		return pg, err
	}
	if pg.Status != http.StatusOK {
		return pg, &HTTPError{Status: pg.Status, Msg: TextOf(pg.Body)}
	}
	view, err := ViewHash(pg.Body)
	if err != nil {
		return pg, err
	}
	return pg, p.DecideWithView(ctx, link, approve, view)
}

// DecideWithView runs the approval ceremony committing to view.
func (p *Person) DecideWithView(ctx context.Context, link string, approve bool, view string) error {
	decision := "deny"
	if approve {
		decision = "approve"
	}
	opts, err := p.post(ctx, link+"/begin", map[string]string{"decision": decision, "view_hash": view})
	if err != nil {
		return err
	}
	resp, err := p.Key.Assert(opts)
	if err != nil {
		return fmt.Errorf("security key: %w", err)
	}
	_, err = p.post(ctx, link+"/finish", map[string]any{"decision": decision, "credential": json.RawMessage(resp)})
	return err
}

var tagRE = regexp.MustCompile(`<[^>]*>`)
var spaceRE = regexp.MustCompile(`[ \t]*\n[\s]*`)

// TextOf strips a page to its visible text, one table row a line.
func TextOf(page string) string {
	if i := strings.Index(page, "<body"); i >= 0 {
		page = page[i:]
	}
	page = strings.NewReplacer("</tr>", "\n", "</h1>", "\n", "</p>", "\n", "<br>", "; ", "</th>", ": ").Replace(page)
	t := tagRE.ReplaceAllString(page, "")
	t = html.UnescapeString(t)
	return strings.TrimSpace(spaceRE.ReplaceAllString(t, "\n"))
}

// DecideWithViewAnyCredential is DecideWithView with the options' list of
// allowed credentials removed, so the person's key signs with its own
// credential whatever the server asked for (a hostile browser).
func (p *Person) DecideWithViewAnyCredential(ctx context.Context, link string, approve bool, view string) error {
	decision := "deny"
	if approve {
		decision = "approve"
	}
	opts, err := p.post(ctx, link+"/begin", map[string]string{"decision": decision, "view_hash": view})
	if err != nil {
		return err
	}
	var m map[string]any
	if err := json.Unmarshal(opts, &m); err != nil {
		return err
	}
	delete(m, "allowCredentials")
	opts, _ = json.Marshal(m)
	resp, err := p.Key.Assert(opts)
	if err != nil {
		return fmt.Errorf("security key: %w", err)
	}
	_, err = p.post(ctx, link+"/finish", map[string]any{"decision": decision, "credential": json.RawMessage(resp)})
	return err
}

// SetBroker points the person's browser at a broker that moved to another
// port (after a restart in tests). The security key stays bound to the RP ID.
func (p *Person) SetBroker(brokerURL string) {
	p.origin = brokerURL
	p.Key.SetOrigin(brokerURL)
}
