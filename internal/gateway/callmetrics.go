package gateway

import (
	"context"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// callMetrics are the standard gRPC server metrics, with the names, labels
// and meaning go-grpc-middleware's Prometheus provider gives them
// (grpc_server_started_total, grpc_server_handled_total,
// grpc_server_msg_received_total, grpc_server_msg_sent_total,
// grpc_server_handling_seconds), kept by apid itself. The provider looks
// up five label sets per call through its generic reporter (4 % of a
// one-to-one call's CPU, more than the identity and authorization
// interceptors together); here each method's series are looked up once
// and a call only adds to them.
type callMetrics struct {
	started, handled, received, sent *prometheus.CounterVec
	seconds                          *prometheus.HistogramVec
	series                           sync.Map // seriesKey -> *methodSeries
}

type seriesKey struct{ method, typ string }

// methodSeries are one method's series, for one call shape.
type methodSeries struct {
	labels                  [3]string // grpc_type, grpc_service, grpc_method
	started, received, sent prometheus.Counter
	seconds                 prometheus.Observer
	handled                 [17]atomic.Pointer[prometheus.Counter] // by code, made on first use
	handledVec              *prometheus.CounterVec
}

// The call shapes, as grpc_type names them.
const (
	typeUnary        = "unary"
	typeClientStream = "client_stream"
	typeServerStream = "server_stream"
	typeBidiStream   = "bidi_stream"
)

func newCallMetrics(buckets []float64) *callMetrics {
	labels := []string{"grpc_type", "grpc_service", "grpc_method"}
	return &callMetrics{
		started: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_started_total", Help: "Calls started.",
		}, labels),
		handled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_handled_total", Help: "Calls ended, by status code.",
		}, append(labels, "grpc_code")),
		received: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_msg_received_total", Help: "Messages received from clients.",
		}, labels),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "grpc_server_msg_sent_total", Help: "Messages sent to clients.",
		}, labels),
		seconds: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "grpc_server_handling_seconds", Help: "Call duration, from its start to its status.", Buckets: buckets,
		}, labels),
	}
}

// Describe and Collect make callMetrics one collector.
func (m *callMetrics) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range m.collectors() {
		c.Describe(ch)
	}
}

func (m *callMetrics) Collect(ch chan<- prometheus.Metric) {
	for _, c := range m.collectors() {
		c.Collect(ch)
	}
}

func (m *callMetrics) collectors() []prometheus.Collector {
	return []prometheus.Collector{m.started, m.handled, m.received, m.sent, m.seconds}
}

// of returns the series of method (a full method name, or unknownMethod)
// called as typ.
func (m *callMetrics) of(method, typ string) *methodSeries {
	key := seriesKey{method, typ}
	if s, ok := m.series.Load(key); ok {
		return s.(*methodSeries)
	}
	service, name := "unknown", "unknown"
	if svc, meth, ok := strings.Cut(strings.TrimPrefix(method, "/"), "/"); ok {
		service, name = svc, meth
	}
	s := &methodSeries{labels: [3]string{typ, service, name}, handledVec: m.handled}
	s.started = m.started.WithLabelValues(s.labels[:]...)
	s.received = m.received.WithLabelValues(s.labels[:]...)
	s.sent = m.sent.WithLabelValues(s.labels[:]...)
	s.seconds = m.seconds.WithLabelValues(s.labels[:]...)
	actual, _ := m.series.LoadOrStore(key, s) // bounded: known methods × shapes
	return actual.(*methodSeries)
}

// done counts a call's end.
func (s *methodSeries) done(err error, start time.Time) {
	code := metricCode(status.Code(err)) // one of handled's
	c := s.handled[code].Load()
	if c == nil {
		made := s.handledVec.WithLabelValues(s.labels[0], s.labels[1], s.labels[2], code.String())
		c = &made
		s.handled[code].Store(c)
	}
	(*c).Inc()
	s.seconds.Observe(time.Since(start).Seconds())
}

// stream counts a streaming call of s: started, each message each way,
// its end.
func (s *methodSeries) stream(srv any, ss grpc.ServerStream, handler grpc.StreamHandler) error {
	start := time.Now()
	s.started.Inc()
	err := handler(srv, &countedStream{ServerStream: ss, s: s})
	s.done(err, start)
	return err
}

// unary counts a call of a unary method: one message received, one sent
// when it succeeds (as the provider counts them).
func (s *methodSeries) unary(call func() error) error {
	start := time.Now()
	s.started.Inc()
	s.received.Inc()
	err := call()
	if err == nil {
		s.sent.Inc()
	}
	s.done(err, start)
	return err
}

type countedStream struct {
	grpc.ServerStream
	s *methodSeries
}

func (c *countedStream) SendMsg(m any) error {
	err := c.ServerStream.SendMsg(m)
	if err == nil {
		c.s.sent.Inc()
	}
	return err
}

func (c *countedStream) RecvMsg(m any) error {
	err := c.ServerStream.RecvMsg(m)
	if err == nil {
		c.s.received.Inc()
	}
	return err
}

// streamType is grpc_type of a stream the server registered.
func streamType(info *grpc.StreamServerInfo) string {
	switch {
	case info.IsClientStream && info.IsServerStream:
		return typeBidiStream
	case info.IsClientStream:
		return typeClientStream
	case info.IsServerStream:
		return typeServerStream
	}
	return typeUnary
}

// unaryInterceptor counts the unary calls of services apid serves itself.
func (m *callMetrics) unaryInterceptor(label func(string) string) grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		var resp any
		err := m.of(label(info.FullMethod), typeUnary).unary(func() (err error) {
			resp, err = handler(ctx, req)
			return err
		})
		return resp, err
	}
}
