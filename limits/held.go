package limits

import (
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Held counts the disruptive calls each identity has waiting for the
// disruption budget. The bound is the disruption section's key
// (disruption.maxHeldPerIdentity), passed with each request, as the health
// section's are for checks: that section owns its keys, this one the
// counting and the refusal.
type Held struct {
	refused atomic.Int64

	mu    sync.Mutex
	perID map[string]int
}

// admit counts one held call of id in, or says why not.
func (h *Held) admit(id string, perIdentity int) (release func(), err error) {
	h.mu.Lock()
	if perIdentity > 0 && h.perID[id] >= perIdentity {
		h.mu.Unlock()
		h.refused.Add(1)
		return nil, status.Errorf(codes.ResourceExhausted,
			"%q has %d disruptive calls held already (disruption.maxHeldPerIdentity): wait for one to be admitted", id, perIdentity)
	}
	h.perID[id]++
	h.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			h.mu.Lock()
			if h.perID[id]--; h.perID[id] == 0 {
				delete(h.perID, id)
			}
			h.mu.Unlock()
		})
	}, nil
}
