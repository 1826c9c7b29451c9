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
	mode        string // local, one-to-one, fan-out; empty: not routed
	nodes       []string
	nodeCount   int
	failed      []slog.Attr // node = code, up to maxLoggedNodes
	failedCount int
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
	rec.mode = "health-check"
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
	case r.OneToMany:
		rec.mode = "fan-out"
	case len(r.Backends) == 1 && r.Backends[0].Name() == "":
		rec.mode = "local"
	default:
		rec.mode = "one-to-one"
	}
	rec.nodeCount = len(r.Backends)
	for _, b := range r.Backends[:min(len(r.Backends), maxLoggedNodes)] {
		if b.Name() != "" {
			rec.nodes = append(rec.nodes, b.Name())
		}
	}
}

// BackendStarted implements proxy.Observer.
func (o *observer) BackendStarted(ctx context.Context, backend string, kind proxy.Kind) (context.Context, func(codes.Code, string, time.Duration)) {
	start := time.Now()
	rec := recordFrom(ctx)
	fanOut := false
	if rec != nil {
		rec.mu.Lock()
		fanOut = rec.mode == "fan-out"
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

// auditLog logs one line per call at info level, with stable keys. It never
// logs metadata values, tokens, keys or certificates.
func auditLog(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		start := time.Now()
		err := handler(srv, ss)
		ctx := ss.Context()
		if !log.Enabled(ctx, slog.LevelInfo) {
			return err
		}
		attrs := make([]slog.Attr, 0, 12)
		attrs = append(attrs, slog.String("method", info.FullMethod))
		rec := recordFrom(ctx)
		if rec != nil {
			rec.mu.Lock()
			mode := rec.mode
			if mode == "" {
				mode = "none" // refused before routing
			}
			attrs = append(attrs, slog.String("mode", mode))
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
		return err
	}
}
