package agent

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"github.com/pinhole-dev/pinhole/agent/localapi"
	"github.com/pinhole-dev/pinhole/agent/tunnel"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

// probeRefusedGranted is LocalProbe.Error when the granted port itself is
// refused: the gateway resets a granted flow when it cannot reach the
// target, or when the grant has just ended on its side.
const probeRefusedGranted = "connection refused on the granted port: the gateway could not reach the target, or the grant just ended"

// Probe opens one TCP connection through the live tunnel of target to the
// grant's destination address and port (0 means the granted port), closes
// it at once without sending data and reports the outcome. When several
// tunnels lead to target, the one that lasts longest is used. ctx bounds the
// attempt, and at most localapi.MaxProbeTimeout.
//
// A refusal (wire.ProbeRefused: the gateway reset the connection, as it does
// for every port the grant does not cover), a timeout (wire.ProbeTimedOut)
// and any other failure to connect are outcomes, reported in the result's
// Error. The error is non-nil only when port is out of range, when target
// has no live tunnel (it wraps localapi.ErrNoTunnel), or when ctx was
// cancelled.
func (a *Agent) Probe(ctx context.Context, target string, port int) (wire.LocalProbe, error) {
	if port < 0 || port > 65535 {
		return wire.LocalProbe{}, fmt.Errorf("probing %s: port %d is not between 1 and 65535", target, port)
	}
	a.mu.Lock()
	g := a.liveGrantLocked(target)
	var (
		tun     Tunnel
		granted netip.AddrPort
		id      string
	)
	if g != nil {
		tun, granted, id = g.tun, g.dst, g.id
	}
	a.mu.Unlock()
	if g == nil {
		return wire.LocalProbe{}, fmt.Errorf("%w to %s", localapi.ErrNoTunnel, target)
	}
	dst := granted
	if port != 0 {
		dst = netip.AddrPortFrom(granted.Addr(), uint16(port))
	}
	res := wire.LocalProbe{Target: target, Destination: dst.String(), Port: int(dst.Port())}
	log := a.log.With("request", id, "target", target, "destination", res.Destination)

	ctx, cancel := context.WithTimeout(ctx, localapi.MaxProbeTimeout)
	defer cancel()
	conn, err := tun.DialContext(ctx, dst)
	switch {
	case err == nil:
		if cerr := conn.Close(); cerr != nil {
			log.Debug("closing probe connection failed", "err", cerr)
		}
		res.Connected = true
	case isRefused(err) && dst == granted:
		res.Error = probeRefusedGranted
	case isRefused(err):
		res.Error = wire.ProbeRefused
	case errors.Is(err, tunnel.ErrClosed):
		return wire.LocalProbe{}, fmt.Errorf("%w to %s: it closed during the probe", localapi.ErrNoTunnel, target)
	case errors.Is(ctx.Err(), context.DeadlineExceeded):
		res.Error = wire.ProbeTimedOut
	case ctx.Err() != nil:
		return wire.LocalProbe{}, fmt.Errorf("probing %s: %w", res.Destination, ctx.Err())
	default:
		res.Error = err.Error()
	}
	log.Info("probe", "connected", res.Connected, "outcome", res.Error)
	return res, nil
}

// probeWithin is Probe bounded by timeout, for the local API.
func (a *Agent) probeWithin(ctx context.Context, target string, port int, timeout time.Duration) (wire.LocalProbe, error) {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	return a.Probe(ctx, target, port)
}

// liveGrantLocked returns the live grant to target that lasts longest, or
// nil. a.mu must be held.
func (a *Agent) liveGrantLocked(target string) *grant {
	var best *grant
	for _, g := range a.grants {
		if !g.up || g.tun == nil || g.info.Target != target {
			continue
		}
		if best == nil || g.info.ExpiresAt.After(best.info.ExpiresAt) ||
			(g.info.ExpiresAt.Equal(best.info.ExpiresAt) && g.id < best.id) {
			best = g
		}
	}
	return best
}

// gvisorRefused is the text of gVisor's tcpip.ErrConnectionRefused. gVisor's
// dialer (gonet.DialTCPWithBind, used by tunnel.Userspace) flattens tcpip
// errors into errors.New(err.String()) inside a *net.OpError, so a reset
// from the gateway can only be told apart by this text.
const gvisorRefused = "connection was refused"

// isRefused reports whether a dial failed because the far end reset the
// connection: the gateway's answer for a port the grant does not cover.
func isRefused(err error) bool {
	if errors.Is(err, syscall.ECONNREFUSED) {
		return true
	}
	var oe *net.OpError
	return errors.As(err, &oe) && oe.Err != nil && oe.Err.Error() == gvisorRefused
}
