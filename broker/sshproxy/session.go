package sshproxy

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"io"
	"log/slog"
	"path"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"unicode/utf8"

	gliderssh "github.com/gliderlabs/ssh"
	gossh "golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/recording"
	"github.com/pinhole-dev/pinhole/internal/sshca"
)

// Limits on what a user may send in session requests.
const (
	maxEnvVars      = 64
	maxEnvNameLen   = 64
	maxEnvValueLen  = 4096
	maxTermLen      = 64
	maxModesLen     = 1024
	maxCommandLen   = 64 << 10
	maxSignalLen    = 16
	maxExitSigLen   = 1024
	copyBufSize     = 32 << 10
	defaultCols     = 80
	defaultRows     = 24
	maxWindowSize   = 10000
	signalQueueSize = 16
)

// Messages of the session channel (RFC 4254).
type (
	ptyRequestMsg struct {
		Term                         string
		Columns, Rows, Width, Height uint32
		Modes                        string
	}
	windowChangeMsg struct {
		Columns, Rows, Width, Height uint32
	}
	envMsg struct {
		Name, Value string
	}
)

type window struct {
	cols, rows    int
	width, height uint32 // pixels, passed through
}

// session is one session channel of a user connection, relayed to its own
// upstream connection.
type session struct {
	c      *conn
	ch     gossh.Channel
	log    *slog.Logger
	ctx    context.Context // cancelled by end
	cancel context.CancelFunc
	id     string

	done     chan struct{} // closed once the user got the session's end
	startCh  chan struct{} // closed by the request loop on shell/exec/subsystem
	reqsDone chan struct{} // closed when the user's request stream ends

	// Written by the request loop before startCh is closed, read-only after.
	kind, command string
	env           []envMsg
	pty           *ptyRequestMsg

	winMu sync.Mutex
	win   window
	winCh chan struct{} // signals a new s.win to the relay (capacity 1)
	sigCh chan string

	endMu  sync.Mutex
	reason string // why pinhole ended the session; "" if it did not

	// unrecordable, set by the request loop before start, says why the
	// session is refused once started: a file transfer (sftp, scp) whose
	// bytes would not be recorded.
	unrecordable string

	outputStarted atomic.Bool
}

// handleSession is the gliderlabs ChannelHandler for "session" channels. It
// replaces gliderlabs' own session handling, which rewrites "\n" to "\r\n"
// in pty output, drops terminal modes and does not bound env requests.
func (c *conn) handleSession(_ *gliderssh.Server, _ *gossh.ServerConn, nch gossh.NewChannel, _ gliderssh.Context) {
	id := rand.Text()
	ctx, cancel := context.WithCancel(c.ctx)
	s := &session{
		c: c, ctx: ctx, cancel: cancel, id: id,
		log:      c.log.With("session", id),
		done:     make(chan struct{}),
		startCh:  make(chan struct{}),
		reqsDone: make(chan struct{}),
		winCh:    make(chan struct{}, 1),
		sigCh:    make(chan string, signalQueueSize),
		win:      window{cols: defaultCols, rows: defaultRows},
	}
	defer cancel()
	if !c.addSession(s) {
		_ = nch.Reject(gossh.ResourceShortage, "no more sessions on this connection")
		return
	}
	defer c.removeSession(s)
	ch, reqs, err := nch.Accept()
	if err != nil {
		s.log.Debug("accepting session channel", "err", err)
		close(s.done)
		return
	}
	s.ch = ch
	go s.requestLoop(reqs)

	var stdinDone <-chan struct{}
	select {
	case <-s.startCh:
		stdinDone = s.run()
	case <-s.ctx.Done():
		s.goodbye()
	case <-s.reqsDone:
		s.goodbye()
	}
	if stdinDone != nil {
		<-stdinDone
	}
	<-s.reqsDone
}

// end ends the session; reason, if not empty, is shown to the user. The
// first reason wins.
func (s *session) end(reason string) {
	s.endMu.Lock()
	if s.reason == "" {
		s.reason = reason
	}
	s.endMu.Unlock()
	s.cancel()
}

func (s *session) endReason() string {
	s.endMu.Lock()
	defer s.endMu.Unlock()
	return s.reason
}

func (s *session) window() window {
	s.winMu.Lock()
	defer s.winMu.Unlock()
	return s.win
}

// requestLoop answers the user's session requests until the channel closes.
func (s *session) requestLoop(reqs <-chan *gossh.Request) {
	defer close(s.reqsDone)
	started := false
	for req := range reqs {
		ok, start := s.handleRequest(req, started)
		if req.WantReply {
			_ = req.Reply(ok, nil)
		}
		if start {
			started = true
			close(s.startCh)
		}
	}
	// The user closed the channel or the connection is gone.
	s.end("")
}

// handleRequest applies one request; start reports that the session should
// start now.
func (s *session) handleRequest(req *gossh.Request, started bool) (ok, start bool) {
	switch req.Type {
	case "env":
		var m envMsg
		if started || gossh.Unmarshal(req.Payload, &m) != nil || !validEnv(m) || len(s.env) >= maxEnvVars {
			return false, false
		}
		s.env = append(s.env, m)
		return true, false
	case "pty-req":
		var m ptyRequestMsg
		if started || s.pty != nil || gossh.Unmarshal(req.Payload, &m) != nil || !validTerm(m.Term) {
			return false, false
		}
		if cert := s.c.userCert(); cert == nil || !hasExtension(cert, sshca.ExtensionPermitPTY) {
			s.log.Info("pty refused: certificate lacks permit-pty")
			return false, false
		}
		if !validModes(m.Modes) {
			m.Modes = defaultModes
		}
		s.pty = &m
		s.setWindow(m.Columns, m.Rows, m.Width, m.Height)
		return true, false
	case "window-change":
		var m windowChangeMsg
		if s.pty == nil || gossh.Unmarshal(req.Payload, &m) != nil {
			return false, false
		}
		s.setWindow(m.Columns, m.Rows, m.Width, m.Height)
		if started {
			select {
			case s.winCh <- struct{}{}:
			default: // the relay has not picked up the previous one; it reads the latest
			}
		}
		return true, false
	case "signal":
		var m struct{ Signal string }
		if !started || gossh.Unmarshal(req.Payload, &m) != nil || !validSignal(m.Signal) {
			return false, false
		}
		select {
		case s.sigCh <- m.Signal:
			return true, false
		default:
			return false, false
		}
	case "shell":
		if started {
			return false, false
		}
		s.kind = KindShell
		return true, true
	case "exec":
		var m struct{ Command string }
		if started || gossh.Unmarshal(req.Payload, &m) != nil || m.Command == "" || len(m.Command) > maxCommandLen {
			return false, false
		}
		s.kind, s.command = KindExec, m.Command
		if isSCPServer(m.Command) && !s.c.p.cfg.UnrecordedSFTP {
			// Started only to be refused with a reason the user sees and an
			// audited session.refused (see run).
			s.unrecordable = "scp is refused: its file transfers would not be recorded"
		}
		return true, true
	case "subsystem":
		var m struct{ Name string }
		if started || gossh.Unmarshal(req.Payload, &m) != nil || m.Name != "sftp" {
			return false, false
		}
		s.kind, s.command = KindSubsystem, m.Name
		if !s.c.p.cfg.UnrecordedSFTP {
			s.unrecordable = "sftp is refused: its file transfers would not be recorded"
		}
		return true, true
	default:
		// auth-agent-req@openssh.com, x11-req, break, keepalive@openssh.com, ...
		return false, false
	}
}

func (s *session) setWindow(cols, rows, width, height uint32) {
	w := window{cols: int(min(cols, maxWindowSize)), rows: int(min(rows, maxWindowSize)), width: width, height: height}
	if w.cols == 0 {
		w.cols = defaultCols
	}
	if w.rows == 0 {
		w.rows = defaultRows
	}
	s.winMu.Lock()
	s.win = w
	s.winMu.Unlock()
}

// outcome is how the upstream session ended.
type outcome struct {
	status     uint32
	hasStatus  bool
	exitSignal []byte // raw exit-signal payload
	signalName string
}

// run starts and relays a session after the user asked for a shell, exec or
// subsystem. It returns a channel closed when the stdin copier stopped (it
// stops once the user's channel is closed).
func (s *session) run() <-chan struct{} {
	cfg := &s.c.p.cfg
	t := s.c.t
	win := s.window()
	info := SessionInfo{
		ID: s.id, GrantID: t.GrantID, Requester: t.Requester, Target: t.Name, Login: t.Login,
		Kind: s.kind, Command: s.command, Width: win.cols, Height: win.rows, Started: cfg.Clock(),
	}
	if s.pty != nil {
		info.Term = s.pty.Term
	}
	if err := cfg.CheckGrant(s.ctx, t.GrantID); err != nil {
		s.refuse(info, "access grant is not active", err)
		s.goodbyeWith(info, nil, false, outcome{})
		return nil
	}
	if s.unrecordable != "" {
		s.refuse(info, s.unrecordable, errUnrecordable)
		s.goodbyeWith(info, nil, false, outcome{})
		return nil
	}
	var rec Recording
	if info.Kind != KindSubsystem {
		r, err := cfg.OpenRecording(s.ctx, info)
		if err == nil && r == nil {
			err = errors.New("OpenRecording returned no recording")
		}
		if err != nil {
			s.event(EventRecordingFailed, info, map[string]string{"stage": "open", "error": err.Error()})
			s.refuse(info, "session refused: it cannot be recorded", err)
			s.goodbyeWith(info, nil, false, outcome{})
			return nil
		}
		rec = r
	}
	up, err := s.dial(info)
	if err != nil {
		s.refuse(info, "cannot open a session on "+t.Name, err)
		s.goodbyeWith(info, rec, false, outcome{})
		return nil
	}
	s.log.Info("SSH session started", "kind", info.Kind) // commands may hold secrets: they go to events, not logs
	s.event(EventSessionStarted, info, map[string]string{"kind": info.Kind})

	stdinDone := make(chan struct{})
	go func() {
		defer close(stdinDone)
		// Input is relayed, not recorded.
		_, _ = io.Copy(up.ch, s.ch)
		_ = up.ch.CloseWrite()
	}()
	out := s.relay(info, up, rec)
	up.close()
	s.goodbyeWith(info, rec, true, out)
	return stdinDone
}

// refuse logs and reports a session refused before it started.
func (s *session) refuse(info SessionInfo, reason string, err error) {
	s.end(reason)
	s.log.Warn("SSH session refused", "reason", reason, "err", err)
	s.event(EventSessionRefused, info, map[string]string{"reason": s.endReason(), "error": err.Error()})
}

// relay copies output from upstream to the user (recording it), and passes
// window changes and signals upstream, until the upstream session is over
// or the session is ended.
func (s *session) relay(info SessionInfo, up *upstream, rec Recording) outcome {
	var out outcome
	var wg sync.WaitGroup
	wg.Go(func() {
		for req := range up.reqs {
			switch req.Type {
			case "exit-status":
				if len(req.Payload) == 4 {
					out.status, out.hasStatus = binary.BigEndian.Uint32(req.Payload), true
				}
			case "exit-signal":
				var m struct {
					Signal     string
					CoreDumped bool
					Error      string
					Lang       string
				}
				if len(req.Payload) <= maxExitSigLen && gossh.Unmarshal(req.Payload, &m) == nil {
					out.exitSignal, out.signalName = req.Payload, m.Signal
				}
			}
			if req.WantReply {
				_ = req.Reply(false, nil)
			}
		}
	})
	wg.Go(func() { s.pump(info, s.ch, up.ch, rec) })
	wg.Go(func() { s.pump(info, s.ch.Stderr(), up.ch.Stderr(), rec) })

	relayDone := make(chan struct{})
	ctrlDone := make(chan struct{})
	go func() {
		defer close(ctrlDone)
		for {
			select {
			case <-relayDone:
				return
			case <-s.winCh:
				w := s.window()
				msg := windowChangeMsg{Columns: uint32(w.cols), Rows: uint32(w.rows), Width: w.width, Height: w.height}
				_, _ = up.ch.SendRequest("window-change", false, gossh.Marshal(&msg))
				if rec != nil {
					if err := rec.Resize(w.cols, w.rows); err != nil {
						s.recordingFailed(info, err)
					}
				}
			case sig := <-s.sigCh:
				_, _ = up.ch.SendRequest("signal", false, gossh.Marshal(&struct{ Signal string }{sig}))
			}
		}
	}()

	allDone := make(chan struct{})
	go func() {
		wg.Wait()
		close(allDone)
	}()
	select {
	case <-allDone:
	case <-s.ctx.Done():
		up.conn.Close() // already closed by the context; be explicit
		<-allDone
	}
	close(relayDone)
	<-ctrlDone
	return out
}

// pump copies src to dst, recording every byte first when rec is set. A
// recording error ends the session without passing the unrecorded bytes on.
func (s *session) pump(info SessionInfo, dst io.Writer, src io.Reader, rec Recording) {
	buf := make([]byte, copyBufSize)
	// stdout and stderr share one recording: each stream keeps its own
	// incomplete trailing UTF-8 sequence so the two never mix.
	var carry []byte
	for {
		n, err := src.Read(buf)
		if n > 0 {
			if rec != nil {
				chunk := buf[:n]
				if len(carry) > 0 {
					chunk = append(carry, chunk...)
				}
				cut := completeUTF8(chunk)
				if cut > 0 {
					if rerr := rec.Output(chunk[:cut]); rerr != nil {
						s.recordingFailed(info, rerr)
						return
					}
				}
				carry = append([]byte(nil), chunk[cut:]...)
			}
			s.outputStarted.Store(true)
			if _, werr := dst.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			if rec != nil && len(carry) > 0 {
				_ = rec.Output(carry)
			}
			return
		}
	}
}

// recordingFailed ends the session because its recording broke.
func (s *session) recordingFailed(info SessionInfo, err error) {
	reason := "session ended: recording failed"
	if errors.Is(err, recording.ErrTruncated) {
		reason = "session ended: recording size limit reached"
	}
	s.end(reason)
	s.log.Error("recording failed, ending SSH session", "err", err)
	s.event(EventRecordingFailed, info, map[string]string{"stage": "write", "error": err.Error()})
}

// goodbye ends a session that was never asked to start. It must not read
// kind or command: the request loop may be writing them.
func (s *session) goodbye() {
	t := s.c.t
	s.goodbyeWith(SessionInfo{ID: s.id, GrantID: t.GrantID, Requester: t.Requester, Target: t.Name, Login: t.Login}, nil, false, outcome{})
}

// goodbyeWith tells the user how the session ended, closes the channel and
// the recording, and reports the end.
func (s *session) goodbyeWith(info SessionInfo, rec Recording, started bool, out outcome) {
	defer close(s.done)
	reason := s.endReason()
	clientGone := false
	select {
	case <-s.reqsDone:
		clientGone = true
	default:
	}
	if reason == "" && started && !out.hasStatus && out.exitSignal == nil && !clientGone {
		reason = "connection to " + s.c.t.Name + " was lost"
	}
	details := map[string]string{"exit_status": "none"}
	switch {
	case reason != "":
		msg := "pinhole: " + reason + "\r\n"
		if s.outputStarted.Load() {
			msg = "\r\n" + msg
		}
		_, _ = s.ch.Stderr().Write([]byte(msg))
		sendExitStatus(s.ch, 255)
		details["exit_status"] = "255"
		details["reason"] = reason
	case out.exitSignal != nil:
		_, _ = s.ch.SendRequest("exit-signal", false, out.exitSignal)
		details["exit_signal"] = out.signalName
	case out.hasStatus:
		sendExitStatus(s.ch, out.status)
		details["exit_status"] = strconv.FormatUint(uint64(out.status), 10)
	}
	_ = s.ch.Close()
	if rec != nil {
		if err := rec.Close(); err != nil {
			s.log.Error("closing recording", "err", err)
			s.event(EventRecordingFailed, info, map[string]string{"stage": "close", "error": err.Error()})
		}
	}
	if started {
		s.log.Info("SSH session ended", "exit_status", details["exit_status"], "reason", reason)
		s.event(EventSessionEnded, info, details)
	}
}

// event reports an event. Events outlive the session's context: a session
// that ended must still be able to report that it did.
func (s *session) event(typ string, info SessionInfo, details map[string]string) {
	s.c.p.cfg.Event(context.WithoutCancel(s.ctx), typ, info, details)
}

func sendExitStatus(ch gossh.Channel, status uint32) {
	_, _ = ch.SendRequest("exit-status", false, gossh.Marshal(&struct{ Status uint32 }{status}))
}

// completeUTF8 returns the length of the longest prefix of p that does not
// end in an incomplete (but possibly valid) UTF-8 sequence.
func completeUTF8(p []byte) int {
	n := len(p)
	for i := n - 1; i >= 0 && i >= n-utf8.UTFMax; i-- {
		if utf8.RuneStart(p[i]) {
			if !utf8.FullRune(p[i:]) {
				return i
			}
			return n
		}
	}
	return n
}

func hasExtension(cert *gossh.Certificate, ext string) bool {
	_, ok := cert.Extensions[ext]
	return ok
}

func validEnv(m envMsg) bool {
	if m.Name == "" || len(m.Name) > maxEnvNameLen || len(m.Value) > maxEnvValueLen {
		return false
	}
	for i, r := range m.Name {
		if !(r == '_' || r >= 'A' && r <= 'Z' || r >= 'a' && r <= 'z' || i > 0 && r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

func validTerm(term string) bool {
	if len(term) > maxTermLen {
		return false
	}
	for _, r := range term {
		if r <= ' ' || r > '~' {
			return false
		}
	}
	return true
}

func validSignal(sig string) bool {
	if sig == "" || len(sig) > maxSignalLen {
		return false
	}
	for _, r := range sig {
		if !(r >= 'A' && r <= 'Z' || r >= '0' && r <= '9') {
			return false
		}
	}
	return true
}

// validModes reports whether modes is a well-formed encoded terminal modes
// string (RFC 4254 section 8).
func validModes(modes string) bool {
	if len(modes) == 0 || len(modes) > maxModesLen {
		return false
	}
	for i := 0; i < len(modes); {
		op := modes[i]
		i++
		if op == 0 { // TTY_OP_END
			return i == len(modes)
		}
		if op >= 160 { // undefined opcodes end parsing; do not forward them
			return false
		}
		if i+4 > len(modes) {
			return false
		}
		i += 4
	}
	return false // no TTY_OP_END
}

// defaultModes are the terminal modes sent upstream when the client sent
// none or garbage: a cooked terminal with the usual control characters.
var defaultModes = encodeModes(gossh.TerminalModes{
	gossh.VINTR: 3, gossh.VQUIT: 28, gossh.VERASE: 127, gossh.VKILL: 21, gossh.VEOF: 4, gossh.VSUSP: 26,
	gossh.ICRNL: 1, gossh.IXON: 1, gossh.IUTF8: 1,
	gossh.OPOST: 1, gossh.ONLCR: 1,
	gossh.ISIG: 1, gossh.ICANON: 1, gossh.IEXTEN: 1, gossh.ECHO: 1, gossh.ECHOE: 1, gossh.ECHOK: 1, gossh.ECHOCTL: 1, gossh.ECHOKE: 1,
	gossh.CS8:           1,
	gossh.TTY_OP_ISPEED: 38400, gossh.TTY_OP_OSPEED: 38400,
})

func encodeModes(m gossh.TerminalModes) string {
	var b []byte
	for op := 1; op < 256; op++ {
		if v, ok := m[uint8(op)]; ok {
			b = append(b, uint8(op))
			b = binary.BigEndian.AppendUint32(b, v)
		}
	}
	return string(append(b, 0))
}

// isSCPServer reports whether an exec command looks like it starts scp's
// server side (`scp -t` to receive, `scp -f` to send), which the scp client
// runs on the target, also behind a wrapper such as `env` or `sh -c`: a
// word scp followed later by a flag word holding t or f. It is a guard, not
// a proof: a shell can move files in ways no parser sees (as can any command
// reading standard input, which is not recorded either).
func isSCPServer(command string) bool {
	words := strings.FieldsFunc(command, func(r rune) bool {
		return r == ' ' || r == '\t' || r == '\n' || r == '\'' || r == '"' || r == ';' || r == '&' || r == '|' || r == '(' || r == ')' || r == '`'
	})
	for i, w := range words {
		if path.Base(w) != "scp" {
			continue
		}
		for _, a := range words[i+1:] {
			if strings.HasPrefix(a, "-") && !strings.HasPrefix(a, "--") && strings.ContainsAny(a[1:], "tf") {
				return true
			}
		}
	}
	return false
}

// errUnrecordable is the error of a session refused because it could not be
// recorded by its nature (a file transfer).
var errUnrecordable = errors.New("file transfer would not be recorded")
