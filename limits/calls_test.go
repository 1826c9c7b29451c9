package limits

import (
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestCallsBoundsCallsInFlightPerIdentity(t *testing.T) {
	c := NewCalls(2, 0, 0)
	r1, err1 := c.Acquire("CN=alice")
	r2, err2 := c.Acquire("CN=alice")
	if err1 != nil || err2 != nil {
		t.Fatalf("within the limit: %v, %v", err1, err2)
	}
	_, err := c.Acquire("CN=alice")
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "limits.concurrentCallsPerIdentity") {
		t.Fatalf("third call: %v, want ResourceExhausted naming limits.concurrentCallsPerIdentity", err)
	}
	if _, err := c.Acquire("CN=bob"); err != nil {
		t.Fatalf("another identity was refused: %v", err)
	}
	r1()
	r1() // a second release must not free another slot
	if _, err := c.Acquire("CN=alice"); err != nil {
		t.Fatalf("after a release: %v", err)
	}
	if _, err := c.Acquire("CN=alice"); err == nil {
		t.Fatal("a double release freed a second slot")
	}
	r2()
	if c.RefusedConcurrent() != 2 || c.RefusedRate() != 0 {
		t.Fatalf("refusals: %d concurrent, %d rate; want 2, 0", c.RefusedConcurrent(), c.RefusedRate())
	}
}

func TestCallsRateHasABurstThenRefuses(t *testing.T) {
	// One call every 1000 s: nothing refills during the test.
	c := NewCalls(0, 0.001, 3)
	for i := range 3 {
		release, err := c.Acquire("CN=alice")
		if err != nil {
			t.Fatalf("call %d of the burst: %v", i+1, err)
		}
		release()
	}
	_, err := c.Acquire("CN=alice")
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "limits.callsPerSecondPerIdentity") ||
		!strings.Contains(err.Error(), "retry after") {
		t.Fatalf("after the burst: %v, want ResourceExhausted naming limits.callsPerSecondPerIdentity", err)
	}
	if _, err := c.Acquire("CN=bob"); err != nil {
		t.Fatalf("another identity has its own bucket: %v", err)
	}
	// Turning the limit off live admits the caller at once.
	c.SetLimits(0, 0, 0)
	for range 100 {
		if _, err := c.Acquire("CN=alice"); err != nil {
			t.Fatalf("rate limit off: %v", err)
		}
	}
}

func TestCallsConcurrentUse(t *testing.T) {
	c := NewCalls(8, 0, 0)
	var wg sync.WaitGroup
	for w := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			id := []string{"CN=a", "CN=b"}[w%2]
			for range 200 {
				if release, err := c.Acquire(id); err == nil {
					release()
				}
			}
		}()
	}
	wg.Wait()
	// Nothing is in flight: every identity can use its full limit again.
	for _, id := range []string{"CN=a", "CN=b"} {
		for i := range 8 {
			if _, err := c.Acquire(id); err != nil {
				t.Fatalf("%s call %d: %v (a slot leaked)", id, i+1, err)
			}
		}
	}
}
