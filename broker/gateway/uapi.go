package gateway

import (
	"fmt"
	"log/slog"
	"net"
	"sync"

	"golang.zx2c4.com/wireguard/device"
	"golang.zx2c4.com/wireguard/ipc"
)

// uapiServer serves wireguard-go's UAPI on /var/run/wireguard/<name>.sock,
// the socket the wg tool (and wgctrl) talk to for userspace devices.
type uapiServer struct {
	ln  net.Listener
	log *slog.Logger

	mu     sync.Mutex
	closed bool
	conns  map[net.Conn]struct{}
	wg     sync.WaitGroup
}

func serveUAPI(name string, dev *device.Device, log *slog.Logger) (*uapiServer, error) {
	f, err := ipc.UAPIOpen(name)
	if err != nil {
		return nil, fmt.Errorf("opening socket: %w", err)
	}
	ln, err := ipc.UAPIListen(name, f)
	// UAPIListen duplicated the descriptor; ours is no longer needed.
	_ = f.Close()
	if err != nil {
		return nil, fmt.Errorf("listening: %w", err)
	}
	s := &uapiServer{ln: ln, log: log, conns: make(map[net.Conn]struct{})}
	s.wg.Add(1)
	go s.accept(dev)
	return s, nil
}

// uapiListenerErrors is how many errors an ipc.UAPIListener reports over its
// life: one from its accept goroutine and one from its inotify goroutine.
// Both block until read, so accept drains both before returning.
const uapiListenerErrors = 2

func (s *uapiServer) accept(dev *device.Device) {
	defer s.wg.Done()
	errs := 0
	for errs < uapiListenerErrors {
		c, err := s.ln.Accept()
		s.mu.Lock()
		closed := s.closed
		if err == nil && !closed {
			s.conns[c] = struct{}{}
			s.wg.Add(1)
		}
		s.mu.Unlock()
		switch {
		case err != nil:
			errs++
			if !closed {
				s.log.Error("UAPI socket stopped accepting", "err", err)
			}
		case closed:
			_ = c.Close()
		default:
			go func() {
				defer s.wg.Done()
				dev.IpcHandle(c) // closes c when done
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
			}()
		}
	}
}

// close stops accepting, removes the socket, ends open UAPI sessions and
// waits for their goroutines.
func (s *uapiServer) close() {
	s.mu.Lock()
	s.closed = true
	conns := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	// ipc.UAPIListener.Close races with its own inotify goroutine and can
	// report "file already closed" after doing everything (the socket is
	// removed either way), so its error is only logged.
	if err := s.ln.Close(); err != nil {
		s.log.Debug("closing UAPI listener", "err", err)
	}
	for _, c := range conns {
		_ = c.Close()
	}
	s.wg.Wait()
}
