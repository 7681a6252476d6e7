package posture

import (
	"bytes"
	"crypto/ed25519"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

var testNow = time.Date(2026, 3, 14, 15, 9, 26, 0, time.UTC)

func testKey(t testing.TB, seed byte) (ed25519.PublicKey, ed25519.PrivateKey) {
	t.Helper()
	priv := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{seed}, ed25519.SeedSize))
	return priv.Public().(ed25519.PublicKey), priv
}

func testReport() Report {
	return Report{
		Device:         "dev-7f3a",
		Hostname:       "ws-alice",
		OS:             "Debian GNU/Linux 12 (bookworm)",
		Kernel:         "6.1.0-18-amd64",
		DiskEncrypted:  true,
		FirewallActive: true,
		ScreenLock:     ScreenLockUnknown,
		AgentVersion:   "0.1.0",
		CollectedAt:    testNow.Add(-30 * time.Second),
		Nonce:          "n-0123456789abcdef",
	}
}

// signRaw signs arbitrary bytes as a report, bypassing Sign's checks.
func signRaw(priv ed25519.PrivateKey, b []byte) Signed {
	return Signed{Report: b, Signature: ed25519.Sign(priv, b)}
}

func TestSignVerify(t *testing.T) {
	t.Parallel()
	pub, priv := testKey(t, 1)
	otherPub, _ := testKey(t, 2)

	mustSign := func(r Report) Signed {
		s, err := Sign(priv, r)
		if err != nil {
			t.Fatalf("Sign: %v", err)
		}
		return s
	}
	good := mustSign(testReport())

	tampered := good
	tampered.Report = bytes.Replace(good.Report, []byte(`"firewall_active":true`), []byte(`"firewall_active":false`), 1)
	if bytes.Equal(tampered.Report, good.Report) {
		t.Fatal("tampering did not change the report")
	}

	unknownField := func() Signed {
		var m map[string]any
		if err := json.Unmarshal(good.Report, &m); err != nil {
			t.Fatal(err)
		}
		m["extra"] = 1
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return signRaw(priv, b)
	}()
	missingField := func() Signed {
		var m map[string]any
		if err := json.Unmarshal(good.Report, &m); err != nil {
			t.Fatal(err)
		}
		delete(m, "disk_encrypted")
		b, err := json.Marshal(m)
		if err != nil {
			t.Fatal(err)
		}
		return signRaw(priv, b)
	}()
	badScreenLock := func() Signed {
		b := bytes.Replace(good.Report, []byte(`"screen_lock":"unknown"`), []byte(`"screen_lock":"maybe"`), 1)
		return signRaw(priv, b)
	}()
	oversized := signRaw(priv, append(bytes.Clone(good.Report), bytes.Repeat([]byte(" "), MaxReportSize)...))
	trailing := signRaw(priv, append(bytes.Clone(good.Report), []byte(`{}`)...))

	stale := testReport()
	stale.CollectedAt = testNow.Add(-11 * time.Minute)
	future := testReport()
	future.CollectedAt = testNow.Add(2 * time.Minute)
	slightlyAhead := testReport()
	slightlyAhead.CollectedAt = testNow.Add(30 * time.Second)
	noNonce := testReport()
	noNonce.Nonce = ""

	tests := []struct {
		name    string
		pub     ed25519.PublicKey
		signed  Signed
		opts    VerifyOptions
		want    Report
		wantErr error  // sentinel, if any
		errText string // substring of the message, if any
	}{
		{name: "ok/fresh", pub: pub, signed: good, opts: VerifyOptions{Now: testNow, Nonce: "n-0123456789abcdef"}, want: testReport()},
		{name: "ok/nonce not required", pub: pub, signed: good, opts: VerifyOptions{Now: testNow}, want: testReport()},
		{name: "ok/within skew", pub: pub, signed: mustSign(slightlyAhead), opts: VerifyOptions{Now: testNow}, want: slightlyAhead},
		{name: "ok/no nonce", pub: pub, signed: mustSign(noNonce), opts: VerifyOptions{Now: testNow}, want: noNonce},
		{name: "deny/tampered report", pub: pub, signed: tampered, opts: VerifyOptions{Now: testNow}, wantErr: ErrBadSignature},
		{name: "deny/wrong key", pub: otherPub, signed: good, opts: VerifyOptions{Now: testNow}, wantErr: ErrBadSignature},
		{name: "deny/truncated signature", pub: pub, signed: Signed{Report: good.Report, Signature: good.Signature[:10]}, opts: VerifyOptions{Now: testNow}, wantErr: ErrBadSignature},
		{name: "deny/no signature", pub: pub, signed: Signed{Report: good.Report}, opts: VerifyOptions{Now: testNow}, wantErr: ErrBadSignature},
		{name: "deny/stale", pub: pub, signed: mustSign(stale), opts: VerifyOptions{Now: testNow}, wantErr: ErrStale, errText: "collected 11m0s ago (max age 10m0s)"},
		{name: "deny/stale under custom max age", pub: pub, signed: good, opts: VerifyOptions{Now: testNow, MaxAge: 10 * time.Second}, wantErr: ErrStale, errText: "30s ago"},
		{name: "deny/future", pub: pub, signed: mustSign(future), opts: VerifyOptions{Now: testNow}, wantErr: ErrFuture},
		{name: "deny/wrong nonce", pub: pub, signed: good, opts: VerifyOptions{Now: testNow, Nonce: "n-other"}, wantErr: ErrNonce},
		{name: "deny/nonce missing", pub: pub, signed: mustSign(noNonce), opts: VerifyOptions{Now: testNow, Nonce: "n-0123456789abcdef"}, wantErr: ErrNonce},
		{name: "deny/oversized", pub: pub, signed: oversized, opts: VerifyOptions{Now: testNow}, wantErr: ErrTooLarge},
		{name: "deny/unknown field", pub: pub, signed: unknownField, opts: VerifyOptions{Now: testNow}, errText: `unknown field "extra"`},
		{name: "deny/missing field", pub: pub, signed: missingField, opts: VerifyOptions{Now: testNow}, errText: `missing field "disk_encrypted"`},
		{name: "deny/invalid screen lock", pub: pub, signed: badScreenLock, opts: VerifyOptions{Now: testNow}, errText: `"screen_lock" is "maybe"`},
		{name: "deny/trailing data", pub: pub, signed: trailing, opts: VerifyOptions{Now: testNow}, errText: "trailing data"},
		{name: "deny/not json", pub: pub, signed: signRaw(priv, []byte("hello")), opts: VerifyOptions{Now: testNow}, errText: "decoding report"},
		{name: "deny/short public key", pub: pub[:5], signed: good, opts: VerifyOptions{Now: testNow}, errText: "public key has 5 bytes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := Verify(tt.pub, tt.signed, tt.opts)
			if tt.wantErr == nil && tt.errText == "" {
				if err != nil {
					t.Fatalf("Verify: %v", err)
				}
				if diff := cmp.Diff(got, tt.want); diff != "" {
					t.Errorf("Verify report (-got +want):\n%s", diff)
				}
				return
			}
			if err == nil {
				t.Fatalf("Verify succeeded, want error")
			}
			if tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Errorf("Verify error = %v, want %v", err, tt.wantErr)
			}
			if tt.errText != "" && !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("Verify error = %q, want it to contain %q", err, tt.errText)
			}
			if diff := cmp.Diff(got, Report{}); diff != "" {
				t.Errorf("Verify returned a report with an error (-got +want):\n%s", diff)
			}
		})
	}
}

func TestSignRefuses(t *testing.T) {
	t.Parallel()
	_, priv := testKey(t, 1)
	tests := []struct {
		name    string
		priv    ed25519.PrivateKey
		mutate  func(*Report)
		wantErr error
		errText string
	}{
		{name: "deny/short key", priv: priv[:10], mutate: func(*Report) {}, errText: "private key has 10 bytes"},
		{name: "deny/no device", priv: priv, mutate: func(r *Report) { r.Device = "" }, errText: `"device" is empty`},
		{name: "deny/zero time", priv: priv, mutate: func(r *Report) { r.CollectedAt = time.Time{} }, errText: "collected_at"},
		{name: "deny/bad screen lock", priv: priv, mutate: func(r *Report) { r.ScreenLock = "" }, errText: "screen_lock"},
		{name: "deny/long field", priv: priv, mutate: func(r *Report) { r.OS = strings.Repeat("x", MaxFieldLen+1) }, errText: "max 1024"},
		{name: "deny/invalid utf8", priv: priv, mutate: func(r *Report) { r.Hostname = "\xff" }, errText: "UTF-8"},
		{name: "deny/line separator", priv: priv, mutate: func(r *Report) { r.Hostname = "ws\u2028disk encryption: yes" }, errText: "U+2028"},
		{name: "deny/bidi override", priv: priv, mutate: func(r *Report) { r.OS = "Debian \u202e21" }, errText: "U+202E"},
		{name: "deny/newline", priv: priv, mutate: func(r *Report) { r.Kernel = "6.1\nfirewall: on" }, errText: "U+000A"},
		{name: "deny/blank filler", priv: priv, mutate: func(r *Report) { r.AgentVersion = "1\u3164" }, errText: "U+3164"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			r := testReport()
			tt.mutate(&r)
			_, err := Sign(tt.priv, r)
			if err == nil {
				t.Fatal("Sign succeeded, want error")
			}
			if !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("Sign error = %q, want it to contain %q", err, tt.errText)
			}
		})
	}
}

func TestSignedJSONRoundTrip(t *testing.T) {
	t.Parallel()
	pub, priv := testKey(t, 3)
	s, err := Sign(priv, testReport())
	if err != nil {
		t.Fatal(err)
	}
	wire, err := json.Marshal(s)
	if err != nil {
		t.Fatal(err)
	}
	var back Signed
	if err := json.Unmarshal(wire, &back); err != nil {
		t.Fatal(err)
	}
	got, err := Verify(pub, back, VerifyOptions{Now: testNow})
	if err != nil {
		t.Fatalf("Verify after JSON round trip: %v", err)
	}
	if diff := cmp.Diff(got, testReport()); diff != "" {
		t.Errorf("report (-got +want):\n%s", diff)
	}
	for _, key := range []string{`"device"`, `"disk_encrypted"`, `"firewall_active"`, `"screen_lock"`, `"agent_version"`, `"collected_at"`, `"nonce"`} {
		if !bytes.Contains(s.Report, []byte(key)) {
			t.Errorf("encoded report %s lacks key %s", s.Report, key)
		}
	}
}

func FuzzVerify(f *testing.F) {
	pub, priv := testKey(f, 4)
	good, err := Sign(priv, testReport())
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good.Report, good.Signature)
	f.Add([]byte(`{}`), good.Signature)
	f.Add([]byte(`{"device":null}`), []byte{})
	f.Add([]byte(`[1,2,3]`), bytes.Repeat([]byte{0}, ed25519.SignatureSize))
	f.Add([]byte("\x00\xff"), []byte("sig"))
	f.Fuzz(func(t *testing.T, report, sig []byte) {
		// Arbitrary bytes under an arbitrary signature.
		if r, err := Verify(pub, Signed{Report: report, Signature: sig}, VerifyOptions{Now: testNow}); err == nil {
			// Only a genuine signature may pass.
			if !ed25519.Verify(pub, report, sig) {
				t.Fatalf("Verify accepted an unsigned report: %+v", r)
			}
		}
		// Arbitrary bytes correctly signed: the decoder must not panic, and
		// what it accepts must satisfy the schema.
		if len(report) <= MaxReportSize {
			r, err := Verify(pub, signRaw(priv, report), VerifyOptions{Now: testNow, MaxAge: 100 * 365 * 24 * time.Hour, MaxSkew: 100 * 365 * 24 * time.Hour})
			if err == nil {
				if verr := r.validate(); verr != nil {
					t.Fatalf("Verify accepted an invalid report: %v", verr)
				}
			}
		}
	})
}

func BenchmarkVerify(b *testing.B) {
	pub, priv := testKey(b, 5)
	s, err := Sign(priv, testReport())
	if err != nil {
		b.Fatal(err)
	}
	opts := VerifyOptions{Now: testNow}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Verify(pub, s, opts); err != nil {
			b.Fatal(err)
		}
	}
}
