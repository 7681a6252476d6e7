package tunnel

import (
	"errors"
	"io"
	"net"
	"sync"
)

// pipe copies between a local connection and its tunnel connection until the
// tunnel side ends, then closes both. The tunnel side is authoritative: when
// it ends (EOF or error) the local connection is closed at once, because that
// is how the gateway tells the agent a flow was cut. An EOF from the local
// side is passed on as a half-close of the tunnel side, and the reply keeps
// flowing; a local error closes both.
func pipe(local, remote net.Conn) (up, down int64, err error) {
	var once sync.Once
	closeBoth := func() {
		once.Do(func() {
			_ = local.Close()
			_ = remote.Close()
		})
	}

	upErr := make(chan error, 1)
	go func() {
		n, err := io.Copy(remote, local)
		up = n
		if err == nil {
			if cw, ok := remote.(interface{ CloseWrite() error }); ok && cw.CloseWrite() == nil {
				upErr <- nil
				return
			}
		}
		closeBoth()
		upErr <- err
	}()

	down, derr := io.Copy(local, remote)
	closeBoth()
	uerr := <-upErr
	if derr != nil && !errors.Is(derr, net.ErrClosed) {
		return up, down, derr
	}
	if uerr != nil && !errors.Is(uerr, net.ErrClosed) {
		return up, down, uerr
	}
	return up, down, nil
}
