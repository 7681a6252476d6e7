package fidotest

import (
	"strings"
	"testing"
)

func TestRefuses(t *testing.T) {
	t.Parallel()
	const challenge = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
	tests := []struct {
		name    string
		run     func(a *Authenticator) error
		errText string
	}{
		{"deny/registration for another relying party", func(a *Authenticator) error {
			_, err := a.Register([]byte(`{"rp":{"id":"evil.example","name":"x"},"user":{"id":"dQ","name":"u","displayName":"U"},"challenge":"` + challenge + `"}`))
			return err
		}, `relying party "evil.example"`},
		{"deny/assertion for another relying party", func(a *Authenticator) error {
			_, err := a.Assert([]byte(`{"rpId":"evil.example","challenge":"` + challenge + `"}`))
			return err
		}, `relying party "evil.example"`},
		{"deny/assertion without credentials", func(a *Authenticator) error {
			_, err := a.Assert([]byte(`{"rpId":"localhost","challenge":"` + challenge + `"}`))
			return err
		}, "no allowed credential"},
		{"deny/garbage options", func(a *Authenticator) error {
			_, err := a.Register([]byte(`{`))
			return err
		}, "parsing creation options"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.run(New("localhost", "http://localhost:8080"))
			if err == nil || !strings.Contains(err.Error(), tt.errText) {
				t.Errorf("error = %v, want it to contain %q", err, tt.errText)
			}
		})
	}
}
