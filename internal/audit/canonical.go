package audit

import (
	"slices"
	"strconv"
	"time"
)

// canonicalHeader starts every canonical encoding; it versions the format.
const canonicalHeader = "pinhole-audit-v1\n"

// Canonical returns the deterministic byte encoding of e that Hash is
// computed over. It covers every field except Hash. This is a stored format:
// changing it breaks every existing chain, so a new format needs a new
// header.
//
// The encoding is the header line "pinhole-audit-v1" followed by one line
// per field, in this fixed order, each line ending in "\n":
//
//	seq:<decimal Seq>
//	time:<Time in UTC, RFC 3339 with nanoseconds, trailing zeros trimmed>
//	type:<s>
//	actor:<s>
//	device:<s>
//	src:<s>
//	target:<s>
//	request:<s>
//	grant:<s>
//	details:<decimal number of entries>
//	<k>=<v>        (one line per Details entry, keys in byte order)
//	prev_hash:<s>
//
// where every string <s>, <k> and <v> is written as <decimal byte
// length>:<bytes>, so values may hold any bytes (including newlines) without
// ambiguity. Empty strings are written as "0:". A nil and an empty Details
// both encode as "details:0". For example a details entry {"os": "linux"}
// is the line "2:os=5:linux".
func Canonical(e Event) []byte {
	n := len(canonicalHeader) + 160 + len(e.Type) + len(e.Actor) + len(e.Device) + len(e.Src) +
		len(e.Target) + len(e.Request) + len(e.Grant) + len(e.PrevHash)
	for k, v := range e.Details {
		n += len(k) + len(v) + 24
	}
	b := make([]byte, 0, n)
	b = append(b, canonicalHeader...)
	b = append(b, "seq:"...)
	b = strconv.AppendInt(b, e.Seq, 10)
	b = append(b, "\ntime:"...)
	b = e.Time.UTC().AppendFormat(b, time.RFC3339Nano)
	b = append(b, '\n')
	b = appendField(b, "type", e.Type)
	b = appendField(b, "actor", e.Actor)
	b = appendField(b, "device", e.Device)
	b = appendField(b, "src", e.Src)
	b = appendField(b, "target", e.Target)
	b = appendField(b, "request", e.Request)
	b = appendField(b, "grant", e.Grant)
	b = append(b, "details:"...)
	b = strconv.AppendInt(b, int64(len(e.Details)), 10)
	b = append(b, '\n')
	if len(e.Details) > 0 {
		keys := make([]string, 0, len(e.Details))
		for k := range e.Details {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		for _, k := range keys {
			b = appendString(b, k)
			b = append(b, '=')
			b = appendString(b, e.Details[k])
			b = append(b, '\n')
		}
	}
	b = appendField(b, "prev_hash", e.PrevHash)
	return b
}

func appendField(b []byte, name, v string) []byte {
	b = append(b, name...)
	b = append(b, ':')
	b = appendString(b, v)
	return append(b, '\n')
}

func appendString(b []byte, s string) []byte {
	b = strconv.AppendInt(b, int64(len(s)), 10)
	b = append(b, ':')
	return append(b, s...)
}
