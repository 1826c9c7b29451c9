package limits

import "testing"

func TestByteSizes(t *testing.T) {
	for in, want := range map[string]ByteSize{"0": 0, "1024": 1024, "64KiB": 64 << 10, "1 MiB": 1 << 20, "3GiB": 3 << 30, "12B": 12} {
		if got, err := ParseByteSize(in); err != nil || got != want {
			t.Errorf("%q: %d, %v; want %d", in, got, err, want)
		}
	}
	for _, in := range []string{"", "-1", "1.5MiB", "12kb", "MiB", "99999999999GiB"} {
		if _, err := ParseByteSize(in); err == nil {
			t.Errorf("%q accepted", in)
		}
	}
}

// TestPerNodeBudgets: an identity's streams to one node are bounded apart
// from its short calls, and apart from other identities and nodes.
func TestPerNodeBudgets(t *testing.T) {
	p := NewPerNode(2, 1)
	var releases []func()
	acquire := func(id, node string, stream, ok bool) {
		t.Helper()
		r, err := p.Acquire(id, node, stream)
		if (err == nil) != ok {
			t.Fatalf("%s to %s (stream %v): %v, want admitted %v", id, node, stream, err, ok)
		}
		if r != nil {
			releases = append(releases, r)
		}
	}
	acquire("reader", "n1", true, true)
	acquire("reader", "n1", true, false) // its one stream to n1 is taken
	acquire("reader", "n1", false, true) // short calls have their own budget
	acquire("reader", "n1", false, true)
	acquire("reader", "n1", false, false)
	acquire("reader", "n2", true, true) // another node
	acquire("admin", "n1", true, true)  // another identity
	releases[0]()
	releases[0]() // twice: once only
	acquire("reader", "n1", true, true)
	acquire("reader", "n1", true, false)
	if p.Refused() != 3 {
		t.Errorf("refused %d, want 3", p.Refused())
	}
}
