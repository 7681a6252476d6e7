package fido

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-webauthn/webauthn/protocol"
	"github.com/go-webauthn/webauthn/webauthn"

	"github.com/pinhole-dev/pinhole/internal/fido/fidotest"
)

const (
	testRPID   = "localhost"
	testOrigin = "http://localhost:8080"
)

// clock is a settable test clock.
type clock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *clock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

func newClock() *clock { return &clock{t: time.Now()} }

func newFIDO(t testing.TB, c *clock) *FIDO {
	t.Helper()
	f, err := New(Config{RPID: testRPID, RPDisplayName: "pinhole test", Origins: []string{testOrigin}, Now: c.Now})
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	return f
}

func newUser(name string) User {
	return User{ID: []byte("uid-" + name + "-0123456789abcdef"), Name: name + "@example.com", DisplayName: strings.ToUpper(name)}
}

// register enrols a new credential of a for u and returns u with it.
func register(t testing.TB, f *FIDO, a *fidotest.Authenticator, u User) User {
	t.Helper()
	opts, session, err := f.BeginRegistration(u)
	if err != nil {
		t.Fatalf("BeginRegistration: %v", err)
	}
	resp, err := a.Register(opts)
	if err != nil {
		t.Fatalf("Register: %v", err)
	}
	cred, err := f.FinishRegistration(u, session, resp)
	if err != nil {
		t.Fatalf("FinishRegistration: %v", err)
	}
	u.Credentials = append(u.Credentials, *cred)
	return u
}

// challengeFor builds a challenge committing to content, as the approval
// page does.
func challengeFor(content string) []byte {
	sum := sha256.Sum256([]byte(content))
	return sum[:]
}

// assert runs BeginAssertion and the authenticator, returning the session
// and the response.
func assert(t testing.TB, f *FIDO, a *fidotest.Authenticator, u User, content string) (session, response []byte) {
	t.Helper()
	opts, session, err := f.BeginAssertion(u, challengeFor(content))
	if err != nil {
		t.Fatalf("BeginAssertion: %v", err)
	}
	response, err = a.Assert(opts)
	if err != nil {
		t.Fatalf("Assert: %v", err)
	}
	return session, response
}

// store replaces u's credential with the updated one, as the caller does.
func store(u User, cred *webauthn.Credential) User {
	creds := make([]webauthn.Credential, len(u.Credentials))
	copy(creds, u.Credentials)
	for i := range creds {
		if bytes.Equal(creds[i].ID, cred.ID) {
			creds[i] = *cred
		}
	}
	u.Credentials = creds
	return u
}

func TestRegisterAndAssert(t *testing.T) {
	t.Parallel()
	f := newFIDO(t, newClock())
	a := fidotest.New(testRPID, testOrigin)
	u := newUser("alice")

	opts, session, err := f.BeginRegistration(u)
	if err != nil {
		t.Fatal(err)
	}
	var creation map[string]any
	if err := json.Unmarshal(opts, &creation); err != nil {
		t.Fatalf("registration options are not JSON: %v", err)
	}
	if _, wrapped := creation["publicKey"]; wrapped {
		t.Errorf("registration options are wrapped in publicKey: %s", opts)
	}
	sel, _ := creation["authenticatorSelection"].(map[string]any)
	if sel["userVerification"] != "required" || sel["residentKey"] != "preferred" {
		t.Errorf("authenticatorSelection = %v, want UV required and resident key preferred", sel)
	}
	if creation["challenge"] == "" || creation["rp"] == nil || creation["user"] == nil {
		t.Errorf("registration options lack members: %s", opts)
	}
	if creation["timeout"] != float64(DefaultTimeout.Milliseconds()) {
		t.Errorf("timeout = %v, want %d", creation["timeout"], DefaultTimeout.Milliseconds())
	}

	resp, err := a.Register(opts)
	if err != nil {
		t.Fatal(err)
	}
	cred, err := f.FinishRegistration(u, session, resp)
	if err != nil {
		t.Fatalf("FinishRegistration: %v", err)
	}
	if !cred.Flags.UserVerified || cred.Authenticator.SignCount != 0 || len(cred.PublicKey) == 0 {
		t.Errorf("registered credential = %+v", cred)
	}
	u.Credentials = append(u.Credentials, *cred)

	// A second registration excludes the first credential, and this
	// authenticator (holding it) refuses, as a real one does.
	opts2, _, err := f.BeginRegistration(u)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(opts2, []byte(`"excludeCredentials"`)) {
		t.Errorf("second registration does not exclude the first credential: %s", opts2)
	}
	if _, err := a.Register(opts2); err == nil {
		t.Error("authenticator registered a second credential despite the exclusion")
	}

	for want := uint32(1); want <= 3; want++ {
		content := "approve request r-42 for db-prod:5432 45m #" + string(rune('0'+want))
		opts, session, err := f.BeginAssertion(u, challengeFor(content))
		if err != nil {
			t.Fatal(err)
		}
		var request map[string]any
		if err := json.Unmarshal(opts, &request); err != nil {
			t.Fatal(err)
		}
		if request["userVerification"] != "required" || request["rpId"] != testRPID || request["publicKey"] != nil {
			t.Errorf("request options = %s", opts)
		}
		got, err := SessionChallenge(session)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(got, challengeFor(content)) {
			t.Errorf("SessionChallenge = %x, want %x", got, challengeFor(content))
		}
		resp, err := a.Assert(opts)
		if err != nil {
			t.Fatal(err)
		}
		cred, err := f.FinishAssertion(u, session, resp)
		if err != nil {
			t.Fatalf("FinishAssertion #%d: %v", want, err)
		}
		if cred.Authenticator.SignCount != want || cred.Authenticator.CloneWarning {
			t.Errorf("assertion #%d: sign count %d clone warning %v, want %d false", want, cred.Authenticator.SignCount, cred.Authenticator.CloneWarning, want)
		}
		u = store(u, cred)
	}
}

func TestFinishAssertionRefuses(t *testing.T) {
	t.Parallel()
	type setup struct {
		f        *FIDO
		clock    *clock
		a        *fidotest.Authenticator
		u        User
		session  []byte
		response []byte
	}
	tests := []struct {
		name    string
		prepare func(t *testing.T, s *setup)
		wantErr error  // sentinel, if any
		libErr  bool   // wraps a *protocol.Error
		errText string // substring of the message
	}{
		{
			name: "deny/wrong origin",
			prepare: func(t *testing.T, s *setup) {
				s.a.SetOrigin("https://evil.example")
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
			},
			libErr: true, errText: "fido: verifying assertion: Error validating origin",
		},
		{
			name: "deny/user verification absent",
			prepare: func(t *testing.T, s *setup) {
				s.a.SetUserVerified(false)
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
			},
			wantErr: ErrUserVerification, errText: "fido: verifying assertion: ",
		},
		{
			name: "deny/assertion for another challenge",
			prepare: func(t *testing.T, s *setup) {
				_, s.response = assert(t, s.f, s.a, s.u, "request r-1 as shown")
				s.session, _ = assert(t, s.f, s.a, s.u, "request r-2 as shown")
				s.a.SetSignCount(10)
			},
			libErr: true, errText: "fido: verifying assertion: Error validating challenge",
		},
		{
			name: "deny/replay of a stored assertion",
			prepare: func(t *testing.T, s *setup) {
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
				cred, err := s.f.FinishAssertion(s.u, s.session, s.response)
				if err != nil {
					t.Fatal(err)
				}
				s.u = store(s.u, cred)
			},
			wantErr: ErrCloned, errText: "stored 1, presented 1",
		},
		{
			name: "deny/sign count goes backwards",
			prepare: func(t *testing.T, s *setup) {
				s.a.SetSignCount(4)
				sess, resp := assert(t, s.f, s.a, s.u, "x")
				cred, err := s.f.FinishAssertion(s.u, sess, resp)
				if err != nil {
					t.Fatal(err)
				}
				s.u = store(s.u, cred) // stored count is now 5
				s.a.SetSignCount(1)
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
			},
			wantErr: ErrCloned, errText: "stored 5, presented 2",
		},
		{
			name: "deny/tampered signature",
			prepare: func(t *testing.T, s *setup) {
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
				var m map[string]any
				if err := json.Unmarshal(s.response, &m); err != nil {
					t.Fatal(err)
				}
				r := m["response"].(map[string]any)
				sig := r["signature"].(string)
				r["signature"] = "AAAA" + sig[4:]
				s.response, _ = json.Marshal(m)
			},
			libErr: true, errText: "fido: verifying assertion: Error validating the assertion signature",
		},
		{
			name: "deny/oversized response",
			prepare: func(t *testing.T, s *setup) {
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
				s.response = append(s.response, bytes.Repeat([]byte(" "), MaxResponseSize)...)
			},
			wantErr: ErrTooLarge,
		},
		{
			name: "deny/oversized session",
			prepare: func(t *testing.T, s *setup) {
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
				s.session = append(s.session, bytes.Repeat([]byte(" "), MaxSessionSize)...)
			},
			wantErr: ErrTooLarge,
		},
		{
			name: "deny/garbage JSON",
			prepare: func(t *testing.T, s *setup) {
				s.session, _ = assert(t, s.f, s.a, s.u, "x")
				s.response = []byte(`{"id": 12, "response": [`)
			},
			libErr: true, errText: "fido: parsing assertion response: Parse error for Assertion",
		},
		{
			name: "deny/not JSON at all",
			prepare: func(t *testing.T, s *setup) {
				s.session, _ = assert(t, s.f, s.a, s.u, "x")
				s.response = []byte("\x00\x01 hello")
			},
			libErr: true, errText: "fido: parsing assertion response",
		},
		{
			name: "deny/expired ceremony",
			prepare: func(t *testing.T, s *setup) {
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
				s.clock.Advance(DefaultTimeout + time.Second)
			},
			wantErr: ErrExpired,
		},
		{
			name: "deny/registration session",
			prepare: func(t *testing.T, s *setup) {
				_, s.response = assert(t, s.f, s.a, s.u, "x")
				var err error
				if _, s.session, err = s.f.BeginRegistration(s.u); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: ErrSession, errText: "registration session used to finish assertion",
		},
		{
			name: "deny/garbage session",
			prepare: func(t *testing.T, s *setup) {
				_, s.response = assert(t, s.f, s.a, s.u, "x")
				s.session = []byte(`{"v":1,"ceremony":"assertion","unknown":true}`)
			},
			wantErr: ErrSession,
		},
		{
			name: "deny/session of another relying party",
			prepare: func(t *testing.T, s *setup) {
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
				other, err := New(Config{RPID: "example.com", Origins: []string{"https://example.com"}})
				if err != nil {
					t.Fatal(err)
				}
				s.f = other
			},
			wantErr: ErrSession, errText: "another relying party",
		},
		{
			name: "deny/another user",
			prepare: func(t *testing.T, s *setup) {
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
				mallory := register(t, s.f, fidotest.New(testRPID, testOrigin), newUser("mallory"))
				s.u = mallory
			},
			libErr: true, errText: "fido: verifying assertion: ID mismatch for User and Session",
		},
		{
			name: "deny/credential removed from user",
			prepare: func(t *testing.T, s *setup) {
				s.session, s.response = assert(t, s.f, s.a, s.u, "x")
				other := register(t, s.f, fidotest.New(testRPID, testOrigin), newUser("alice"))
				s.u.Credentials = other.Credentials
			},
			libErr: true, errText: "fido: verifying assertion: ",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := newClock()
			s := &setup{f: newFIDO(t, c), clock: c, a: fidotest.New(testRPID, testOrigin), u: newUser("alice")}
			s.u = register(t, s.f, s.a, s.u)
			tt.prepare(t, s)
			cred, err := s.f.FinishAssertion(s.u, s.session, s.response)
			if err == nil {
				t.Fatalf("FinishAssertion succeeded (%+v), want error", cred)
			}
			if cred != nil {
				t.Errorf("FinishAssertion returned a credential with its error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error = %v, want %v", err, tt.wantErr)
			}
			var pe *protocol.Error
			if tt.libErr && !errors.As(err, &pe) {
				t.Errorf("error = %v, want a wrapped *protocol.Error", err)
			}
			if !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("error = %q, want it to contain %q", err, tt.errText)
			}
			t.Logf("error: %v", err)
		})
	}
}

func TestFinishRegistrationRefuses(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		prepare func(a *fidotest.Authenticator)
		mutate  func(t *testing.T, f *FIDO, u *User, session, response *[]byte)
		wantErr error
		errText string
	}{
		{
			name:    "deny/user verification absent",
			prepare: func(a *fidotest.Authenticator) { a.SetUserVerified(false) },
			wantErr: ErrUserVerification, errText: "fido: verifying registration: ",
		},
		{
			name:    "deny/wrong origin",
			prepare: func(a *fidotest.Authenticator) { a.SetOrigin("https://localhost.evil.example") },
			errText: "fido: verifying registration: Error validating origin",
		},
		{
			name: "deny/already registered",
			mutate: func(t *testing.T, f *FIDO, u *User, session, response *[]byte) {
				cred, err := f.FinishRegistration(*u, *session, *response)
				if err != nil {
					t.Fatal(err)
				}
				u.Credentials = append(u.Credentials, *cred)
			},
			wantErr: ErrDuplicate,
		},
		{
			name: "deny/assertion session",
			mutate: func(t *testing.T, f *FIDO, u *User, session, response *[]byte) {
				existing := register(t, f, fidotest.New(testRPID, testOrigin), *u)
				var err error
				if _, *session, err = f.BeginAssertion(existing, challengeFor("x")); err != nil {
					t.Fatal(err)
				}
			},
			wantErr: ErrSession,
		},
		{
			name: "deny/oversized response",
			mutate: func(t *testing.T, f *FIDO, u *User, session, response *[]byte) {
				*response = bytes.Repeat([]byte("x"), MaxResponseSize+1)
			},
			wantErr: ErrTooLarge,
		},
		{
			name: "deny/garbage JSON",
			mutate: func(t *testing.T, f *FIDO, u *User, session, response *[]byte) {
				*response = []byte(`{"type":"public-key"`)
			},
			errText: "fido: parsing registration response",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			f := newFIDO(t, newClock())
			a := fidotest.New(testRPID, testOrigin)
			if tt.prepare != nil {
				tt.prepare(a)
			}
			u := newUser("bob")
			opts, session, err := f.BeginRegistration(u)
			if err != nil {
				t.Fatal(err)
			}
			response, err := a.Register(opts)
			if err != nil {
				t.Fatal(err)
			}
			if tt.mutate != nil {
				tt.mutate(t, f, &u, &session, &response)
			}
			cred, err := f.FinishRegistration(u, session, response)
			if err == nil {
				t.Fatalf("FinishRegistration succeeded (%+v), want error", cred)
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("error = %v, want %v", err, tt.wantErr)
			}
			if !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("error = %q, want it to contain %q", err, tt.errText)
			}
			t.Logf("error: %v", err)
		})
	}
}

func TestBeginRefuses(t *testing.T) {
	t.Parallel()
	f := newFIDO(t, newClock())
	enrolled := register(t, f, fidotest.New(testRPID, testOrigin), newUser("carol"))
	tests := []struct {
		name    string
		run     func() error
		errText string
	}{
		{"deny/short challenge", func() error { _, _, err := f.BeginAssertion(enrolled, make([]byte, 31)); return err }, "challenge has 31 bytes"},
		{"deny/long challenge", func() error { _, _, err := f.BeginAssertion(enrolled, make([]byte, 1025)); return err }, "challenge has 1025 bytes"},
		{"deny/no credentials", func() error { _, _, err := f.BeginAssertion(newUser("dave"), make([]byte, 32)); return err }, "no registered credentials"},
		{"deny/empty user ID", func() error { _, _, err := f.BeginRegistration(User{Name: "x"}); return err }, "user ID has 0 bytes"},
		{"deny/long user ID", func() error { _, _, err := f.BeginRegistration(User{ID: make([]byte, 65), Name: "x"}); return err }, "user ID has 65 bytes"},
		{"deny/no user name", func() error { _, _, err := f.BeginRegistration(User{ID: []byte("id")}); return err }, "user name"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.run()
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("error = %v, want it to contain %q", err, tt.errText)
			}
		})
	}
}

func TestNewValidatesConfig(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		cfg     Config
		errText string // empty: accepted
	}{
		{name: "ok/https", cfg: Config{RPID: "pinhole.example.com", Origins: []string{"https://pinhole.example.com"}}},
		{name: "ok/subdomain origin with port", cfg: Config{RPID: "example.com", Origins: []string{"https://approve.example.com:8443"}}},
		{name: "ok/localhost http", cfg: Config{RPID: "localhost", Origins: []string{"http://localhost:8080"}, Timeout: time.Minute}},
		{name: "deny/no RPID", cfg: Config{Origins: []string{"https://x.example"}}, errText: "RPID is required"},
		{name: "deny/IP RPID", cfg: Config{RPID: "127.0.0.1", Origins: []string{"https://127.0.0.1"}}, errText: "IP address"},
		{name: "deny/no origins", cfg: Config{RPID: "example.com"}, errText: "at least one origin"},
		{name: "deny/http origin", cfg: Config{RPID: "example.com", Origins: []string{"http://example.com"}}, errText: "must use https"},
		{name: "deny/foreign origin", cfg: Config{RPID: "example.com", Origins: []string{"https://example.com.evil.net"}}, errText: "not \"example.com\""},
		{name: "deny/suffix but not subdomain", cfg: Config{RPID: "example.com", Origins: []string{"https://badexample.com"}}, errText: "not \"example.com\""},
		{name: "deny/origin with path", cfg: Config{RPID: "example.com", Origins: []string{"https://example.com/approve"}}, errText: "scheme://host"},
		{name: "deny/negative timeout", cfg: Config{RPID: "example.com", Origins: []string{"https://example.com"}, Timeout: -time.Second}, errText: "timeout"},
		{name: "deny/huge timeout", cfg: Config{RPID: "example.com", Origins: []string{"https://example.com"}, Timeout: 2 * time.Hour}, errText: "timeout"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := New(tt.cfg)
			switch {
			case tt.errText == "" && err != nil:
				t.Errorf("New: %v", err)
			case tt.errText != "" && (err == nil || !strings.Contains(err.Error(), tt.errText)):
				t.Errorf("New error = %v, want it to contain %q", err, tt.errText)
			}
		})
	}
}

func TestSessionChallengeRefuses(t *testing.T) {
	t.Parallel()
	for _, in := range [][]byte{nil, []byte("{}"), []byte(`{"v":1,"data":{"challenge":"!!"}}`), bytes.Repeat([]byte(" "), MaxSessionSize+1)} {
		if c, err := SessionChallenge(in); err == nil {
			t.Errorf("SessionChallenge(%.40q) = %x, want error", in, c)
		}
	}
}

func FuzzFinishAssertion(f *testing.F) {
	c := newClock()
	fd := newFIDO(f, c)
	a := fidotest.New(testRPID, testOrigin)
	u := register(f, fd, a, newUser("fuzz"))
	session, response := assert(f, fd, a, u, "fuzz seed")
	_, regSession, err := fd.BeginRegistration(u)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(session, response)
	f.Add(session, []byte(`{}`))
	f.Add(session, []byte(`{"id":"AA","rawId":"AA","type":"public-key","response":{"clientDataJSON":"e30","authenticatorData":"","signature":""}}`))
	f.Add(session, []byte(`{"id":"AA","rawId":"AA","type":"public-key","response":{"clientDataJSON":"bnVsbA","authenticatorData":"AAAA","signature":"AA","userHandle":"AA"}}`))
	f.Add(regSession, response)
	f.Add([]byte(`{"v":1,"ceremony":"assertion","rp_id":"localhost","expires":99999999999999,"data":{"challenge":"AAAA","userVerification":"required","user_id":"AA"}}`), response)
	f.Add([]byte("null"), []byte("null"))
	f.Fuzz(func(t *testing.T, session, response []byte) {
		cred, err := fd.FinishAssertion(u, session, response)
		if err != nil {
			if cred != nil {
				t.Fatal("credential returned with an error")
			}
			return
		}
		if cred.Authenticator.SignCount == 0 && u.Credentials[0].Authenticator.SignCount == 0 {
			return // counter-less authenticator
		}
		if cred.Authenticator.SignCount <= u.Credentials[0].Authenticator.SignCount {
			t.Fatalf("accepted a non-increasing sign count %d", cred.Authenticator.SignCount)
		}
	})
}
