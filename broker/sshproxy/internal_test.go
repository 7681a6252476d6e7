package sshproxy

import (
	"context"
	"log/slog"
	"strings"
	"testing"
	"unicode/utf8"

	gossh "golang.org/x/crypto/ssh"

	"github.com/pinhole-dev/pinhole/internal/sshca"
)

func TestValidModes(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		modes string
		want  bool
	}{
		{name: "ok/default", modes: defaultModes, want: true},
		{name: "ok/end-only", modes: "\x00", want: true},
		{name: "ok/one", modes: "\x35\x00\x00\x00\x01\x00", want: true},
		{name: "deny/empty", modes: ""},
		{name: "deny/no-end", modes: "\x35\x00\x00\x00\x01"},
		{name: "deny/short-arg", modes: "\x35\x00\x00"},
		{name: "deny/after-end", modes: "\x00\x35"},
		{name: "deny/undefined-opcode", modes: "\xa0\x00"},
		{name: "deny/too-long", modes: strings.Repeat("\x35\x00\x00\x00\x01", 300) + "\x00"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := validModes(tt.modes); got != tt.want {
				t.Fatalf("validModes(%q) = %v, want %v", tt.modes, got, tt.want)
			}
		})
	}
}

func TestCleanReason(t *testing.T) {
	t.Parallel()
	tests := []struct{ in, want string }{
		{"grant revoked", "grant revoked"},
		{"", "session ended"},
		{"a\x1b[2Jb\r\nc", "a [2Jb  c"},
		{strings.Repeat("é", 300), strings.Repeat("é", maxReasonLen)},
	}
	for _, tt := range tests {
		if got := cleanReason(tt.in); got != tt.want {
			t.Errorf("cleanReason(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}

func TestParseHostKey(t *testing.T) {
	t.Parallel()
	key, err := sshca.NewKey(nil)
	if err != nil {
		t.Fatal(err)
	}
	line := sshca.AuthorizedKey(key.PublicKey())
	tests := []struct {
		name   string
		in     string
		wantCA bool
		ok     bool
	}{
		{name: "ok/plain", in: line, ok: true},
		{name: "ok/plain-with-comment", in: line + " root@db", ok: true},
		{name: "ok/ca", in: "@cert-authority " + line, wantCA: true, ok: true},
		{name: "ok/ca-with-host-pattern", in: "@cert-authority *.example " + line, wantCA: true, ok: true},
		{name: "deny/empty", in: ""},
		{name: "deny/garbage", in: "ssh-ed25519 AAAA"},
		{name: "deny/two-keys", in: line + "\n" + line},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			spec, err := parseHostKey(tt.in)
			if (err == nil) != tt.ok {
				t.Fatalf("parseHostKey error = %v, want ok=%v", err, tt.ok)
			}
			if err == nil && spec.ca != tt.wantCA {
				t.Fatalf("ca = %v, want %v", spec.ca, tt.wantCA)
			}
		})
	}
}

func FuzzParseHostKey(f *testing.F) {
	f.Add("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk2Xq0m7z3rCk1zYp0m8b6y9U7mKcQm9kW3Xo0Zy1a2")
	f.Add("@cert-authority * ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHk2Xq0m7z3rCk1zYp0m8b6y9U7mKcQm9kW3Xo0Zy1a2")
	f.Add("@cert-authority")
	f.Add("")
	f.Fuzz(func(t *testing.T, s string) {
		spec, err := parseHostKey(s)
		if err == nil && spec.key == nil {
			t.Fatal("no key and no error")
		}
	})
}

// fuzzSession is a session not attached to any connection, for feeding
// requests straight into handleRequest.
func fuzzSession(permitPTY bool) *session {
	cert := &gossh.Certificate{Permissions: gossh.Permissions{Extensions: map[string]string{}}}
	if permitPTY {
		cert.Extensions[sshca.ExtensionPermitPTY] = ""
	}
	c := &conn{cert: cert, log: slog.New(slog.DiscardHandler), p: &Proxy{cfg: Config{UnrecordedSFTP: true}}}
	ctx, cancel := context.WithCancel(context.Background())
	return &session{
		c: c, ctx: ctx, cancel: cancel, log: c.log,
		winCh: make(chan struct{}, 1), sigCh: make(chan string, signalQueueSize),
		win: window{cols: defaultCols, rows: defaultRows},
	}
}

func FuzzHandleRequest(f *testing.F) {
	f.Add("pty-req", gossh.Marshal(&ptyRequestMsg{Term: "xterm", Columns: 80, Rows: 24, Modes: defaultModes}), false)
	f.Add("pty-req", gossh.Marshal(&ptyRequestMsg{Term: "x\x00", Columns: 1 << 31, Rows: 0, Modes: "\xff"}), false)
	f.Add("window-change", gossh.Marshal(&windowChangeMsg{Columns: 120, Rows: 40}), true)
	f.Add("env", gossh.Marshal(&envMsg{Name: "LANG", Value: "C"}), false)
	f.Add("env", gossh.Marshal(&envMsg{Name: "1X", Value: "C"}), false)
	f.Add("exec", gossh.Marshal(&struct{ Command string }{"id"}), false)
	f.Add("subsystem", gossh.Marshal(&struct{ Name string }{"sftp"}), false)
	f.Add("signal", gossh.Marshal(&struct{ Signal string }{"INT"}), true)
	f.Add("shell", []byte{}, false)
	f.Add("exec", []byte{0, 0, 0, 9, 'a'}, false)
	f.Fuzz(func(t *testing.T, typ string, payload []byte, started bool) {
		s := fuzzSession(true)
		defer s.cancel()
		// Send a pty first so window-change has something to change.
		s.handleRequest(&gossh.Request{Type: "pty-req", Payload: gossh.Marshal(&ptyRequestMsg{Term: "xterm", Modes: defaultModes})}, false)
		for range maxEnvVars + 2 {
			s.handleRequest(&gossh.Request{Type: typ, Payload: payload}, started)
		}
		if len(s.env) > maxEnvVars {
			t.Fatalf("%d env vars kept", len(s.env))
		}
		for _, kv := range s.env {
			if !validEnv(kv) {
				t.Fatalf("invalid env var kept: %q", kv.Name)
			}
		}
		if s.pty != nil && (!validModes(s.pty.Modes) || !validTerm(s.pty.Term)) {
			t.Fatalf("bad pty kept: %+v", s.pty)
		}
		w := s.window()
		if w.cols < 1 || w.rows < 1 || w.cols > maxWindowSize || w.rows > maxWindowSize {
			t.Fatalf("window %+v out of range", w)
		}
		if len(s.command) > maxCommandLen || !utf8.ValidString(s.kind) {
			t.Fatalf("command of %d bytes kept", len(s.command))
		}
	})
}

func TestPTYRequiresPermitPTY(t *testing.T) {
	t.Parallel()
	req := &gossh.Request{Type: "pty-req", Payload: gossh.Marshal(&ptyRequestMsg{Term: "xterm", Columns: 80, Rows: 24, Modes: "\x00"})}
	s := fuzzSession(false)
	defer s.cancel()
	if ok, _ := s.handleRequest(req, false); ok {
		t.Fatal("pty granted without permit-pty")
	}
	s = fuzzSession(true)
	defer s.cancel()
	if ok, _ := s.handleRequest(req, false); !ok {
		t.Fatal("pty refused with permit-pty")
	}
	if s.pty.Modes != "\x00" {
		t.Fatalf("client modes not kept: %q", s.pty.Modes)
	}
}

func TestCompleteUTF8(t *testing.T) {
	t.Parallel()
	tests := []struct {
		in   string
		want int
	}{
		{"abc", 3}, {"a\xe2\x82", 1}, {"a\xe2", 1}, {"\xe2\x82\xac", 3}, {"\xf0\x9f\x98", 0}, {"a\xff", 2}, {"", 0},
	}
	for _, tt := range tests {
		if got := completeUTF8([]byte(tt.in)); got != tt.want {
			t.Errorf("completeUTF8(%q) = %d, want %d", tt.in, got, tt.want)
		}
	}
}

func TestIsSCPServer(t *testing.T) {
	t.Parallel()
	tests := []struct {
		command string
		want    bool
	}{
		{"scp -t /tmp/x", true},
		{"scp -f /etc/passwd", true},
		{"scp -v -r -p -d -t -- /tmp", true},
		{"/usr/bin/scp -rt /tmp", true},
		{"scp -P 22 -t /tmp", true},
		{"env scp -t /tmp/x", true},
		{"sh -c 'scp -t /tmp/x'", true},
		{"true; /usr/bin/scp -f x", true},
		{"scp x y", false},
		{"scp -o Port=22 a b", false},
		{"scpx -t", false},
		{"ls -t", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := isSCPServer(tt.command); got != tt.want {
			t.Errorf("isSCPServer(%q) = %v, want %v", tt.command, got, tt.want)
		}
	}
}
