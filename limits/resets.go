package limits

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
)

// A call the client cancels within resetCallAge of starting counts as a
// reset; more than limits.rapidResets of them within resetWindow on one
// connection close it. grpc-go bounds the handlers a connection runs at
// once (maxConcurrentStreams) but lets a client open and reset streams
// without end (HTTP/2 Rapid Reset); each reset call may already have
// reached a node.
const (
	resetCallAge = 100 * time.Millisecond
	resetWindow  = 10 * time.Second
)

// Resets is a gRPC stats handler that closes connections whose client
// keeps cancelling calls it has just started.
type Resets struct {
	conns  *Connections
	log    *slog.Logger
	limit  atomic.Int64
	closed atomic.Int64
	now    func() time.Time
}

// NewResets returns the guard; it closes connections through conns.
func NewResets(conns *Connections, log *slog.Logger) *Resets {
	return &Resets{conns: conns, log: log, now: time.Now}
}

// SetLimit sets how many resets within 10 s close a connection.
func (g *Resets) SetLimit(n int) { g.limit.Store(int64(n)) }

// Closed counts the connections closed for resetting too many calls.
func (g *Resets) Closed() int64 { return g.closed.Load() }

type connResets struct {
	remote string
	mu     sync.Mutex
	start  time.Time
	count  int
	closed bool
}

type connResetsKey struct{}

// TagConn implements stats.Handler.
func (g *Resets) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	if info.RemoteAddr == nil {
		return ctx
	}
	return context.WithValue(ctx, connResetsKey{}, &connResets{remote: info.RemoteAddr.String()})
}

// HandleConn implements stats.Handler.
func (g *Resets) HandleConn(context.Context, stats.ConnStats) {}

// TagRPC implements stats.Handler.
func (g *Resets) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }

// HandleRPC implements stats.Handler: it counts the calls cancelled young.
func (g *Resets) HandleRPC(ctx context.Context, s stats.RPCStats) {
	end, ok := s.(*stats.End)
	if !ok || end.Error == nil || status.Code(end.Error) != codes.Canceled || end.EndTime.Sub(end.BeginTime) > resetCallAge {
		return
	}
	c, _ := ctx.Value(connResetsKey{}).(*connResets)
	if c == nil {
		return
	}
	limit := int(g.limit.Load())
	now := g.now()
	c.mu.Lock()
	if now.Sub(c.start) > resetWindow {
		c.start, c.count = now, 0
	}
	c.count++
	over := limit > 0 && c.count > limit && !c.closed
	if over {
		c.closed = true
	}
	c.mu.Unlock()
	if over && g.conns.CloseRemote(c.remote) {
		g.closed.Add(1)
		g.log.Warn("connection closed: the client cancelled too many calls right after starting them (HTTP/2 rapid reset; limits.rapidResets)",
			"remote", c.remote, "resets", limit, "within", resetWindow)
	}
}
