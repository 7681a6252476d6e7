package audit_test

import (
	"fmt"
	"time"

	"github.com/pinhole-dev/pinhole/internal/audit"
)

// Seal each event onto the hash of the one before it, starting at the
// genesis hash; Verify recomputes the chain and names the first bad event.
func Example() {
	start := time.Date(2026, 3, 14, 9, 0, 0, 0, time.UTC)
	prev := audit.GenesisHash
	var chain []audit.Event
	for i, typ := range []string{audit.TypeRequestCreated, audit.TypeApprovalRecorded, audit.TypeGrantIssued} {
		e := audit.Seal(prev, audit.Event{
			Seq:     int64(i + 1),
			Time:    start.Add(time.Duration(i) * time.Minute),
			Type:    typ,
			Actor:   "alice",
			Request: "req-1",
		})
		chain = append(chain, e)
		prev = e.Hash
	}
	fmt.Println("intact:", audit.Verify(chain))

	chain[1].Actor = "mallory" // tamper with the approval
	fmt.Println("edited:", audit.Verify(chain))
	// Output:
	// intact: <nil>
	// edited: audit: event seq 2: hash does not match the event's contents
}
