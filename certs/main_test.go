package certs_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the run if a test leaves a goroutine behind: servers,
// watchers and connections must all be shut down by their owners.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
