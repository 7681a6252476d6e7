package netstacktun

import (
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/header"
)

func FuzzAllowedPacket(f *testing.F) {
	tcp4 := make([]byte, 40)
	header.IPv4(tcp4).Encode(&header.IPv4Fields{TotalLength: 40, Protocol: uint8(header.TCPProtocolNumber), TTL: 64})
	udp4 := make([]byte, 28)
	header.IPv4(udp4).Encode(&header.IPv4Fields{TotalLength: 28, Protocol: uint8(header.UDPProtocolNumber), TTL: 64})
	tcp6 := make([]byte, 60)
	header.IPv6(tcp6).Encode(&header.IPv6Fields{PayloadLength: 20, TransportProtocol: header.TCPProtocolNumber, HopLimit: 64})
	icmp6 := make([]byte, 48)
	header.IPv6(icmp6).Encode(&header.IPv6Fields{PayloadLength: 8, TransportProtocol: header.ICMPv6ProtocolNumber, HopLimit: 64})
	for _, seed := range [][]byte{tcp4, udp4, tcp6, icmp6, {}, {0x45}, {0x00, 1, 2}, {0x60}} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, p []byte) {
		proto, ok := AllowedPacket(p)
		if !ok {
			return
		}
		switch proto {
		case header.IPv4ProtocolNumber:
			if len(p) < header.IPv4MinimumSize || header.IPv4(p).Protocol() != uint8(header.TCPProtocolNumber) {
				t.Fatalf("accepted non-TCP IPv4 packet % x", p)
			}
		case header.IPv6ProtocolNumber:
			if len(p) < header.IPv6MinimumSize || header.IPv6(p).NextHeader() != uint8(header.TCPProtocolNumber) {
				t.Fatalf("accepted non-TCP IPv6 packet % x", p)
			}
		default:
			t.Fatalf("unexpected protocol %d", proto)
		}
	})
}

func TestAllowedPacket(t *testing.T) {
	t.Parallel()
	mk4 := func(proto uint8) []byte {
		p := make([]byte, 40)
		header.IPv4(p).Encode(&header.IPv4Fields{TotalLength: 40, Protocol: proto, TTL: 64})
		return p
	}
	tests := []struct {
		name string
		p    []byte
		want bool
	}{
		{"ok/tcp4", mk4(uint8(header.TCPProtocolNumber)), true},
		{"drop/udp4", mk4(uint8(header.UDPProtocolNumber)), false},
		{"drop/icmp4", mk4(uint8(header.ICMPv4ProtocolNumber)), false},
		{"drop/short", []byte{0x45, 0}, false},
		{"drop/empty", nil, false},
		{"drop/version0", make([]byte, 40), false},
	}
	for _, tt := range tests {
		if _, got := AllowedPacket(tt.p); got != tt.want {
			t.Errorf("%s: AllowedPacket = %v, want %v", tt.name, got, tt.want)
		}
	}
}
