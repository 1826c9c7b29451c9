// Package testkit holds what the tests of every package share: a context
// bounded in time that ends with its test, and a bounded wait for a
// condition. Test code only; nothing of apid's imports it.
package testkit

import (
	"context"
	"testing"
	"time"
)

// Timeout bounds every test context: generous, so that a loaded machine
// does not fail a test that works, and finite, so that a hang fails.
const Timeout = 60 * time.Second

// Context returns a context that ends after Timeout or when t ends.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	t.Cleanup(cancel)
	return ctx
}

// Eventually polls cond until it holds (true) or timeout passes (false).
func Eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}
