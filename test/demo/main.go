// Command pinhole-demo walks pinhole's main job end to end on embedded
// defaults (SQLite, self-generated keys, a local target) using the three real
// binaries, and prints each step as a user would see it. People are played by
// software FIDO2 authenticators (internal/fido/fidotest): that is why this
// program lives under test/ and is never part of the production binaries.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"os/signal"
	"os/user"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/test/harness"
)

func main() {
	bin := flag.String("bin", "bin", "directory holding pinhole, pinhole-broker and pinhole-agent")
	keep := flag.Bool("keep", false, "keep the demo's data directory")
	ttl := flag.Duration("ttl", 20*time.Second, "how long the demo grant lasts")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	d := &demo{bin: *bin, ttl: *ttl, out: os.Stdout}
	err := d.run(ctx)
	d.cleanup()
	cancel()
	stop()
	if !*keep && d.dir != "" {
		os.RemoveAll(d.dir)
	} else if d.dir != "" {
		fmt.Printf("data kept in %s\n", d.dir)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "\ndemo: FAILED: %v\n", err)
		os.Exit(1)
	}
	fmt.Println("\ndemo: OK")
}

type demo struct {
	bin   string
	ttl   time.Duration
	out   io.Writer
	dir   string
	step  int
	mu    sync.Mutex
	procs []*exec.Cmd
	stops []func()
}

func (d *demo) say(format string, args ...any) {
	d.step++
	fmt.Fprintf(d.out, "\n[%d] %s\n", d.step, fmt.Sprintf(format, args...))
}

func (d *demo) note(format string, args ...any) {
	fmt.Fprintf(d.out, "    %s\n", fmt.Sprintf(format, args...))
}

func indent(s string) string {
	s = strings.TrimRight(s, "\n")
	if s == "" {
		return ""
	}
	return "      " + strings.ReplaceAll(s, "\n", "\n      ")
}

func (d *demo) path(name string) string { return filepath.Join(d.bin, name) }

// cmd runs a binary to completion, shows the command and its output, and
// returns the output.
func (d *demo) cmd(ctx context.Context, show string, name string, args ...string) (string, error) {
	fmt.Fprintf(d.out, "    $ %s\n", show)
	c := exec.CommandContext(ctx, d.path(name), args...)
	out, err := c.CombinedOutput()
	if s := indent(string(out)); s != "" {
		fmt.Fprintln(d.out, s)
	}
	if err != nil {
		return string(out), fmt.Errorf("%s: %w", show, err)
	}
	return string(out), nil
}

// background starts a long-running binary with its output in logfile.
func (d *demo) background(name, logfile string, args ...string) (*exec.Cmd, error) {
	f, err := os.Create(logfile)
	if err != nil {
		return nil, err
	}
	c := exec.Command(d.path(name), args...)
	c.Stdout, c.Stderr = f, f
	c.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := c.Start(); err != nil {
		f.Close()
		return nil, err
	}
	d.mu.Lock()
	d.procs = append(d.procs, c)
	d.mu.Unlock()
	go func() { c.Wait(); f.Close() }()
	return c, nil
}

func (d *demo) cleanup() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, c := range d.procs {
		if c.Process != nil {
			c.Process.Signal(syscall.SIGTERM)
		}
	}
	deadline := time.Now().Add(3 * time.Second)
	for _, c := range d.procs {
		for c.ProcessState == nil && time.Now().Before(deadline) {
			time.Sleep(20 * time.Millisecond)
		}
		if c.ProcessState == nil && c.Process != nil {
			c.Process.Kill()
		}
	}
	for i := len(d.stops) - 1; i >= 0; i-- {
		d.stops[i]()
	}
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

var urlRE = regexp.MustCompile(`https://\S+`)

// waitFor polls cond every 50 ms until it holds or ctx ends.
func waitFor(ctx context.Context, what string, cond func() bool) error {
	for !cond() {
		select {
		case <-ctx.Done():
			return fmt.Errorf("waiting for %s: %w", what, ctx.Err())
		case <-time.After(50 * time.Millisecond):
		}
	}
	return nil
}

func (d *demo) run(ctx context.Context) error {
	for _, b := range []string{"pinhole", "pinhole-broker", "pinhole-agent"} {
		if _, err := os.Stat(d.path(b)); err != nil {
			return fmt.Errorf("binary %s missing (run make build): %w", b, err)
		}
	}
	var err error
	if d.dir, err = os.MkdirTemp("", "pinhole-demo-"); err != nil {
		return err
	}
	me, err := user.Current()
	if err != nil {
		return err
	}
	fmt.Fprintf(d.out, "pinhole demo — data in %s\n", d.dir)

	// The target.
	target, err := d.startTarget(me.Username)
	if err != nil {
		return err
	}

	// Broker config and first admin.
	port, err := freePort()
	if err != nil {
		return err
	}
	hook, err := harness.StartWebhook()
	if err != nil {
		return err
	}
	d.stops = append(d.stops, func() { hook.Close() })
	cfgPath := filepath.Join(d.dir, "pinhole.yaml")
	if err := os.WriteFile(cfgPath, []byte(demoConfig(target.addr, me.Username, target.hostKey)), 0o600); err != nil {
		return err
	}
	data := filepath.Join(d.dir, "broker")
	listen := fmt.Sprintf("127.0.0.1:%d", port)
	d.say("Admin creates the first admin (no passwords anywhere: invite links and security keys)")
	out, err := d.cmd(ctx, "pinhole-broker bootstrap --data DATA --config pinhole.yaml --admin ada", "pinhole-broker",
		"bootstrap", "--data", data, "--config", cfgPath, "--admin", "ada", "--listen", listen)
	if err != nil {
		return err
	}
	adaInvite := urlRE.FindString(out)

	d.say("Broker starts (SQLite store, self-generated TLS/SSH CA/WireGuard/audit keys, all 0600)")
	if _, err := d.background("pinhole-broker", filepath.Join(d.dir, "broker.log"), "serve", "--data", data, "--config", cfgPath,
		"--listen", listen, "--wg-port", "0", "--notify-webhook", hook.URL, "--audit-witness", filepath.Join(d.dir, "witness.jsonl")); err != nil {
		return err
	}
	caFile := filepath.Join(data, "tls", "cert.pem")
	brokerURL := fmt.Sprintf("https://localhost:%d", port)
	if err := waitFor(ctx, "broker", func() bool {
		c, err := net.Dial("tcp", listen)
		if err == nil {
			c.Close()
		}
		return err == nil
	}); err != nil {
		return d.withLog(err, "broker.log")
	}
	d.note("broker at %s", brokerURL)
	if target.start != nil {
		ca, err := userCA(ctx, brokerURL, caFile)
		if err != nil {
			return err
		}
		if err := target.start(ca); err != nil {
			return err
		}
	}

	people := map[string]*harness.Person{}
	for _, n := range []string{"ada", "alice", "bob"} {
		if people[n], err = harness.NewPerson(n, brokerURL, caFile); err != nil {
			return err
		}
	}
	d.note("ada opens her invite link and registers her security key (user verification required)")
	if err := people["ada"].Register(ctx, adaInvite); err != nil {
		return err
	}

	d.say("ada enrolls her workstation and confirms it with her key")
	adaState := filepath.Join(d.dir, "ada-workstation")
	adaSock, err := d.enroll(ctx, people["ada"], brokerURL, caFile, adaState)
	if err != nil {
		return err
	}

	d.say("ada invites alice (role dba) and bob (role approver)")
	for _, u := range [][2]string{{"alice", "dba"}, {"bob", "approver"}} {
		out, err := d.cmd(ctx, "pinhole admin user add "+u[0]+" --role "+u[1], "pinhole", "--agent", adaSock, "admin", "user", "add", u[0], "--role", u[1])
		if err != nil {
			return err
		}
		inv, err := people["ada"].ConfirmInvite(ctx, urlRE.FindString(out))
		if err != nil {
			return fmt.Errorf("ada confirming the invite of %s: %w", u[0], err)
		}
		d.note("ada confirmed with her security key; the page shows %s's invite link", u[0])
		if err := people[u[0]].Register(ctx, inv.URL); err != nil {
			return fmt.Errorf("%s registering: %w", u[0], err)
		}
		d.note("%s registered a security key", u[0])
	}

	d.say("alice enrolls her workstation; her agent sends a signed posture report")
	aliceState := filepath.Join(d.dir, "alice-workstation")
	aliceSock, err := d.enroll(ctx, people["alice"], brokerURL, caFile, aliceState)
	if err != nil {
		return err
	}

	d.say("alice asks for db-prod for %s with a reason", d.ttl)
	reqCmd := exec.CommandContext(ctx, d.path("pinhole"), "--agent", aliceSock, "request", "db-prod", "--for", d.ttl.String(), "--reason", "INC-4821 vacuum bloated table")
	fmt.Fprintf(d.out, "    $ pinhole request db-prod --for %s --reason \"INC-4821 vacuum bloated table\"\n", d.ttl)
	reqOut := &lineBuffer{w: d.out}
	reqCmd.Stdout, reqCmd.Stderr = reqOut, reqOut
	if err := reqCmd.Start(); err != nil {
		return err
	}
	var reqID string
	if err := waitFor(ctx, "request id", func() bool {
		reqID = regexp.MustCompile(`\br-[0-9a-f]{16}\b`).FindString(reqOut.String())
		return reqID != "" || reqCmd.ProcessState != nil
	}); err != nil || reqID == "" {
		return fmt.Errorf("request did not print an id: %v\n%s", err, reqOut.String())
	}

	d.say("bob receives his grant link and approves with his security key")
	n, err := hook.Wait(ctx, reqID, "bob")
	if err != nil {
		return err
	}
	d.note("webhook → bob: %s", n.URL[:strings.LastIndex(n.URL, "/")+1]+"…")
	pg, err := people["bob"].Decide(ctx, n.URL, true)
	if err != nil {
		return fmt.Errorf("approving: %w", err)
	}
	fmt.Fprintln(d.out, indent(pageSummary(pg.Body)))
	d.note("approved; the WebAuthn challenge committed to the hash of exactly that page")
	if err := reqCmd.Wait(); err != nil {
		return fmt.Errorf("pinhole request: %w\n%s", err, reqOut.String())
	}

	d.say("alice connects with the system ssh through her tunnel (recorded by the broker's SSH proxy)")
	if err := d.sshRun(ctx, aliceSock, "echo hello from $(hostname) as $(id -un); uname -sr"); err != nil {
		return err
	}

	d.say("anything not granted is refused by the gateway (and audited as flow.denied)")
	out, err = d.cmd(ctx, "pinhole probe db-prod --port 5432", "pinhole", "--agent", aliceSock, "probe", "db-prod", "--port", "5432")
	if err == nil || !strings.Contains(strings.ToLower(out), "refused") {
		return fmt.Errorf("probe of an ungranted port was not refused: %v", err)
	}

	d.say("alice starts a long session; the grant runs out and the broker cuts it")
	ends, err := grantEnds(ctx, aliceSock, reqID)
	if err != nil {
		return err
	}
	d.note("grant ends at %s (in %s)", ends.Format("15:04:05"), time.Until(ends).Round(time.Second))
	if err := d.longSession(ctx, aliceSock, ends); err != nil {
		return err
	}

	d.say("security replays the recording")
	recs, err := client.ForAgent(adaSock).Recordings(ctx)
	if err != nil || len(recs) == 0 {
		return fmt.Errorf("listing recordings: %v (%d)", err, len(recs))
	}
	if _, err := d.cmd(ctx, "pinhole recordings", "pinhole", "--agent", adaSock, "recordings"); err != nil {
		return err
	}
	first := recs[len(recs)-1]
	if _, err := d.cmd(ctx, "pinhole play "+first.ID+" --speed 20", "pinhole", "--agent", adaSock, "play", first.ID, "--speed", "20"); err != nil {
		return err
	}

	d.say("security verifies the tamper-evident audit log")
	d.note("the broker signs a checkpoint of the chain's head every 10 s and appends it to a witness file")
	if err := waitFor(ctx, "a witnessed checkpoint", func() bool {
		b, _ := os.ReadFile(filepath.Join(d.dir, "witness.jsonl"))
		return len(b) > 0
	}); err != nil {
		return err
	}
	out, err = d.cmd(ctx, "pinhole audit verify --witness witness.jsonl", "pinhole", "--agent", adaSock, "audit", "verify", "--witness", filepath.Join(d.dir, "witness.jsonl"))
	if err != nil {
		return err
	}
	if !strings.Contains(out, "verified") {
		return errors.New("audit verify did not report success")
	}
	return nil
}

func (d *demo) withLog(err error, name string) error {
	b, _ := os.ReadFile(filepath.Join(d.dir, name))
	return fmt.Errorf("%w\n--- %s ---\n%s", err, name, b)
}

// enroll runs pinhole-agent enroll, confirms the link as p, then starts the agent.
func (d *demo) enroll(ctx context.Context, p *harness.Person, brokerURL, caFile, state string) (string, error) {
	fmt.Fprintf(d.out, "    $ pinhole-agent enroll --broker %s --ca CA --user %s\n", brokerURL, p.Name)
	c := exec.CommandContext(ctx, d.path("pinhole-agent"), "enroll", "--broker", brokerURL, "--ca", caFile, "--user", p.Name, "--state", state)
	out := &lineBuffer{w: d.out}
	c.Stdout, c.Stderr = out, out
	if err := c.Start(); err != nil {
		return "", err
	}
	var link string
	if err := waitFor(ctx, "confirmation link", func() bool {
		for _, u := range urlRE.FindAllString(out.String(), -1) {
			if strings.Contains(u, "/enroll/") {
				link = u
			}
		}
		return link != ""
	}); err != nil {
		return "", err
	}
	pg, err := p.ConfirmDevice(ctx, link)
	if err != nil {
		return "", fmt.Errorf("confirming device: %w", err)
	}
	d.note("%s opened the link, saw the device fingerprint and confirmed:", p.Name)
	fmt.Fprintln(d.out, indent(pageSummary(pg.Body)))
	if err := c.Wait(); err != nil {
		return "", fmt.Errorf("pinhole-agent enroll: %w", err)
	}
	if _, err := d.background("pinhole-agent", state+".log", "run", "--state", state, "--posture-every", "30s"); err != nil {
		return "", err
	}
	sock := filepath.Join(state, "agent.sock")
	if err := waitFor(ctx, "agent socket", func() bool {
		_, err := client.ForAgent(sock).LocalStatus(ctx)
		return err == nil
	}); err != nil {
		return "", err
	}
	d.note("agent running (state %s, local API %s)", filepath.Base(state), filepath.Base(sock))
	return sock, nil
}

func grantEnds(ctx context.Context, sock, id string) (time.Time, error) {
	st, err := client.ForAgent(sock).LocalStatus(ctx)
	if err != nil {
		return time.Time{}, err
	}
	for _, t := range st.Tunnels {
		if t.Request == id {
			return t.ExpiresAt, nil
		}
	}
	return time.Time{}, fmt.Errorf("no tunnel for %s", id)
}

func pageSummary(html string) string {
	var keep []string
	for _, l := range strings.Split(harness.TextOf(html), "\n") {
		if strings.Contains(l, ":") && !strings.HasPrefix(l, "Your security-key") {
			keep = append(keep, strings.TrimSpace(l))
		}
	}
	return strings.Join(keep, "\n")
}

// lineBuffer copies a process's output to the demo's output as it comes and
// keeps it for matching.
type lineBuffer struct {
	mu  sync.Mutex
	buf strings.Builder
	w   io.Writer
	sc  []byte
}

func (l *lineBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.buf.Write(p)
	l.sc = append(l.sc, p...)
	for {
		i := strings.IndexByte(string(l.sc), '\n')
		if i < 0 {
			break
		}
		fmt.Fprintf(l.w, "      %s\n", l.sc[:i])
		l.sc = l.sc[i+1:]
	}
	return len(p), nil
}

func (l *lineBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.buf.String()
}
