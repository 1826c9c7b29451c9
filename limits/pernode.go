package limits

import (
	"sync"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// PerNode bounds the calls one caller identity has in flight to one node:
// every call to a node shares one HTTP/2 connection and so that node's
// stream limit, which one identity's follow streams could otherwise take
// whole from every other caller. Streams (which last) and short calls
// have budgets of their own, so a caller's streams never crowd out its
// own, or others', short calls.
type PerNode struct {
	mu       sync.Mutex
	calls    int // short calls in flight per identity and node
	streams  int // streams in flight per identity and node
	inFlight map[nodeCaller]int

	refused atomic.Int64
}

type nodeCaller struct {
	id, node string
	stream   bool
}

// NewPerNode returns per-node bounds of calls and streams per identity;
// zero or less turns one off.
func NewPerNode(calls, streams int) *PerNode {
	p := &PerNode{inFlight: map[nodeCaller]int{}}
	p.SetLimits(calls, streams)
	return p
}

// SetLimits changes the bounds for calls that start from now on.
func (p *PerNode) SetLimits(calls, streams int) {
	p.mu.Lock()
	p.calls, p.streams = calls, streams
	p.mu.Unlock()
}

// Acquire admits one call of identity id to node (a stream when stream is
// set), or returns ResourceExhausted naming the limit. An admitted call
// must call release once, when it no longer uses the node.
func (p *PerNode) Acquire(id, node string, stream bool) (release func(), err error) {
	k := nodeCaller{id: id, node: node, stream: stream}
	p.mu.Lock()
	limit, key := p.calls, "limits.callsPerIdentityPerNode"
	if stream {
		limit, key = p.streams, "limits.streamsPerIdentityPerNode"
	}
	if limit > 0 && p.inFlight[k] >= limit {
		p.mu.Unlock()
		p.refused.Add(1)
		kind := "calls"
		if stream {
			kind = "streams"
		}
		return nil, status.Errorf(codes.ResourceExhausted, "%q has %d %s in flight to node %s (%s): let some end first", id, limit, kind, node, key)
	}
	p.inFlight[k]++
	p.mu.Unlock()
	var once sync.Once
	return func() {
		once.Do(func() {
			p.mu.Lock()
			if p.inFlight[k]--; p.inFlight[k] <= 0 {
				delete(p.inFlight, k)
			}
			p.mu.Unlock()
		})
	}, nil
}

// Refused returns how many calls the bounds have refused.
func (p *PerNode) Refused() int64 { return p.refused.Load() }
