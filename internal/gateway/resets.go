package gateway

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/limits"
)

// A call the client cancels within resetCallAge of starting counts as a
// reset; more than maxResets of them within resetWindow on one connection
// close it. grpc-go bounds the handlers a connection runs at once
// (maxConcurrentStreams) but lets a client open and reset streams without
// end (HTTP/2 Rapid Reset); each reset call may already have reached a
// node.
const (
	resetCallAge = 100 * time.Millisecond
	resetWindow  = 10 * time.Second
	maxResets    = 500
)

// resetGuard is a gRPC stats handler that closes connections whose client
// keeps cancelling calls it has just started.
type resetGuard struct {
	conns  *limits.Connections
	log    *slog.Logger
	closed atomic.Int64
	now    func() time.Time
}

type connResets struct {
	remote string
	mu     sync.Mutex
	start  time.Time
	count  int
	closed bool
}

type connResetsKey struct{}

func (g *resetGuard) TagConn(ctx context.Context, info *stats.ConnTagInfo) context.Context {
	if info.RemoteAddr == nil {
		return ctx
	}
	return context.WithValue(ctx, connResetsKey{}, &connResets{remote: info.RemoteAddr.String()})
}

func (g *resetGuard) HandleConn(context.Context, stats.ConnStats) {}

func (g *resetGuard) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }

func (g *resetGuard) HandleRPC(ctx context.Context, s stats.RPCStats) {
	end, ok := s.(*stats.End)
	if !ok || end.Error == nil || status.Code(end.Error) != codes.Canceled || end.EndTime.Sub(end.BeginTime) > resetCallAge {
		return
	}
	c, _ := ctx.Value(connResetsKey{}).(*connResets)
	if c == nil {
		return
	}
	now := g.now()
	c.mu.Lock()
	if now.Sub(c.start) > resetWindow {
		c.start, c.count = now, 0
	}
	c.count++
	over := c.count > maxResets && !c.closed
	if over {
		c.closed = true
	}
	c.mu.Unlock()
	if over && g.conns.CloseRemote(c.remote) {
		g.closed.Add(1)
		g.log.Warn("connection closed: the client cancelled too many calls right after starting them (HTTP/2 rapid reset)",
			"remote", c.remote, "resets", maxResets, "within", resetWindow)
	}
}
