package gateway

import (
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	// The Talos API's services, so that their methods are known by name.
	_ "github.com/siderolabs/talos/pkg/machinery/api/cluster"
	_ "github.com/siderolabs/talos/pkg/machinery/api/inspect"
	_ "github.com/siderolabs/talos/pkg/machinery/api/machine"
	_ "github.com/siderolabs/talos/pkg/machinery/api/security"
	_ "github.com/siderolabs/talos/pkg/machinery/api/storage"
	_ "github.com/siderolabs/talos/pkg/machinery/api/time"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/internal/version"
	"github.com/apid/apid/proxy"
)

// unknownMethod is the one label value of every method apid does not know,
// so that callers cannot mint series with made-up method names.
const unknownMethod = "/unknown/unknown"

// knownMethods are the methods of every service compiled into apid (the
// Talos API, health, reflection): a fixed set.
var knownMethods = func() map[string]bool {
	m := map[string]bool{}
	protoregistry.GlobalFiles.RangeFiles(func(fd protoreflect.FileDescriptor) bool {
		for i := range fd.Services().Len() {
			svc := fd.Services().Get(i)
			for j := range svc.Methods().Len() {
				m["/"+string(svc.FullName())+"/"+string(svc.Methods().Get(j).Name())] = true
			}
		}
		return true
	})
	return m
}()

// metrics are apid's Prometheus metrics: the standard gRPC server metrics
// (as go-grpc-middleware names them; see callMetrics), the gateway's own
// series, and each section's, registered as the sections are built.
type metrics struct {
	registry  *prometheus.Registry
	grpc      *callMetrics
	nodeCalls *prometheus.CounterVec
	nodeTime  *prometheus.HistogramVec
	reloads   *prometheus.CounterVec
	loosens   prometheus.Counter
	// adminRefused counts admin requests for a host not answered to.
	adminRefused prometheus.Counter
}

func newMetrics() *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		grpc:     newCallMetrics(prometheus.ExponentialBuckets(0.0005, 4, 10)),
		nodeCalls: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "apid_fanout_node_results_total", Help: "Outcome of each node's part of one-to-many calls, by method kind and status code.",
		}, []string{"kind", "code"}),
		nodeTime: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name: "apid_fanout_node_duration_seconds", Help: "Duration of each node's part of one-to-many calls, by method kind.",
			Buckets: latencyBuckets,
		}, []string{"kind"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "apid_reloads_total", Help: "Reloads of the configuration (what=config) and the certificate files (what=certificates), by result.",
		}, []string{"what", "result"}),
		adminRefused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "apid_admin_host_refusals_total", Help: "Admin endpoint requests refused for a Host it does not answer to (adminHosts).",
		}),
		loosens: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "apid_config_loosened_total", Help: "Reloads that loosened a bound or what apid trusts (the log line names the keys).",
		}),
	}
	for _, what := range []string{"config", "certificates"} {
		for _, result := range []string{"success", "failure"} {
			m.reloads.WithLabelValues(what, result)
		}
	}
	v := version.Get()
	m.registry.MustRegister(m.grpc, m.nodeCalls, m.nodeTime, m.reloads, m.loosens, m.adminRefused,
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "apid_build_info", Help: "Always 1; the labels say which apid this is.",
			ConstLabels: prometheus.Labels{"version": v.Version, "commit": v.Commit, "goversion": v.Go},
		}, func() float64 { return 1 }),
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// register adds collectors (a section, the node table) to /metrics.
func (m *metrics) register(cs ...prometheus.Collector) { m.registry.MustRegister(cs...) }

// gauges are the gateway's own gauges: calls in flight and admin
// connections.
func (g *Gateway) gauges() prometheus.Collector {
	return collectorList{
		gauge("apid_calls_in_flight", "Calls being served now.", g.life.inFlight.Load),
		gauge("apid_admin_connections", fmt.Sprintf("Connections open to the admin endpoint (at most %d; more wait in the listen queue).", adminConnections), g.adminOpen.Load),
	}
}

// collectorList is several collectors as one.
type collectorList []prometheus.Collector

func (l collectorList) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range l {
		c.Describe(ch)
	}
}

func (l collectorList) Collect(ch chan<- prometheus.Metric) {
	for _, c := range l {
		c.Collect(ch)
	}
}

// gauge exports what read returns now.
func gauge[T int | int64](name, help string, read func() T) prometheus.Collector {
	return prometheus.NewGaugeFunc(prometheus.GaugeOpts{Name: name, Help: help}, func() float64 { return float64(read()) })
}

// label bounds a method name to the known ones.
func (g *Gateway) label(method string) string {
	if knownMethods[method] || g.policy.Policy().HasRule(method) {
		return method
	}
	return unknownMethod
}

// count feeds the standard gRPC server metrics with a bounded method name
// and the method's real shape: the proxy serves every method as a
// bidirectional stream, so a unary method is counted as unary (one message
// each way) and a streaming one with its shape.
func (g *Gateway) count(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	m := g.metrics
	if auth.HealthMethods[info.FullMethod] { // registered: its info is true
		return m.grpc.of(info.FullMethod, streamType(info)).stream(srv, ss, handler)
	}
	method := g.label(info.FullMethod)
	switch g.routing.Kind(info.FullMethod) {
	case proxy.Unary:
		return m.grpc.of(method, typeUnary).unary(func() error { return handler(srv, ss) })
	case proxy.ClientStream:
		return m.grpc.of(method, typeClientStream).stream(srv, ss, handler)
	case proxy.ServerStream:
		return m.grpc.of(method, typeServerStream).stream(srv, ss, handler)
	}
	return m.grpc.of(method, typeBidiStream).stream(srv, ss, handler)
}

// metricCode is the code a metric labels a call with: gRPC's 17, and
// Unknown for any other a node made up (as gRPC clients read one), so that
// a node cannot mint series.
func metricCode(c codes.Code) codes.Code {
	if c > codes.Unauthenticated {
		return codes.Unknown
	}
	return c
}

// nodeDone counts one node's part of a one-to-many call.
func (m *metrics) nodeDone(kind proxy.Kind, code codes.Code, elapsed time.Duration) {
	m.nodeCalls.WithLabelValues(kind.String(), metricCode(code).String()).Inc()
	m.nodeTime.WithLabelValues(kind.String()).Observe(elapsed.Seconds())
}

// reloaded counts a reload of what ("config", "certificates" or
// "inventory").
func (m *metrics) reloaded(what string, err error) {
	result := "success"
	if err != nil {
		result = "failure"
	}
	m.reloads.WithLabelValues(what, result).Inc()
}

// counter is reloaded for one what, for a section to report with.
func (m *metrics) counter(what string) func(error) {
	return func(err error) { m.reloaded(what, err) }
}

// loosened counts a reload that loosened keys (the log line names them).
func (m *metrics) loosened() { m.loosens.Inc() }
