package cli

import (
	"encoding/json"
	"testing"

	"github.com/pinhole-dev/pinhole/internal/audit"
)

func FuzzDecodeEvent(f *testing.F) {
	good, _ := json.Marshal(chain(1)[0])
	f.Add(good)
	f.Add([]byte(`{"seq":1,"extra":true}`))
	f.Add([]byte(`{"seq":1} {"seq":2}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, raw []byte) {
		ev, err := decodeEvent(raw)
		if err != nil {
			return
		}
		// Whatever decodes must verify or fail with a VerifyError, never panic.
		_ = verifyChain([]audit.Event{ev})
	})
}
