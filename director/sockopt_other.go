//go:build !linux

package director

import (
	"syscall"
	"time"
)

// userTimeout does nothing where TCP_USER_TIMEOUT does not exist; keepalive
// still probes idle connections.
func userTimeout(time.Duration) func(string, string, syscall.RawConn) error { return nil }
