package gateway

import (
	"context"
	"io"
	"net"
	"sync"
	"sync/atomic"
)

// closeWriter is implemented by connections that support a TCP half-close
// (*net.TCPConn, gonet's TCPConn, and the gateway's flow connections).
type closeWriter interface {
	CloseWrite() error
}

// Splice copies both ways between a and b until either side ends or ctx is
// done, then closes both; it returns the bytes copied each way.
//
// A clean end of stream (EOF) from one side is passed on as a half-close of
// the other side when that side supports CloseWrite, and copying continues in
// the other direction until it ends too; without CloseWrite the end of one
// direction ends both. A read or write error in either direction, or ctx
// being done, closes both connections at once. The returned error is the
// first error that was not caused by Splice closing the connections itself
// (ctx.Err() when ctx ended the splice); a splice that ended with EOFs
// returns nil.
func Splice(ctx context.Context, a, b net.Conn) (aToB, bToA int64, err error) {
	var (
		closing   atomic.Bool
		byCtx     bool // set inside closeOnce: ctx started the close
		closeOnce sync.Once
	)
	closeWith := func(ctxDone bool) {
		closeOnce.Do(func() {
			byCtx = ctxDone
			closing.Store(true)
			_ = a.Close()
			_ = b.Close()
		})
	}
	closeBoth := func() { closeWith(false) }
	stop := context.AfterFunc(ctx, func() { closeWith(true) })
	defer stop()

	// copyHalf copies src to dst and reports an error only when it is not
	// the consequence of Splice closing the connections.
	copyHalf := func(dst, src net.Conn) (int64, error) {
		n, err := io.Copy(dst, src)
		if err != nil {
			selfInflicted := closing.Load()
			closeBoth()
			if selfInflicted {
				return n, nil
			}
			return n, err
		}
		cw, ok := dst.(closeWriter)
		if !ok {
			closeBoth()
			return n, nil
		}
		if err := cw.CloseWrite(); err != nil {
			selfInflicted := closing.Load()
			closeBoth()
			if selfInflicted {
				return n, nil
			}
			return n, err
		}
		return n, nil
	}

	type result struct {
		n   int64
		err error
	}
	done := make(chan result, 1)
	go func() {
		n, err := copyHalf(b, a)
		done <- result{n, err}
	}()
	bToA, errBA := copyHalf(a, b)
	r := <-done
	aToB = r.n
	// Both directions ended; close whatever is left. closeOnce also waits for
	// a concurrent close started by ctx, so nothing outlives this call.
	closeBoth()

	switch {
	case byCtx:
		err = ctx.Err()
	case r.err != nil:
		err = r.err
	default:
		err = errBA
	}
	return aToB, bToA, err
}
