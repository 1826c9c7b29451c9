package limits

import (
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Calls bounds what one caller identity (a client certificate subject) may
// ask of apid: the calls it has in flight at once, and the rate at which it
// starts new ones (a token bucket: a steady rate per second and a burst).
// A call over either limit is refused before it reaches any node.
type Calls struct {
	mu         sync.Mutex
	concurrent int
	perSecond  rate.Limit
	burst      int
	callers    map[string]*caller
	swept      time.Time

	refusedConcurrent atomic.Int64
	refusedRate       atomic.Int64
}

// caller is one identity's calls in flight and token bucket.
type caller struct {
	inFlight int
	bucket   *rate.Limiter
}

// sweepEvery is how often identities with nothing in flight and a full
// bucket are forgotten, so that the table holds only recent callers.
const sweepEvery = time.Minute

// NewCalls returns limits of concurrent calls in flight per identity and
// perSecond new calls per second with bursts of burst; zero or less turns
// the limit off.
func NewCalls(concurrent int, perSecond float64, burst int) *Calls {
	c := &Calls{callers: map[string]*caller{}, swept: time.Now()}
	c.SetLimits(concurrent, perSecond, burst)
	return c
}

// SetLimits changes the limits; calls in flight are never cut by a lower
// limit, but count against it.
func (c *Calls) SetLimits(concurrent int, perSecond float64, burst int) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.concurrent = concurrent
	c.perSecond, c.burst = rate.Inf, 0
	if perSecond > 0 {
		c.perSecond, c.burst = rate.Limit(perSecond), max(burst, 1)
	}
	for _, k := range c.callers {
		k.bucket.SetLimit(c.perSecond)
		k.bucket.SetBurst(c.burst)
	}
}

// Acquire admits a call of identity id, or returns ResourceExhausted naming
// the limit it is over. An admitted call must call release once it ends.
func (c *Calls) Acquire(id string) (release func(), err error) {
	now := time.Now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if now.Sub(c.swept) > sweepEvery {
		c.sweep(now)
	}
	k := c.callers[id]
	if k == nil {
		k = &caller{bucket: rate.NewLimiter(c.perSecond, c.burst)}
		c.callers[id] = k
	}
	if c.concurrent > 0 && k.inFlight >= c.concurrent {
		c.refusedConcurrent.Add(1)
		return nil, status.Errorf(codes.ResourceExhausted,
			"%s has %d calls in flight, the most limits.concurrentCallsPerIdentity allows: wait for one to end", id, k.inFlight)
	}
	if !k.bucket.AllowN(now, 1) {
		c.refusedRate.Add(1)
		return nil, status.Errorf(codes.ResourceExhausted,
			"%s started calls faster than limits.callsPerSecondPerIdentity (%s a second, bursts of %d): retry after %s",
			id, formatRate(c.perSecond), c.burst, untilNext(k.bucket, now))
	}
	k.inFlight++
	var once sync.Once
	return func() {
		once.Do(func() {
			c.mu.Lock()
			k.inFlight--
			c.mu.Unlock()
		})
	}, nil
}

// sweep forgets callers with no call in flight whose bucket has refilled:
// a new caller entry for them would be the same.
func (c *Calls) sweep(now time.Time) {
	c.swept = now
	for id, k := range c.callers {
		if k.inFlight == 0 && (c.perSecond == rate.Inf || k.bucket.TokensAt(now) >= float64(c.burst)) {
			delete(c.callers, id)
		}
	}
}

// RefusedConcurrent counts calls refused by the in-flight limit.
func (c *Calls) RefusedConcurrent() int64 { return c.refusedConcurrent.Load() }

// RefusedRate counts calls refused by the rate limit.
func (c *Calls) RefusedRate() int64 { return c.refusedRate.Load() }

// untilNext is how long until bucket holds a whole token again (without
// taking one, as a reservation would).
func untilNext(bucket *rate.Limiter, now time.Time) time.Duration {
	missing := 1 - bucket.TokensAt(now)
	if missing <= 0 || bucket.Limit() <= 0 {
		return 0
	}
	return max(time.Millisecond, time.Duration(missing/float64(bucket.Limit())*float64(time.Second)).Round(time.Millisecond))
}

func formatRate(r rate.Limit) string {
	if r == rate.Inf {
		return "unlimited"
	}
	return fmt.Sprintf("%g", float64(r))
}
