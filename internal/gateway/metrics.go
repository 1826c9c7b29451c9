package gateway

import (
	"context"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/director"
	"github.com/apid/apid/limits"
	"github.com/apid/apid/proxy"
)

// metrics are apid's Prometheus metrics. Method labels are limited to the
// methods the policy names, so callers cannot mint label values.
type metrics struct {
	registry  *prometheus.Registry
	authz     *auth.Authorizer
	calls     *prometheus.CounterVec
	duration  *prometheus.HistogramVec
	nodeCalls *prometheus.CounterVec
	nodeTime  *prometheus.HistogramVec
}

func newMetrics(authz *auth.Authorizer, pool *director.Pool, budget *limits.Memory, conns *limits.Connections,
	calls *limits.Calls, inFlight func() int64) *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		authz:    authz,
		calls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "apid_calls_total", Help: "Calls served, by method and status code.",
		}, []string{"method", "code"}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "apid_call_duration_seconds", Help: "Duration of calls, by method.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"method"}),
		nodeCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "apid_fanout_node_results_total", Help: "Outcome of each node's part of one-to-many calls.",
		}, []string{"kind", "code"}),
		nodeTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "apid_fanout_node_duration_seconds", Help: "Duration of each node's part of one-to-many calls.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 4, 10),
		}, []string{"kind"}),
	}
	m.registry.MustRegister(m.calls, m.duration, m.nodeCalls, m.nodeTime,
		gauge("apid_node_connections", "Connections to other nodes held in the pool.", pool.Len),
		gauge("apid_buffered_bytes", "Bytes held for calls in flight (limits.bufferedBytes bounds new calls).", budget.Held),
		gauge("apid_buffered_bytes_limit", "The limits.bufferedBytes budget.", budget.Limit),
		gauge("apid_client_connections", "Client connections open, handshaking ones included.", conns.Open),
		gauge("apid_calls_in_flight", "Calls being served now.", inFlight),
		refusals("bufferedBytes", budget.Refused),
		refusals("connections", conns.RefusedTotal),
		refusals("connectionsPerIdentity", conns.RefusedPerIdentity),
		refusals("concurrentCallsPerIdentity", calls.RefusedConcurrent),
		refusals("callsPerSecondPerIdentity", calls.RefusedRate),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// gauge exports what read returns now.
func gauge[T int | int64](name, help string, read func() T) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return float64(read()) })
}

// refusals exports how many calls or connections one limit refused,
// labelled with the limit's configuration key.
func refusals(limit string, read func() int64) prometheus.Collector {
	return prometheus.NewCounterFunc(prometheus.CounterOpts{
		Name:        "apid_limit_refusals_total",
		Help:        "Calls or connections refused by a limit, by the limit's configuration key.",
		ConstLabels: prometheus.Labels{"limit": limit},
	}, func() float64 { return float64(read()) })
}

func (m *metrics) label(method string) string {
	if m.authz.Policy().HasRule(method) || strings.HasPrefix(method, auth.HealthPrefix) {
		return method
	}
	return "other"
}

// interceptor counts and times every call.
func (m *metrics) interceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		start := time.Now()
		err := handler(srv, ss)
		method := m.label(info.FullMethod)
		m.calls.WithLabelValues(method, status.Code(err).String()).Inc()
		m.duration.WithLabelValues(method).Observe(time.Since(start).Seconds())
		return err
	}
}

// unaryInterceptor counts and times the unary calls of the services apid
// serves itself.
func (m *metrics) unaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		start := time.Now()
		resp, err := handler(ctx, req)
		method := m.label(info.FullMethod)
		m.calls.WithLabelValues(method, status.Code(err).String()).Inc()
		m.duration.WithLabelValues(method).Observe(time.Since(start).Seconds())
		return resp, err
	}
}

// BackendDone implements proxy.Observer.
func (m *metrics) BackendDone(kind proxy.Kind, code codes.Code, elapsed time.Duration) {
	m.nodeCalls.WithLabelValues(kind.String(), code.String()).Inc()
	m.nodeTime.WithLabelValues(kind.String()).Observe(elapsed.Seconds())
}
