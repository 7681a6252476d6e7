// Package wglog adapts wireguard-go's printf-style logger to log/slog, for
// the broker's gateway and the agent's tunnel alike.
package wglog

import (
	"context"
	"fmt"
	"log/slog"

	"golang.zx2c4.com/wireguard/device"
)

// New returns a wireguard-go logger writing to log: verbose lines at debug
// level, errors at error level, each with component=wireguard.
func New(log *slog.Logger) *device.Logger {
	logf := func(level slog.Level) func(string, ...any) {
		return func(format string, args ...any) {
			if !log.Enabled(context.Background(), level) {
				return
			}
			log.Log(context.Background(), level, fmt.Sprintf(format, args...), "component", "wireguard")
		}
	}
	return &device.Logger{Verbosef: logf(slog.LevelDebug), Errorf: logf(slog.LevelError)}
}
