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
	"github.com/apid/apid/certs"
	"github.com/apid/apid/director"
	"github.com/apid/apid/internal/version"
	"github.com/apid/apid/limits"
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
// (as go-grpc-middleware names them; see callMetrics), and apid's own.
type metrics struct {
	registry  *prometheus.Registry
	grpc      *callMetrics
	authz     *auth.Authorizer
	router    *director.Router
	nodeCalls *prometheus.CounterVec
	nodeTime  *prometheus.HistogramVec
	reloads   *prometheus.CounterVec
}

// metricSources are what apid's own metrics read.
type metricSources struct {
	authz     *auth.Authorizer
	router    *director.Router
	pool      *director.Pool
	budget    *limits.Memory
	conns     *limits.Connections
	calls     *limits.Calls
	perNode   *limits.PerNode
	issued    *limits.Issuance
	nodes     *nodeTable
	src       *certs.Source
	inFlight  func() int64
	ejections *ejectionCounts
	resets    func() int64
	// healthRefused reads the cluster health checks refused, by
	// health.maxRunning and health.maxRunningPerIdentity.
	healthRefused func() (running, perIdentity int64)
	adminOpen     func() int64
}

func newMetrics(s metricSources) *metrics {
	m := &metrics{
		registry: prometheus.NewRegistry(),
		grpc:     newCallMetrics(prometheus.ExponentialBuckets(0.0005, 4, 10)),
		authz:    s.authz,
		router:   s.router,
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
	}
	for _, what := range []string{"config", "certificates"} {
		for _, result := range []string{"success", "failure"} {
			m.reloads.WithLabelValues(what, result)
		}
	}
	v := version.Get()
	m.registry.MustRegister(m.grpc, m.nodeCalls, m.nodeTime, m.reloads, s.nodes,
		gauge("apid_node_connections_open", "Connections to other nodes held in the pool.", func() int { return len(s.pool.Snapshot()) }),
		poolStates{s.pool},
		certExpiry{s.src},
		gauge("apid_buffered_bytes", "Bytes held for calls in flight (limits.bufferedBytes bounds new calls).", s.budget.Held),
		gauge("apid_buffered_bytes_limit", "The limits.bufferedBytes budget.", s.budget.Limit),
		gauge("apid_client_connections", "Client connections open, handshaking ones included.", s.conns.Open),
		gauge("apid_calls_in_flight", "Calls being served now.", s.inFlight),
		gauge("apid_nodes_ejected", "Nodes ejected now (outlier ejection).", func() int { return len(s.router.Ejections()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "apid_node_ejections_total", Help: "Nodes ejected after failing in a row.",
		}, func() float64 { return float64(s.ejections.ejected.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "apid_node_restorations_total", Help: "Ejected nodes restored after a call to them succeeded.",
		}, func() float64 { return float64(s.ejections.restored.Load()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "apid_handshake_failures_total", Help: "TLS handshakes with clients that failed (bad or missing certificates, clients that gave up).",
		}, func() float64 { return float64(s.conns.HandshakeFailures()) }),
		refusals("bufferedBytes", s.budget.Refused),
		refusals("connections", s.conns.RefusedTotal),
		refusals("connectionsPerIdentity", s.conns.RefusedPerIdentity),
		refusals("concurrentCallsPerIdentity", s.calls.RefusedConcurrent),
		refusals("callsPerSecondPerIdentity", s.calls.RefusedRate),
		refusals("perIdentityPerNode", s.perNode.Refused),
		refusals("clientCertificatesPerHour", s.issued.Refused),
		refusals("handshakes", s.conns.RefusedHandshakes),
		refusals("perSource", s.conns.RefusedPerSource),
		refusals("rapidResets", s.resets),
		refusals("metadataBytes", s.router.RefusedMetadata),
		refusals("health.maxRunning", func() int64 { n, _ := s.healthRefused(); return n }),
		refusals("health.maxRunningPerIdentity", func() int64 { _, n := s.healthRefused(); return n }),
		gauge("apid_admin_connections", fmt.Sprintf("Connections open to the admin endpoint (at most %d; more wait in the listen queue).", adminConnections), s.adminOpen),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "apid_build_info", Help: "Always 1; the labels say which apid this is.",
			ConstLabels: prometheus.Labels{"version": v.Version, "commit": v.Commit, "goversion": v.Go},
		}, func() float64 { return 1 }),
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

// label bounds a method name to the known ones.
func (m *metrics) label(method string) string {
	if knownMethods[method] || m.authz.Policy().HasRule(method) {
		return method
	}
	return unknownMethod
}

// interceptor feeds the standard gRPC server metrics with a bounded
// method name and the method's real shape: the proxy serves every method
// as a bidirectional stream, so a unary method is counted as unary (one
// message each way) and a streaming one with its shape.
func (m *metrics) interceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		if auth.HealthMethods[info.FullMethod] { // registered: its info is true
			return m.grpc.of(info.FullMethod, streamType(info)).stream(srv, ss, handler)
		}
		method := m.label(info.FullMethod)
		switch m.router.Kind(info.FullMethod) {
		case proxy.Unary:
			return m.grpc.of(method, typeUnary).unary(func() error { return handler(srv, ss) })
		case proxy.ClientStream:
			return m.grpc.of(method, typeClientStream).stream(srv, ss, handler)
		case proxy.ServerStream:
			return m.grpc.of(method, typeServerStream).stream(srv, ss, handler)
		}
		return m.grpc.of(method, typeBidiStream).stream(srv, ss, handler)
	}
}

// unaryInterceptor feeds them for the unary methods apid serves itself.
func (m *metrics) unaryInterceptor() grpc.UnaryServerInterceptor {
	return m.grpc.unaryInterceptor(m.label)
}

// nodeDone counts one node's part of a one-to-many call.
func (m *metrics) nodeDone(kind proxy.Kind, code codes.Code, elapsed time.Duration) {
	m.nodeCalls.WithLabelValues(kind.String(), code.String()).Inc()
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

// poolStates exports the pool's connections by state.
type poolStates struct{ pool *director.Pool }

var poolStateDesc = prometheus.NewDesc("apid_node_connections",
	"Connections to other nodes in the pool, by connectivity state.", []string{"state"}, nil)

func (p poolStates) Describe(ch chan<- *prometheus.Desc) { ch <- poolStateDesc }

func (p poolStates) Collect(ch chan<- prometheus.Metric) {
	n := map[string]int{"IDLE": 0, "CONNECTING": 0, "READY": 0, "TRANSIENT_FAILURE": 0, "SHUTDOWN": 0}
	for _, e := range p.pool.Snapshot() {
		n[e.State]++
	}
	for state, v := range n {
		ch <- prometheus.MustNewConstMetric(poolStateDesc, prometheus.GaugeValue, float64(v), state)
	}
}

// certExpiry exports the seconds until the serving certificate and each CA
// expire.
type certExpiry struct{ src *certs.Source }

var certExpiryDesc = prometheus.NewDesc("apid_certificate_expiry_seconds",
	"Seconds until a certificate expires (negative: expired): the one apid serves (kind=serving), the one it forwards with (kind=forwarding) and each CA it trusts (kind=ca).",
	[]string{"kind", "subject"}, nil)

func (c certExpiry) Describe(ch chan<- *prometheus.Desc) { ch <- certExpiryDesc }

func (c certExpiry) Collect(ch chan<- prometheus.Metric) {
	now := time.Now()
	if leaf := c.src.Certificate().Leaf; leaf != nil {
		ch <- prometheus.MustNewConstMetric(certExpiryDesc, prometheus.GaugeValue, leaf.NotAfter.Sub(now).Seconds(), "serving", leaf.Subject.String())
	}
	if fwd := c.src.ClientCertificate(); fwd != c.src.Certificate() && fwd.Leaf != nil {
		ch <- prometheus.MustNewConstMetric(certExpiryDesc, prometheus.GaugeValue, fwd.Leaf.NotAfter.Sub(now).Seconds(), "forwarding", fwd.Leaf.Subject.String())
	}
	seen := map[string]bool{}
	for _, ca := range c.src.CAs() {
		subject := ca.Subject.String()
		if seen[subject] {
			subject += " #" + ca.SerialNumber.String() // two generations of one CA during a rotation
		}
		seen[subject] = true
		ch <- prometheus.MustNewConstMetric(certExpiryDesc, prometheus.GaugeValue, ca.NotAfter.Sub(now).Seconds(), "ca", subject)
	}
}
