package files

import "testing"

// SetFileLimits lowers the limits of List, DiskUsage and Copy for one test:
// the entries a walk visits and the file content Copy archives. It must not
// run in parallel with other tests; the old limits return when t ends.
func SetFileLimits(t testing.TB, entries int, copyBytes int64) {
	oldEntries, oldBytes := maxWalkEntries, maxCopyBytes
	t.Cleanup(func() { maxWalkEntries, maxCopyBytes = oldEntries, oldBytes })
	maxWalkEntries, maxCopyBytes = entries, copyBytes
}
