package api_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/pinhole-dev/pinhole/broker/api"
	"github.com/pinhole-dev/pinhole/broker/service"
	"github.com/pinhole-dev/pinhole/internal/store"
	"github.com/pinhole-dev/pinhole/internal/wire"
)

func decode(body, contentType string) (wire.CreateRequest, error) {
	r := httptest.NewRequest(http.MethodPost, wire.PathRequests, strings.NewReader(body))
	if contentType != "" {
		r.Header.Set("Content-Type", contentType)
	}
	var v wire.CreateRequest
	err := api.DecodeBody(httptest.NewRecorder(), r, &v)
	return v, err
}

func TestDecodeBody(t *testing.T) {
	t.Parallel()
	valid := `{"target":"db-prod","ttl":"45m","reason":"INC-4821 vacuum"}`
	want := wire.CreateRequest{Target: "db-prod", TTL: "45m", Reason: "INC-4821 vacuum"}
	// A valid object padded with spaces inside a string so that it is
	// larger than the limit.
	huge := `{"target":"db-prod","ttl":"45m","reason":"` + strings.Repeat("a", wire.MaxBodyBytes) + `"}`
	tests := []struct {
		name        string
		body        string
		contentType string
		want        wire.CreateRequest
		wantErr     string // substring of the error; empty means success
	}{
		{name: "ok/plain", body: valid, contentType: "application/json", want: want},
		{name: "ok/charset", body: valid, contentType: "application/json; charset=utf-8", want: want},
		{name: "ok/no_content_type", body: valid, want: want},
		{name: "ok/surrounding_whitespace", body: " \n\t" + valid + " \r\n", want: want},
		{name: "ok/exactly_the_limit", body: valid[:len(valid)-1] + strings.Repeat(" ", wire.MaxBodyBytes-len(valid)) + "}", want: want},
		{name: "deny/empty", body: "", wantErr: "request body is empty"},
		{name: "deny/whitespace_only", body: "  \n", wantErr: "request body is empty"},
		{name: "deny/truncated", body: `{"target":"db-prod","ttl":`, wantErr: "ends in the middle of a value"},
		{name: "deny/syntax", body: `{"target" "db-prod"}`, wantErr: "not valid JSON at byte"},
		{name: "deny/trailing_object", body: valid + `{"target":"other"}`, wantErr: "data after the JSON object"},
		{name: "deny/trailing_garbage", body: valid + " x", wantErr: "data after the JSON object"},
		{name: "deny/trailing_close_brace", body: valid + "}", wantErr: "data after the JSON object"},
		{name: "deny/trailing_close_bracket", body: valid + "]", wantErr: "data after the JSON object"},
		{name: "deny/null", body: "null", wantErr: "JSON object"},
		{name: "deny/unknown_field", body: `{"target":"db-prod","bogus":1}`, wantErr: `unknown field "bogus"`},
		{name: "deny/field_in_other_case", body: `{"Target":"db-prod","ttl":"45m","reason":"x"}`, wantErr: `unknown field "Target" (names are case-sensitive)`},
		{name: "deny/duplicate_field", body: `{"target":"db-prod","target":"pg","ttl":"45m","reason":"x"}`, wantErr: `field /target appears more than once`},
		{name: "deny/wrong_type", body: `{"target":42}`, wantErr: `field "target": want string, got JSON number`},
		{name: "deny/array", body: `[]`, wantErr: "got JSON array"},
		{name: "deny/oversized", body: huge, wantErr: fmt.Sprintf("larger than %d bytes", wire.MaxBodyBytes)},
		{name: "deny/oversized_by_trailing_whitespace", body: valid + strings.Repeat(" ", wire.MaxBodyBytes) + "x",
			wantErr: fmt.Sprintf("larger than %d bytes", wire.MaxBodyBytes)},
		{name: "deny/content_type_text", body: valid, contentType: "text/plain", wantErr: `content type "text/plain": want application/json`},
		{name: "deny/content_type_form", body: valid, contentType: "application/x-www-form-urlencoded", wantErr: "want application/json"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := decode(tc.body, tc.contentType)
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("DecodeBody: %v", err)
				}
				if d := cmp.Diff(tc.want, got); d != "" {
					t.Errorf("decoded value (-want +got):\n%s", d)
				}
				return
			}
			if err == nil {
				t.Fatalf("DecodeBody accepted %.60q; want an error containing %q", tc.body, tc.wantErr)
			}
			if !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("DecodeBody error %q does not contain %q", err, tc.wantErr)
			}
		})
	}
}

func TestStatus(t *testing.T) {
	t.Parallel()
	svcErr := func(k service.Kind) error { return &service.Error{Kind: k, Msg: "m"} }
	tests := []struct {
		name       string
		err        error
		wantStatus int
		wantCode   string
	}{
		{"internal", svcErr(service.KindInternal), http.StatusInternalServerError, "internal"},
		{"bad_input", svcErr(service.KindBadInput), http.StatusBadRequest, "bad_request"},
		{"unauthenticated", svcErr(service.KindUnauthenticated), http.StatusUnauthorized, "unauthenticated"},
		{"forbidden", svcErr(service.KindForbidden), http.StatusForbidden, "forbidden"},
		{"not_found", svcErr(service.KindNotFound), http.StatusNotFound, "not_found"},
		{"conflict", svcErr(service.KindConflict), http.StatusConflict, "conflict"},
		{"policy", svcErr(service.KindPolicy), http.StatusForbidden, "policy"},
		{"gone", svcErr(service.KindGone), http.StatusGone, "gone"},
		{"unknown_kind", svcErr(service.Kind(99)), http.StatusInternalServerError, "internal"},
		{"wrapped_service_error", fmt.Errorf("ctx: %w", svcErr(service.KindGone)), http.StatusGone, "gone"},
		{"store_not_found", fmt.Errorf("device x: %w", store.ErrNotFound), http.StatusNotFound, "not_found"},
		{"store_conflict", fmt.Errorf("link: %w", store.ErrConflict), http.StatusConflict, "conflict"},
		{"service_kind_wins_over_store", &service.Error{Kind: service.KindForbidden, Err: store.ErrNotFound}, http.StatusForbidden, "forbidden"},
		{"plain", errors.New("disk on fire"), http.StatusInternalServerError, "internal"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			status, code := api.Status(tc.err)
			if status != tc.wantStatus || code != tc.wantCode {
				t.Errorf("Status(%v) = %d %q, want %d %q", tc.err, status, code, tc.wantStatus, tc.wantCode)
			}
		})
	}
}

func TestWriteServiceError(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		err        error
		wantStatus int
		want       wire.Error
		wantLogged bool
	}{
		{"shown/conflict", &service.Error{Kind: service.KindConflict, Msg: "this link was already used"}, http.StatusConflict,
			wire.Error{Error: "this link was already used", Code: "conflict"}, false},
		{"hidden/internal", fmt.Errorf("reading user: %w", errors.New("SQL logic error near secret_table")), http.StatusInternalServerError,
			wire.Error{Error: "internal error", Code: "internal"}, true},
		// A client hanging up (or shutdown) is no error: debug only.
		{"quiet/canceled", fmt.Errorf("waiting: %w", context.Canceled), 499,
			wire.Error{Error: "request canceled", Code: "canceled"}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			var logs bytes.Buffer
			w := httptest.NewRecorder()
			api.WriteServiceError(w, slog.New(slog.NewTextHandler(&logs, nil)), tc.err)
			if w.Code != tc.wantStatus {
				t.Errorf("status = %d, want %d", w.Code, tc.wantStatus)
			}
			if ct := w.Header().Get("Content-Type"); ct != "application/json" {
				t.Errorf("Content-Type = %q, want application/json", ct)
			}
			var got wire.Error
			if err := json.Unmarshal(w.Body.Bytes(), &got); err != nil {
				t.Fatalf("body %q: %v", w.Body, err)
			}
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Errorf("body (-want +got):\n%s", d)
			}
			if logged := logs.Len() > 0; logged != tc.wantLogged {
				t.Errorf("logged = %v, want %v (log: %q)", logged, tc.wantLogged, logs.String())
			}
		})
	}
}

func TestServeHTTPUnknownEndpoint(t *testing.T) {
	t.Parallel()
	// Routing needs no service: an unknown /v1/ path is answered before any
	// handler touches it.
	srv := api.New(nil, nil, nil, nil)
	w := httptest.NewRecorder()
	srv.ServeHTTP(w, httptest.NewRequest(http.MethodGet, "/v1/nope", nil))
	if w.Code != http.StatusNotFound {
		t.Errorf("status = %d, want 404", w.Code)
	}
	for h, want := range map[string]string{"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Content-Type": "application/json"} {
		if got := w.Header().Get(h); got != want {
			t.Errorf("%s = %q, want %q", h, got, want)
		}
	}
	var got wire.Error
	if err := json.NewDecoder(io.LimitReader(w.Body, 1<<10)).Decode(&got); err != nil {
		t.Fatal(err)
	}
	if got.Code != "not_found" || !strings.Contains(got.Error, "GET /v1/nope") {
		t.Errorf("body = %+v, want not_found naming GET /v1/nope", got)
	}
}

func FuzzDecodeBody(f *testing.F) {
	for _, seed := range []struct{ body, contentType string }{
		{`{"target":"db-prod","ttl":"45m","reason":"INC-4821"}`, "application/json"},
		{`{"target":"db-prod"}`, ""},
		{``, ""},
		{`{"target":`, ""},
		{`{"target":"a"} {"target":"b"}`, ""},
		{`{"bogus":true}`, ""},
		{`{"target":"a","target":"b"}`, ""},
		{`{"TTL":"1m"}`, ""},
		{`{"ttl":45}`, ""},
		{`[1,2,3]`, ""},
		{`"\ud800"`, ""},
		{`{"reason":"\u0000\u2028"}`, "application/json; charset=utf-8"},
		{`{"target":"x"}`, "text/html"},
		{"\xff\xfe{}", ""},
	} {
		f.Add(seed.body, seed.contentType)
	}
	f.Fuzz(func(t *testing.T, body, contentType string) {
		got, err := decode(body, contentType)
		if err != nil {
			if err.Error() == "" {
				t.Fatal("empty error message")
			}
			return
		}
		// Accepted: the body is one bounded JSON object that strict decoding
		// reads to the same value.
		if len(body) > wire.MaxBodyBytes {
			t.Fatalf("accepted a %d-byte body", len(body))
		}
		if !json.Valid([]byte(body)) {
			t.Fatalf("accepted invalid JSON %q", body)
		}
		if trimmed := strings.TrimLeft(body, " \t\r\n"); !strings.HasPrefix(trimmed, "{") {
			t.Fatalf("accepted a body that is not a JSON object: %q", body)
		}
		var again wire.CreateRequest
		if err := json.Unmarshal([]byte(body), &again); err != nil {
			t.Fatalf("accepted %q, but json.Unmarshal refuses it: %v", body, err)
		}
		if d := cmp.Diff(again, got); d != "" {
			t.Fatalf("decoded value differs from json.Unmarshal (-unmarshal +decode):\n%s", d)
		}
	})
}
