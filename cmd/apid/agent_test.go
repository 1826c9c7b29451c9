//go:build !nodemo

package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestAgentClientCAOnlyOnUnixSockets: the agent does not authenticate its
// callers, so it refuses to hold a client CA behind a TCP port, and checks
// the pair before serving.
func TestAgentClientCAOnlyOnUnixSockets(t *testing.T) {
	dir := t.TempDir()
	if _, _, err := runCmd(t, "gen", "ca", "-out", dir); err != nil {
		t.Fatal(err)
	}
	crt, key := filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key")
	for _, tc := range []struct {
		args []string
		want string
	}{
		{[]string{"-listen", "127.0.0.1:0", "-client-ca-cert", crt, "-client-ca-key", key}, "only on a unix socket"},
		{[]string{"-listen", "unix://" + filepath.Join(dir, "a.sock"), "-client-ca-cert", crt}, "go together"},
		{[]string{"-listen", "unix://" + filepath.Join(dir, "a.sock"), "-client-ca-cert", crt, "-client-ca-key", crt}, "-client-ca-cert/-client-ca-key"},
	} {
		_, _, err := runCmd(t, append([]string{"agent"}, tc.args...)...)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("agent %v: %v, want %q", tc.args, err, tc.want)
		}
	}
}
