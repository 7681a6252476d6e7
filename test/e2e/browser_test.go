package e2e

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/pem"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/security"
	"github.com/chromedp/cdproto/webauthn"
	"github.com/chromedp/chromedp"

	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
	"github.com/pinhole-dev/pinhole/test/harness"
)

// chromiumPath is Debian's Chromium (package chromium; .ci/run installs it).
const chromiumPath = "/usr/bin/chromium"

// browserTimeout bounds everything one browser does, start to exit.
const browserTimeout = 60 * time.Second

// browser is a headless Chromium with one tab that holds a CDP virtual
// authenticator: a USB CTAP2 security key with resident keys and user
// verification that always verifies and needs no touch. The tab keeps the
// authenticator (and the credentials it made) across navigations.
type browser struct {
	t   *testing.T
	ctx context.Context // the tab
	// auth is the virtual authenticator of the tab.
	auth webauthn.AuthenticatorID
	// start is when the browser was asked to start (for timing logs).
	start time.Time

	mu       sync.Mutex
	problems []string // console errors and uncaught exceptions, guarded by mu
	reported int      // how many of problems failed the test, guarded by mu
}

// newBrowser starts Chromium trusting exactly the broker certificate in
// caFile and adds the virtual authenticator. Cleanup stops Chromium and
// fails the test if any Chromium process of this browser is left.
func newBrowser(t *testing.T, caFile string) *browser {
	t.Helper()
	requireTool(t, chromiumPath)
	spki, err := spkiHash(caFile)
	if err != nil {
		t.Fatal(err)
	}
	// A directory of our own (not t.TempDir, whose removal would race a
	// leftover Chromium child) so that leftovers can be found by it.
	dir, err := os.MkdirTemp("", "pinhole-chromium-")
	if err != nil {
		t.Fatal(err)
	}
	opts := []chromedp.ExecAllocatorOption{
		chromedp.ExecPath(chromiumPath),
		chromedp.Headless,
		chromedp.NoSandbox, // tests run as root
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.Flag("disable-quic", true),
		// The machine has no outside network: keep Chromium from trying.
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.UserDataDir(dir),
		// Trust the broker's self-signed certificate by its public key: the
		// pages are then "secure" with no certificate error, as for an
		// approver whose browser trusts the broker's certificate (with
		// --ignore-certificate-errors they are "insecure-broken"). Needs
		// --user-data-dir.
		chromedp.Flag("ignore-certificate-errors-spki-list", spki),
	}
	ctx, cancel := context.WithTimeout(context.Background(), browserTimeout)
	actx, acancel := chromedp.NewExecAllocator(ctx, opts...)
	tctx, tcancel := chromedp.NewContext(actx)
	b := &browser{t: t, ctx: tctx, start: time.Now()}

	var wg sync.WaitGroup
	t.Cleanup(func() {
		if err := chromedp.Cancel(tctx); err != nil {
			t.Errorf("closing chromium: %v", err)
		}
		tcancel()
		acancel() // kills Chromium if it did not close, and waits for it
		wg.Wait()
		cancel()
		b.mu.Lock()
		if late := b.problems[b.reported:]; len(late) > 0 {
			t.Errorf("the page logged errors:\n%s", strings.Join(late, "\n"))
		}
		b.mu.Unlock()
		b.checkNoLeftovers(dir)
		if err := os.RemoveAll(dir); err != nil {
			t.Errorf("removing chromium profile: %v", err)
		}
		t.Logf("chromium ran %s", time.Since(b.start).Round(time.Millisecond))
	})

	// Console starts the browser and the tab, then subscribes.
	messages := chromedp.Console(tctx)
	wg.Add(1)
	go func() {
		defer wg.Done()
		for m, err := range messages {
			if err != nil {
				return // the tab closed
			}
			b.note(m)
		}
	}()
	if _, err := chromedp.Call(tctx, security.Enable, cdp.Empty{}); err != nil {
		t.Fatalf("enabling Security domain: %v", err)
	}
	if _, err := chromedp.Call(tctx, webauthn.Enable, webauthn.EnableParams{}); err != nil {
		t.Fatalf("enabling WebAuthn domain: %v", err)
	}
	res, err := chromedp.Call(tctx, webauthn.AddVirtualAuthenticator, webauthn.AddVirtualAuthenticatorParams{
		Options: &webauthn.VirtualAuthenticatorOptions{
			Protocol:            webauthn.AuthenticatorProtocolCtap2,
			Ctap2version:        webauthn.Ctap2versionCtap21,
			Transport:           webauthn.AuthenticatorTransportUsb,
			HasResidentKey:      true,
			HasUserVerification: true,
			IsUserVerified:      true,
			// Must be sent as true: Go's zero value would leave every
			// create()/get() waiting for a touch forever.
			AutomaticPresenceSimulation: true,
		},
	})
	if err != nil {
		t.Fatalf("adding virtual authenticator: %v", err)
	}
	b.auth = res.AuthenticatorID
	t.Logf("chromium started in %s", time.Since(b.start).Round(time.Millisecond))
	return b
}

// spkiHash is the base64 SHA-256 of the SubjectPublicKeyInfo of the first
// certificate in the PEM file, as --ignore-certificate-errors-spki-list
// wants it.
func spkiHash(pemFile string) (string, error) {
	raw, err := os.ReadFile(pemFile)
	if err != nil {
		return "", fmt.Errorf("reading broker certificate: %w", err)
	}
	blk, _ := pem.Decode(raw)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return "", fmt.Errorf("%s: no PEM certificate", pemFile)
	}
	cert, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return "", fmt.Errorf("parsing broker certificate: %w", err)
	}
	sum := sha256.Sum256(cert.RawSubjectPublicKeyInfo)
	return base64.StdEncoding.EncodeToString(sum[:]), nil
}

// note records a console message; errors and uncaught exceptions are
// problems.
func (b *browser) note(m chromedp.ConsoleMessage) {
	where := ""
	if m.URL != "" {
		where = " (" + m.URL + ":" + strconv.FormatInt(m.Line+1, 10) + ")"
	}
	if m.Exception != nil && m.Exception.Exception != nil && m.Exception.Exception.Description != "" {
		where += "\n" + m.Exception.Exception.Description
	}
	b.t.Logf("chromium console: %s%s", m, where)
	if m.Type == chromedp.ConsoleError || m.IsException() {
		b.mu.Lock()
		b.problems = append(b.problems, m.String()+where)
		b.mu.Unlock()
	}
}

// requireClean fails the test if the page logged an error or threw.
func (b *browser) requireClean(step string) {
	b.t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.problems) > b.reported {
		b.reported = len(b.problems)
		b.t.Fatalf("%s: the page logged errors:\n%s", step, strings.Join(b.problems, "\n"))
	}
}

// open loads url in the tab and requires a 200 page whose certificate
// Chromium accepts as valid (not merely ignored).
func (b *browser) open(url string) {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	start := time.Now()
	states := chromedp.Events(ctx, security.VisibleSecurityStateChanged)
	resp, err := chromedp.Run(ctx, chromedp.NavigateResponse(url))
	if err != nil {
		b.t.Fatalf("opening %s: %v", url, err)
	}
	if resp == nil || resp.Status != 200 {
		b.t.Fatalf("opening %s: response %+v", url, resp)
	}
	if err := chromedp.Do(ctx, chromedp.WaitReady(chromedp.CSS("body"))); err != nil {
		b.t.Fatalf("waiting for %s: %v", url, err)
	}
	// The first state with certificate details is the new page's. The
	// virtual authenticator skips Chromium's TLS check for WebAuthn, so
	// check here that the page is secure the way a real approver's is
	// (with --ignore-certificate-errors it is "insecure-broken").
	for ev, err := range states {
		if err != nil {
			b.t.Fatalf("waiting for the security state of %s: %v", url, err)
		}
		st := ev.VisibleSecurityState
		if st.CertificateSecurityState == nil {
			continue
		}
		if st.SecurityState != security.StateSecure || st.CertificateSecurityState.CertificateNetworkError != "" {
			b.t.Fatalf("%s: security state %s, certificate error %q", url, st.SecurityState, st.CertificateSecurityState.CertificateNetworkError)
		}
		break
	}
	b.t.Logf("opened %s in %s", resp.URL, time.Since(start).Round(time.Millisecond))
}

// text is the text content of the first element matching css.
func (b *browser) text(css string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	s, err := chromedp.Run(ctx, chromedp.TextContent(chromedp.CSS(css)))
	if err != nil {
		b.t.Fatalf("reading %s: %v", css, err)
	}
	return s
}

// attr is an attribute of the first element matching css.
func (b *browser) attr(css, name string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	attrs, err := chromedp.Run(ctx, chromedp.Attributes(chromedp.CSS(css)))
	if err != nil {
		b.t.Fatalf("reading %s: %v", css, err)
	}
	return attrs[name]
}

// click clicks the button matching css (a real mouse click) and returns
// the #status text once the page's script has set it; it fails unless the
// script reported success.
func (b *browser) click(css string) string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 20*time.Second)
	defer cancel()
	start := time.Now()
	if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS(css))); err != nil {
		b.t.Fatalf("clicking %s: %v", css, err)
	}
	if err := chromedp.Do(ctx, chromedp.WaitReady(chromedp.CSS("#status.ok, #status.err"))); err != nil {
		b.t.Fatalf("waiting for the status after clicking %s: %v", css, err)
	}
	status := b.text("#status")
	if cls := b.attr("#status", "class"); cls != "ok" {
		b.t.Fatalf("clicking %s: page says %q", css, status)
	}
	b.t.Logf("clicked %s: %q after %s", css, status, time.Since(start).Round(time.Millisecond))
	return status
}

// credentials lists the credentials the virtual authenticator holds.
func (b *browser) credentials() []*webauthn.Credential {
	b.t.Helper()
	auths, err := chromedp.Call(b.ctx, webauthn.GetCredentials, webauthn.GetCredentialsParams{AuthenticatorID: b.auth})
	if err != nil {
		b.t.Fatalf("listing credentials: %v", err)
	}
	return auths.Credentials
}

// checkNoLeftovers fails the test if a process still runs with the profile
// dir on its command line (Chromium passes it to its children).
func (b *browser) checkNoLeftovers(dir string) {
	b.t.Helper()
	want := []byte("--user-data-dir=" + dir)
	var left []string
	deadline := time.Now().Add(5 * time.Second)
	for {
		left = left[:0]
		entries, _ := os.ReadDir("/proc")
		for _, e := range entries {
			if _, err := strconv.Atoi(e.Name()); err != nil {
				continue
			}
			cmd, err := os.ReadFile("/proc/" + e.Name() + "/cmdline")
			if err == nil && containsArg(cmd, want) {
				left = append(left, e.Name())
			}
		}
		if len(left) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	if len(left) > 0 {
		b.t.Errorf("chromium processes left after close: pids %v", left)
	}
}

func containsArg(cmdline, arg []byte) bool {
	for _, a := range strings.Split(string(cmdline), "\x00") {
		if a == string(arg) {
			return true
		}
	}
	return false
}

// TestBrowserRegisterAndApprove: in real Chromium with a virtual security
// key, an approver registers through the invite page, then approves a
// request through the grant page, which shows what is approved; the request
// is granted and the pages log no errors.
func TestBrowserRegisterAndApprove(t *testing.T) {
	browserDecision(t, "approve")
}

// TestBrowserDeny: as TestBrowserRegisterAndApprove, but the approver
// denies; the request ends denied.
func TestBrowserDeny(t *testing.T) {
	browserDecision(t, "deny")
}

// browserDecision registers approver bob in Chromium, has alice request
// db-prod from an enrolled device, and makes bob's decision on the grant
// page in the same tab (same virtual authenticator).
func browserDecision(t *testing.T, decision string) {
	requireTool(t, chromiumPath) // before starting anything else
	e := newEnv(t)
	br := newBrowser(t, e.caFile)

	inv, err := e.b.Service().InviteUser(e.ctx, store.User{Name: "root", Role: "admin"}, "bob", "approver")
	if err != nil {
		t.Fatalf("inviting bob: %v", err)
	}
	br.open(inv.URL)
	if got := br.text("body"); !strings.Contains(got, "bob") || !strings.Contains(got, "approver") {
		t.Fatalf("invite page does not name bob and his role: %q", got)
	}
	if got := br.click(`button[data-action="register"]`); !strings.Contains(got, "registered") {
		t.Fatalf("after registering, status %q, want it to say registered", got)
	}
	creds := br.credentials()
	if len(creds) != 1 || creds[0].RpID != "localhost" {
		t.Fatalf("virtual authenticator holds %d credentials (want 1 for RP localhost): %+v", len(creds), creds)
	}
	br.requireClean("invite page")

	alice := e.invite("alice", "dba")
	dc := e.deviceClient(e.enroll(alice))
	const reason = "INC-4821 vacuum"
	req, err := dc.CreateRequest(e.ctx, wire.CreateRequest{Target: "db-prod", TTL: "45m", Reason: reason})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(e.ctx, 10*time.Second)
	defer cancel()
	n, err := e.hook.Wait(ctx, req.ID, "bob")
	if err != nil {
		t.Fatal(err)
	}

	br.open(n.URL)
	rows := br.rows()
	for _, c := range []struct{ row, want string }{
		{"requester", "alice"},
		{"target", "db-prod (" + e.sshd.Addr + ", ssh, login " + e.login + ")"},
		{"for", "45m"},
		{"reason", reason},
		{"you", "bob"},
	} {
		if got := rows[c.row]; got != c.want {
			t.Errorf("grant page row %q: got %q, want %q", c.row, got, c.want)
		}
	}
	if !strings.HasPrefix(rows["state"], "pending") {
		t.Errorf("grant page state: got %q, want pending", rows["state"])
	}
	if t.Failed() {
		t.FailNow()
	}

	got := br.click(`button[data-action="decide"][data-decision="` + decision + `"]`)
	switch decision {
	case "approve":
		if !strings.HasPrefix(got, "Approved") {
			t.Fatalf("after approving, status %q, want Approved", got)
		}
		waitGranted(t, e.ctx, dc, req.ID)
	case "deny":
		if got != "Denied." {
			t.Fatalf("after denying, status %q, want Denied.", got)
		}
		var r wire.Request
		waitUntil(t, 10*time.Second, "denial of "+req.ID, func() bool {
			r, err = dc.Request(e.ctx, req.ID)
			return err == nil && r.State == "denied"
		})
	}
	br.requireClean("grant page")
}

// rows maps each table row's header to its cell text.
func (b *browser) rows() map[string]string {
	b.t.Helper()
	ctx, cancel := context.WithTimeout(b.ctx, 10*time.Second)
	defer cancel()
	const js = `Object.fromEntries(Array.from(document.querySelectorAll("tr"), r => [r.cells[0].textContent, r.cells[1].textContent.trim()]))`
	rows, err := chromedp.Run(ctx, chromedp.Evaluate[map[string]string](js))
	if err != nil {
		b.t.Fatalf("reading the table: %v", err)
	}
	return rows
}

// TestBrowserAdminConfirmsInvite: admin ada, whose security key lives in
// Chromium, confirms her workstation and then an invite she asked for from
// it; the confirmation page names who is invited, with which role, by whom
// and from where, and once she touches her key it shows the invite link,
// which then registers the new user.
func TestBrowserAdminConfirmsInvite(t *testing.T) {
	requireTool(t, chromiumPath)
	e := newEnv(t)
	br := newBrowser(t, e.caFile)

	first, err := e.b.Service().InviteUser(e.ctx, store.User{Name: "root", Role: "admin"}, "ada", "admin")
	if err != nil {
		t.Fatal(err)
	}
	br.open(first.URL)
	br.click(`button[data-action="register"]`)
	state := e.enrollWith("ada", func(link string) {
		br.open(link)
		if got := br.click(`button[data-action="confirm"]`); !strings.Contains(got, "confirmed") {
			t.Fatalf("after confirming the workstation, status %q", got)
		}
	})
	br.requireClean("enroll page")

	inv, err := e.deviceClient(state).InviteUser(e.ctx, wire.InviteUser{Name: "carol", Role: "approver"})
	if err != nil {
		t.Fatal(err)
	}
	br.open(inv.ConfirmURL)
	rows := br.rows()
	for _, c := range []struct{ row, want string }{{"new user", "carol"}, {"role", "approver"}, {"asked by", "ada"}} {
		if got := rows[c.row]; got != c.want {
			t.Errorf("invite confirmation row %q: got %q, want %q", c.row, got, c.want)
		}
	}
	got := br.click(`button[data-action="confirm"]`)
	link := regexp.MustCompile(`https://\S+/invite/\S+`).FindString(got)
	if link == "" {
		t.Fatalf("after confirming, status %q shows no invite link", got)
	}
	br.requireClean("invite confirmation page")
	carol, err := harness.NewPerson("carol", e.url, e.caFile)
	if err != nil {
		t.Fatal(err)
	}
	if err := carol.Register(e.ctx, link); err != nil {
		t.Fatalf("carol registering through the link the page showed: %v", err)
	}
}
