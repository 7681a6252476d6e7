package agent

import (
	"context"
	"crypto/ed25519"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"time"

	"golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/agent/tunnel"
	"github.com/pinhole-dev/pinhole/internal/client"
	"github.com/pinhole-dev/pinhole/internal/sshca"
	"github.com/pinhole-dev/pinhole/internal/wgkey"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// grant is one grant the agent is activating or holds a tunnel for.
type grant struct {
	id     string
	cancel context.CancelFunc // ends the grant's goroutine

	// Guarded by Agent.mu.
	up        bool
	info      wire.Tunnel
	tun       Tunnel         // set while up
	dst       netip.AddrPort // the granted destination; set while up
	endState  string         // set by endGrant before cancel
	endReason string
}

// startGrant starts the goroutine that activates grant id and keeps its
// tunnel up, unless the grant is already known.
func (a *Agent) startGrant(ctx context.Context, id string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if _, ok := a.grants[id]; ok {
		return
	}
	if _, ok := a.ended[id]; ok {
		a.log.Debug("grant already ended; not activating", "request", id)
		return
	}
	gctx, cancel := context.WithCancel(ctx)
	g := &grant{id: id, cancel: cancel}
	a.grants[id] = g
	a.grantWG.Go(func() { a.runGrant(gctx, g) })
}

// endGrant records that id ended (state "ended") or was closed before a
// grant, and stops its tunnel if it has one.
func (a *Agent) endGrant(id, state, reason string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if g := a.grants[id]; g != nil {
		if g.endState == "" {
			g.endState, g.endReason = state, reason
		}
		g.cancel()
		return
	}
	a.recordEndedLocked(id, state, reason)
}

// finishGrant forgets g and records why it ended.
func (a *Agent) finishGrant(g *grant, state, reason string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if g.endState != "" {
		state, reason = g.endState, g.endReason
	}
	delete(a.grants, g.id)
	a.recordEndedLocked(g.id, state, reason)
}

// runGrant activates g, brings its tunnel up and tears it down when the
// grant ends, expires or the agent stops.
func (a *Agent) runGrant(ctx context.Context, g *grant) {
	defer g.cancel()
	log := a.log.With("request", g.id)

	act, keys, err := a.activate(ctx, g.id)
	if err != nil {
		state, reason := "failed", err.Error()
		if ctx.Err() != nil {
			state, reason = "ended", "the agent stopped"
		}
		log.Warn("grant not activated", "err", err)
		a.finishGrant(g, state, reason)
		return
	}
	dir := filepath.Join(a.cfg.StateDir, grantsDir, g.id)
	tun, info, err := a.bringUp(ctx, dir, act, keys)
	if err != nil {
		log.Error("bringing tunnel up failed", "err", err)
		if rerr := os.RemoveAll(dir); rerr != nil {
			log.Error("removing grant files failed", "err", rerr)
		}
		a.finishGrant(g, "failed", err.Error())
		return
	}

	a.mu.Lock()
	g.up, g.info, g.tun, g.dst = true, info, tun, act.dst
	a.notifyLocked()
	a.mu.Unlock()
	log.Info(fmt.Sprintf("tunnel up: %s via %s until %s", info.Target, info.Local, info.ExpiresAt.UTC().Format(time.RFC3339)),
		"target", info.Target, "local", info.Local, "expires", info.ExpiresAt)

	state, reason := "ended", "the agent stopped"
	// The broker ends the grant's flows itself at expiry (and tells SSH users
	// why); the local timer is the backstop for when its word never comes, so
	// it fires a little later rather than racing the broker's reason.
	timer := time.NewTimer(act.expires.Add(expiryGrace).Sub(a.cfg.Now()))
	select {
	case <-ctx.Done():
	case <-timer.C:
		state, reason = "expired", "the grant expired"
	}
	timer.Stop()

	// Mark the tunnel down before closing it, so nobody is handed a dead one.
	a.mu.Lock()
	g.up, g.tun = false, nil
	byBroker := g.endState != ""
	if byBroker {
		state, reason = g.endState, g.endReason
	}
	a.mu.Unlock()
	if byBroker {
		// The broker is cutting the grant's flows and telling its sessions
		// why; let that reach the user rather than cut it off.
		end := a.cfg.Now()
		if act.expires.Before(end) {
			end = act.expires
		}
		dctx, cancel := context.WithDeadline(context.WithoutCancel(ctx), end.Add(goodbyeGrace))
		tun.Drain(dctx)
		cancel()
	}
	if err := tun.Close(); err != nil {
		log.Error("closing tunnel failed", "err", err)
	}
	if err := os.RemoveAll(dir); err != nil {
		log.Error("removing grant files failed", "err", err)
	}
	log.Info(fmt.Sprintf("tunnel down: %s (%s)", info.Target, reason), "target", info.Target, "state", state, "reason", reason)
	a.finishGrant(g, state, reason)
}

// grantKeys are the fresh per-grant keys.
type grantKeys struct {
	wg     wgkey.Private
	sshKey ed25519.PrivateKey
	sshPub ssh.PublicKey
}

// activate makes fresh keys and sends their public halves to the broker,
// retrying while the broker is unreachable. A refusal by the broker (a 4xx
// answer) or an unusable activation is final.
func (a *Agent) activate(ctx context.Context, id string) (activation, grantKeys, error) {
	wgPriv, err := wgkey.NewPrivate(a.cfg.Rand)
	if err != nil {
		return activation{}, grantKeys{}, err
	}
	// sshca.NewKey hides the private key behind ssh.Signer, but the OpenSSH
	// client needs it in a file, so the key is made here.
	sshPubRaw, sshKey, err := ed25519.GenerateKey(a.cfg.Rand)
	if err != nil {
		return activation{}, grantKeys{}, fmt.Errorf("generating SSH key: %w", err)
	}
	sshPub, err := ssh.NewPublicKey(sshPubRaw)
	if err != nil {
		return activation{}, grantKeys{}, fmt.Errorf("encoding SSH key: %w", err)
	}
	keys := grantKeys{wg: wgPriv, sshKey: sshKey, sshPub: sshPub}
	req := wire.ActivateRequest{WireGuardPublicKey: wgPriv.Public().String(), SSHPublicKey: sshca.AuthorizedKey(sshPub)}

	var bo backoff
	for {
		cctx, cancel := context.WithTimeout(ctx, callTimeout)
		raw, err := a.client.Activate(cctx, id, req)
		cancel()
		if err == nil {
			act, err := parseActivation(ctx, id, raw, sshPub, a.cfg.Now(), lookupIP)
			if err != nil {
				return activation{}, grantKeys{}, fmt.Errorf("unusable activation: %w", err)
			}
			return act, keys, nil
		}
		var apiErr *client.APIError
		if errors.As(err, &apiErr) && apiErr.Status >= 400 && apiErr.Status < 500 && apiErr.Status != 408 && apiErr.Status != 429 {
			return activation{}, grantKeys{}, fmt.Errorf("the broker refused activation: %w", err)
		}
		if ctx.Err() != nil {
			return activation{}, grantKeys{}, ctx.Err()
		}
		d := bo.next()
		a.log.Warn("activating grant failed; retrying", "request", id, "err", err, "retry_in", d.Round(time.Millisecond))
		if !sleep(ctx, d) {
			return activation{}, grantKeys{}, ctx.Err()
		}
	}
}

// activation is a validated wire.Activation.
type activation struct {
	raw        wire.Activation
	addr       netip.Addr
	peer       wgkey.Public
	endpoint   netip.AddrPort
	dst        netip.AddrPort
	expires    time.Time
	cert       *ssh.Certificate // nil when the broker sent none
	hostCAKeys []ssh.PublicKey
}

// Bounds on activation fields.
const (
	maxHostCAKeys = 16
	maxFieldLen   = 16 << 10
)

var (
	hostAliasPattern = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._:-]{0,252}$`)
	loginPattern     = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9._-]{0,63}$`)
)

// parseActivation checks every field of an activation for grant id and
// refuses anything it would have to guess about. A hostname endpoint is
// resolved with ctx.
func parseActivation(ctx context.Context, id string, w wire.Activation, sshPub ssh.PublicKey, now time.Time, lookup lookupFunc) (activation, error) {
	act := activation{raw: w, expires: w.ExpiresAt}
	var errs []error
	bad := func(format string, args ...any) { errs = append(errs, fmt.Errorf(format, args...)) }

	if w.Request != "" && w.Request != id {
		bad("activation is for request %q, not %q", w.Request, id)
	}
	if w.Target == "" || len(w.Target) > 256 || strings.ContainsFunc(w.Target, isSpaceOrControl) {
		bad("invalid target %q", w.Target)
	}
	if w.Login != "" && !loginPattern.MatchString(w.Login) {
		bad("invalid login %q", w.Login)
	}
	if a, err := parseTunnelAddress(w.TunnelAddress); err != nil {
		bad("tunnel address: %v", err)
	} else {
		act.addr = a
	}
	if p, err := wgkey.ParsePublic(w.GatewayPublicKey); err != nil {
		bad("gateway public key: %v", err)
	} else {
		act.peer = p
	}
	if ap, err := resolveEndpoint(ctx, w.GatewayEndpoint, lookup); err != nil {
		bad("gateway endpoint: %v", err)
	} else {
		act.endpoint = ap
	}
	if ap, err := netip.ParseAddrPort(w.Destination); err != nil || ap.Port() == 0 || ap.Addr().Zone() != "" {
		bad("invalid destination %q", w.Destination)
	} else {
		act.dst = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	if !w.ExpiresAt.After(now) {
		bad("grant expired at %s", w.ExpiresAt.UTC().Format(time.RFC3339))
	}
	if w.SSHCertificate != "" {
		cert, err := parseCert(w.SSHCertificate, sshPub)
		if err != nil {
			bad("SSH certificate: %v", err)
		}
		act.cert = cert
	} else if w.Protocol == "ssh" {
		bad("protocol ssh but no SSH certificate")
	}
	if len(w.HostCAKeys) > maxHostCAKeys {
		bad("%d host CA keys (max %d)", len(w.HostCAKeys), maxHostCAKeys)
	} else {
		for i, k := range w.HostCAKeys {
			pub, err := parseOneKey(k)
			if err != nil {
				bad("host CA key %d: %v", i, err)
				continue
			}
			act.hostCAKeys = append(act.hostCAKeys, pub)
		}
	}
	if len(w.HostCAKeys) > 0 && !hostAliasPattern.MatchString(w.HostKeyAlias) {
		bad("invalid host key alias %q", w.HostKeyAlias)
	}
	if err := errors.Join(errs...); err != nil {
		return activation{}, err
	}
	return act, nil
}

func isSpaceOrControl(r rune) bool { return r <= ' ' || r == 0x7f }

// parseTunnelAddress accepts "10.0.0.2" or "10.0.0.2/32".
func parseTunnelAddress(s string) (netip.Addr, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Addr{}, err
		}
		if !p.IsSingleIP() {
			return netip.Addr{}, fmt.Errorf("%q is not a single address", s)
		}
		s = p.Addr().String()
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, err
	}
	a = a.Unmap()
	if a.IsUnspecified() || a.IsMulticast() || a.Zone() != "" {
		return netip.Addr{}, fmt.Errorf("%q is not a usable address", s)
	}
	return a, nil
}

// lookupFunc resolves a host name to addresses.
type lookupFunc func(ctx context.Context, host string) ([]netip.Addr, error)

// lookupIP resolves with the system resolver.
func lookupIP(ctx context.Context, host string) ([]netip.Addr, error) {
	return net.DefaultResolver.LookupNetIP(ctx, "ip", host)
}

// resolveEndpoint accepts "ip:port" or "host:port" with a numeric port.
func resolveEndpoint(ctx context.Context, s string, lookup lookupFunc) (netip.AddrPort, error) {
	if ap, err := netip.ParseAddrPort(s); err == nil {
		if ap.Port() == 0 || ap.Addr().IsUnspecified() || ap.Addr().Zone() != "" {
			return netip.AddrPort{}, fmt.Errorf("%q is not a usable endpoint", s)
		}
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()), nil
	}
	host, port, err := net.SplitHostPort(s)
	if err != nil || host == "" || len(host) > 253 || strings.ContainsFunc(host, isSpaceOrControl) {
		return netip.AddrPort{}, fmt.Errorf("%q is not host:port", s)
	}
	pn, err := strconv.ParseUint(port, 10, 16)
	if err != nil || pn == 0 {
		return netip.AddrPort{}, fmt.Errorf("%q: bad port", s)
	}
	addrs, err := lookup(ctx, host)
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("resolving %s: %w", host, err)
	}
	for _, a := range addrs {
		if a = a.Unmap(); a.IsValid() && !a.IsUnspecified() {
			return netip.AddrPortFrom(a, uint16(pn)), nil
		}
	}
	return netip.AddrPort{}, fmt.Errorf("%s has no usable address", host)
}

// parseOneKey parses exactly one authorized_keys line.
func parseOneKey(line string) (ssh.PublicKey, error) {
	if len(line) > maxFieldLen || strings.ContainsAny(line, "\r\n") {
		return nil, errors.New("not a single authorized_keys line")
	}
	pub, _, _, rest, err := ssh.ParseAuthorizedKey([]byte(line))
	if err != nil {
		return nil, err
	}
	if len(strings.TrimSpace(string(rest))) != 0 {
		return nil, errors.New("trailing data after the key")
	}
	return pub, nil
}

// parseCert parses the grant's user certificate and checks that it
// certifies the key the agent sent.
func parseCert(line string, sshPub ssh.PublicKey) (*ssh.Certificate, error) {
	pub, err := parseOneKey(line)
	if err != nil {
		return nil, err
	}
	cert, ok := pub.(*ssh.Certificate)
	if !ok {
		return nil, errors.New("not a certificate")
	}
	if cert.CertType != ssh.UserCert {
		return nil, errors.New("not a user certificate")
	}
	if string(cert.Key.Marshal()) != string(sshPub.Marshal()) {
		return nil, errors.New("certificate is not for this grant's key")
	}
	return cert, nil
}

// bringUp writes the grant's files into dir and starts its tunnel with a
// loopback listener.
func (a *Agent) bringUp(ctx context.Context, dir string, act activation, keys grantKeys) (Tunnel, wire.Tunnel, error) {
	info, err := writeGrantFiles(dir, act, keys)
	if err != nil {
		return nil, wire.Tunnel{}, err
	}
	if err := ctx.Err(); err != nil {
		return nil, wire.Tunnel{}, err
	}
	tun, err := a.cfg.NewTunnel(tunnel.Config{
		PrivateKey: keys.wg,
		Address:    act.addr,
		Peer:       act.peer,
		Endpoint:   act.endpoint,
		AllowedIP:  netip.PrefixFrom(act.dst.Addr(), act.dst.Addr().BitLen()),
		KeepAlive:  keepAlive,
		Logger:     a.log.With("component", "tunnel", "request", act.raw.Request),
	})
	if err != nil {
		return nil, wire.Tunnel{}, fmt.Errorf("starting tunnel: %w", err)
	}
	local, err := tun.Listen("127.0.0.1:0", act.dst)
	if err != nil {
		tun.Close()
		return nil, wire.Tunnel{}, fmt.Errorf("starting local listener: %w", err)
	}
	info.Local = local.String()
	return tun, info, nil
}

// writeGrantFiles writes the grant's SSH key, certificate and known_hosts
// into dir (0700, files 0600) and returns the tunnel description without
// its local address.
func writeGrantFiles(dir string, act activation, keys grantKeys) (wire.Tunnel, error) {
	if err := os.MkdirAll(filepath.Dir(dir), 0o700); err != nil {
		return wire.Tunnel{}, fmt.Errorf("creating grant directory: %w", err)
	}
	if err := os.Mkdir(dir, 0o700); err != nil {
		return wire.Tunnel{}, fmt.Errorf("creating grant directory: %w", err)
	}
	info := wire.Tunnel{
		Request:   act.raw.Request,
		Target:    act.raw.Target,
		Protocol:  act.raw.Protocol,
		Login:     act.raw.Login,
		ExpiresAt: act.expires,
	}
	if info.Request == "" {
		info.Request = filepath.Base(dir)
	}
	block, err := ssh.MarshalPrivateKey(keys.sshKey, "pinhole grant "+info.Request)
	if err != nil {
		return wire.Tunnel{}, fmt.Errorf("encoding SSH key: %w", err)
	}
	info.KeyFile = filepath.Join(dir, grantKeyFile)
	if err := writeFileAtomic(info.KeyFile, pem.EncodeToMemory(block), 0o600); err != nil {
		return wire.Tunnel{}, err
	}
	if act.cert != nil {
		info.CertFile = filepath.Join(dir, grantCertFile)
		if err := writeFileAtomic(info.CertFile, []byte(sshca.AuthorizedKey(act.cert)+"\n"), 0o600); err != nil {
			return wire.Tunnel{}, err
		}
	}
	if len(act.hostCAKeys) > 0 {
		var b strings.Builder
		for _, k := range act.hostCAKeys {
			fmt.Fprintf(&b, "@cert-authority %s %s\n", act.raw.HostKeyAlias, sshca.AuthorizedKey(k))
		}
		info.KnownHostsFile = filepath.Join(dir, knownHostsFile)
		info.HostKeyAlias = act.raw.HostKeyAlias
		if err := writeFileAtomic(info.KnownHostsFile, []byte(b.String()), 0o600); err != nil {
			return wire.Tunnel{}, err
		}
	}
	return info, nil
}
