package gateway

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/attribute"
	otelcodes "go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/director"
	"github.com/apid/apid/limits"
	"github.com/apid/apid/proxy"
)

// maxLoggedNodes bounds the node names one audit line lists.
const maxLoggedNodes = 16

// callRecord is what the audit line of one call says beyond the call
// itself: where it went, which nodes failed and how many bytes moved.
type callRecord struct {
	bytesIn, bytesOut atomic.Int64

	mu          sync.Mutex
	mode        callMode
	nodes       []string
	nodeCount   int
	failed      []slog.Attr // node = code, up to maxLoggedNodes
	failedCount int
}

// callMode is where a call went, as its audit line says.
type callMode uint8

const (
	modeNone        callMode = iota // refused before routing
	modeLocal                       // the local agent, no node named
	modeOneToOne                    // one node, untouched
	modeFanOut                      // several nodes, merged
	modeHealthCheck                 // apid's own cluster health check
)

func (m callMode) String() string {
	switch m {
	case modeLocal:
		return "local"
	case modeOneToOne:
		return proxy.OneToOne.String()
	case modeFanOut:
		return proxy.OneToMany.String()
	case modeHealthCheck:
		return "health-check"
	}
	return "none"
}

type recordKey struct{}

func recordFrom(ctx context.Context) *callRecord {
	r, _ := ctx.Value(recordKey{}).(*callRecord)
	return r
}

// auditStats is a gRPC stats handler: it gives every call a record and
// counts the bytes of its messages (as sent on the wire, compressed or not).
type auditStats struct{}

func (auditStats) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context {
	return context.WithValue(ctx, recordKey{}, &callRecord{})
}

func (auditStats) HandleRPC(ctx context.Context, s stats.RPCStats) {
	r := recordFrom(ctx)
	if r == nil {
		return
	}
	switch p := s.(type) {
	case *stats.InPayload:
		r.bytesIn.Add(int64(p.WireLength))
	case *stats.OutPayload:
		r.bytesOut.Add(int64(p.WireLength))
	}
}

func (auditStats) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context { return ctx }
func (auditStats) HandleConn(context.Context, stats.ConnStats)                       {}

// observer is the proxy's Observer: it fills the call's record, counts each
// node's part in the metrics and the node table, and traces it.
var (
	_ proxy.Observer = (*observer)(nil)
	_ proxy.Budget   = (*limits.Memory)(nil)
)

type observer struct {
	metrics *metrics
	nodes   *nodeTable
	tracer  trace.Tracer // nil: tracing off
}

// checking names in the call's audit record the nodes a cluster health
// check covers: it reaches them itself, not through the proxy.
func checking(ctx context.Context, nodes []string) {
	rec := recordFrom(ctx)
	if rec == nil {
		return
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	rec.mode = modeHealthCheck
	rec.nodeCount = len(nodes)
	rec.nodes = append(rec.nodes[:0], nodes[:min(len(nodes), maxLoggedNodes)]...)
}

// Routed implements proxy.Observer.
func (o *observer) Routed(ctx context.Context, _ string, r proxy.Route) {
	rec := recordFrom(ctx)
	if rec == nil {
		return
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	switch {
	case r.Mode == proxy.OneToMany:
		rec.mode = modeFanOut
	case len(r.Backends) == 1 && localAgent(r.Backends[0]):
		rec.mode = modeLocal
	default:
		rec.mode = modeOneToOne
	}
	rec.nodeCount = len(r.Backends)
	for _, b := range r.Backends[:min(len(r.Backends), maxLoggedNodes)] {
		if b.Name() != "" {
			rec.nodes = append(rec.nodes, b.Name())
		}
	}
}

// localAgent reports whether b is the local agent reached with no node
// named.
func localAgent(b proxy.Backend) bool { return director.LocalAgent(b) }

// BackendStarted implements proxy.Observer.
func (o *observer) BackendStarted(ctx context.Context, b proxy.Backend, kind proxy.Kind) (context.Context, func(codes.Code, string, time.Duration)) {
	start := time.Now()
	backend := proxy.KeyOf(b)
	rec := recordFrom(ctx)
	fanOut := false
	if rec != nil {
		rec.mu.Lock()
		fanOut = rec.mode == modeFanOut
		rec.mu.Unlock()
	}
	var nodeDone func(codes.Code, string, time.Duration)
	if backend != "" {
		nodeDone = o.nodes.start(director.Canonical(backend))
	}
	var span trace.Span
	if o.tracer != nil {
		node := backend
		if node == "" {
			node = "local"
		}
		ctx, span = o.tracer.Start(ctx, "apid.node "+node, trace.WithSpanKind(trace.SpanKindInternal),
			trace.WithAttributes(attribute.String("apid.node", node), attribute.String("apid.kind", kind.String())))
	}
	return ctx, func(code codes.Code, msg string, elapsed time.Duration) {
		if nodeDone != nil {
			nodeDone(code, msg, elapsed)
		}
		if fanOut {
			o.metrics.nodeDone(kind, code, elapsed)
		}
		if code != codes.OK && rec != nil && backend != "" {
			rec.mu.Lock()
			rec.failedCount++
			if len(rec.failed) < maxLoggedNodes {
				rec.failed = append(rec.failed, slog.String(backend, code.String()))
			}
			rec.mu.Unlock()
		}
		if span != nil {
			span.SetAttributes(attribute.String("rpc.grpc.status_code", code.String()))
			if code != codes.OK {
				span.SetStatus(otelcodes.Error, code.String())
			}
			span.End(trace.WithTimestamp(start.Add(elapsed)))
		}
	}
}

// observe names the caller of every call in its context, counts the call
// in the standard gRPC server metrics and writes its audit line: every
// call, refused or not, is recorded once.
func (g *Gateway) observe(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ss = auth.Identified(ss)
	start := time.Now()
	err := g.count(srv, ss, info, handler)
	g.audit(ss.Context(), info.FullMethod, err, start)
	return err
}

// audit logs one line per call at info level, with stable keys. It never
// logs metadata values, tokens, keys or certificates.
func (g *Gateway) audit(ctx context.Context, method string, err error, start time.Time) {
	log := g.log
	if !log.Enabled(ctx, slog.LevelInfo) {
		return
	}
	attrs := make([]slog.Attr, 0, 12)
	attrs = append(attrs, slog.String("method", method))
	rec := recordFrom(ctx)
	if rec != nil {
		rec.mu.Lock()
		attrs = append(attrs, slog.String("mode", rec.mode.String()))
		attrs = append(attrs, slog.Group("nodes", "count", rec.nodeCount, "names", rec.nodes))
		if rec.failedCount > 0 {
			failed := append([]slog.Attr(nil), rec.failed...)
			if more := rec.failedCount - len(rec.failed); more > 0 {
				failed = append(failed, slog.Int("more", more))
			}
			attrs = append(attrs, slog.Attr{Key: "failed", Value: slog.GroupValue(failed...)})
		}
		rec.mu.Unlock()
	}
	if c, ok := auth.IdentityFrom(ctx); ok {
		attrs = append(attrs, slog.String("peer", c.CommonName), slog.Any("roles", c.Roles))
	} else {
		attrs = append(attrs, slog.String("peer", ""), slog.Any("roles", []string{}))
	}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		attrs = append(attrs, slog.String("remote", p.Addr.String()))
	}
	attrs = append(attrs,
		slog.String("code", status.Code(err).String()),
		slog.Float64("duration_ms", float64(time.Since(start).Microseconds())/1000))
	if rec != nil {
		attrs = append(attrs, slog.Int64("bytes_in", rec.bytesIn.Load()), slog.Int64("bytes_out", rec.bytesOut.Load()))
	}
	log.LogAttrs(ctx, slog.LevelInfo, "call", attrs...)
}
