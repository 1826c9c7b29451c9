package limits

import (
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Checks counts the cluster health checks running on this apid, in all and
// per identity. Their bounds are the health section's keys
// (health.maxRunning, health.maxRunningPerIdentity), passed with each
// request, so that the health section owns its keys and this section the
// counting and the refusal.
type Checks struct {
	running atomic.Int64
	// Checks refused by maxRunning and by maxRunningPerIdentity.
	refusedRunning, refusedPerIdentity atomic.Int64

	mu    sync.Mutex
	perID map[string]int // checks running per identity
}

// admit counts a check in, globally and for its caller, or says why not.
func (c *Checks) admit(id string, maxRunning, perIdentity int) (release func(), err error) {
	if n := c.running.Add(1); maxRunning > 0 && n > int64(maxRunning) {
		c.running.Add(-1)
		c.refusedRunning.Add(1)
		return nil, status.Errorf(codes.ResourceExhausted, "%d cluster health checks are running on this apid already: try again later", maxRunning)
	}
	c.mu.Lock()
	if perIdentity > 0 && c.perID[id] >= perIdentity {
		c.mu.Unlock()
		c.running.Add(-1)
		c.refusedPerIdentity.Add(1)
		return nil, status.Errorf(codes.ResourceExhausted, "%q runs %d cluster health checks already (health.maxRunningPerIdentity): wait for one to end", id, perIdentity)
	}
	c.perID[id]++
	c.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			if c.perID[id]--; c.perID[id] == 0 {
				delete(c.perID, id)
			}
			c.mu.Unlock()
			c.running.Add(-1)
		})
	}, nil
}
