package limits

import (
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Issuance bounds the client certificates one identity may have issued
// (talosctl config new) in an hour. Limits are per certificate subject,
// and every issued certificate has a subject of its own: a caller allowed
// to issue certificates could otherwise shed its limits by minting fresh
// identities.
type Issuance struct {
	mu      sync.Mutex
	perHour int
	callers map[string]*rate.Limiter
	swept   time.Time
	refused atomic.Int64
}

// NewIssuance returns a bound of perHour certificates an hour per identity
// (bursts of as many); zero or less turns it off.
func NewIssuance(perHour int) *Issuance {
	i := &Issuance{callers: map[string]*rate.Limiter{}, swept: time.Now()}
	i.SetLimit(perHour)
	return i
}

// SetLimit changes the bound for issuances from now on.
func (i *Issuance) SetLimit(perHour int) {
	i.mu.Lock()
	defer i.mu.Unlock()
	i.perHour = perHour
	clear(i.callers)
}

// Allow admits one issuance for id, or returns ResourceExhausted saying
// when the next one is possible.
func (i *Issuance) Allow(id string) error {
	now := time.Now()
	i.mu.Lock()
	defer i.mu.Unlock()
	if i.perHour <= 0 {
		return nil
	}
	if now.Sub(i.swept) > time.Hour {
		for k, b := range i.callers {
			if b.TokensAt(now) >= float64(i.perHour) {
				delete(i.callers, k)
			}
		}
		i.swept = now
	}
	b := i.callers[id]
	if b == nil {
		b = rate.NewLimiter(rate.Limit(float64(i.perHour)/3600), i.perHour)
		i.callers[id] = b
	}
	if !b.AllowN(now, 1) {
		i.refused.Add(1)
		return status.Errorf(codes.ResourceExhausted, "%s has had %d client certificates issued in the last hour (limits.clientCertificatesPerHour): retry after %s",
			id, i.perHour, untilNext(b, now))
	}
	return nil
}

// Refused returns how many issuances the bound has refused.
func (i *Issuance) Refused() int64 { return i.refused.Load() }
