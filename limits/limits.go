package limits

import (
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Limits is the limits section at run time: every budget apid admits
// connections and calls against, each with its configuration key, its
// label on apid_limit_refusals_total and its refusal text. It is built from
// its Config once (New); a reload hands it the next one (Apply), which
// takes effect for connections and calls that start from then on.
//
// The other sections reach it through small interfaces of their own
// (routing asks AdmitNode and AdmitMetadata, the health check AdmitCheck,
// the proxy its Budget): none of them decides a "not now" itself.
type Limits struct {
	applied atomic.Pointer[Config]

	memory   *Memory
	conns    *Connections
	calls    *Calls
	perNode  *PerNode
	issued   *Issuance
	resets   *Resets
	checks   *Checks
	held     *Held
	metadata *Metadata

	collectors []prometheus.Collector
}

// New builds the section from cfg (already validated). handshakeTimeout is
// the listener's (a restart key of the gateway's), which the handshake
// budget shortens under pressure. log receives the refusals that are
// logged rather than returned (connections, resets).
func New(cfg Config, handshakeTimeout time.Duration, log *slog.Logger) *Limits {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &Limits{
		memory:   NewMemory(int64(cfg.BufferedBytes)),
		conns:    NewConnections(cfg.Connections, cfg.ConnectionsPerIdentity, log),
		calls:    NewCalls(cfg.ConcurrentCallsPerIdentity, cfg.CallsPerSecondPerIdentity, cfg.CallBurstPerIdentity),
		perNode:  NewPerNode(cfg.CallsPerIdentityPerNode, cfg.StreamsPerIdentityPerNode),
		issued:   NewIssuance(cfg.ClientCertificatesPerHour),
		checks:   &Checks{perID: map[string]int{}},
		held:     &Held{perID: map[string]int{}},
		metadata: &Metadata{},
	}
	l.conns.SetHandshakeTimeout(handshakeTimeout)
	l.resets = NewResets(l.conns, log)
	_ = l.Apply(cfg)
	l.collectors = l.newCollectors()
	return l
}

// Apply makes cfg's keys the bounds of what starts from now on. Nothing
// already admitted is cut by a lower bound; it counts against it.
func (l *Limits) Apply(cfg Config) error {
	l.memory.SetLimit(int64(cfg.BufferedBytes))
	l.conns.SetLimits(cfg.Connections, cfg.ConnectionsPerIdentity)
	l.conns.SetHandshakeLimits(cfg.Handshakes, cfg.HandshakesPerSource, cfg.ConnectionsPerSourcePerSecond)
	l.calls.SetLimits(cfg.ConcurrentCallsPerIdentity, cfg.CallsPerSecondPerIdentity, cfg.CallBurstPerIdentity)
	l.perNode.SetLimits(cfg.CallsPerIdentityPerNode, cfg.StreamsPerIdentityPerNode)
	l.issued.SetLimit(cfg.ClientCertificatesPerHour)
	l.resets.SetLimit(cfg.RapidResets)
	l.applied.Store(&cfg)
	return nil
}

// Applied returns the configuration the section applies now.
func (l *Limits) Applied() Config { return *l.applied.Load() }

// Loosens lists the keys of next that would admit more than the bounds
// applied now: a reload (or a file cut short) that relaxes a bound is
// worth a line of its own in the log.
func (l *Limits) Loosens(next Config) []string { return Loosens(l.Applied(), next) }

// Loosens lists the keys of next that admit more than cur's.
func Loosens(cur, next Config) []string {
	var keys []string
	more := func(key string, a, b float64) {
		if b > a {
			keys = append(keys, "limits."+key)
		}
	}
	more("bufferedBytes", float64(cur.BufferedBytes), float64(next.BufferedBytes))
	more("connections", float64(cur.Connections), float64(next.Connections))
	more("handshakes", float64(cur.Handshakes), float64(next.Handshakes))
	more("handshakesPerSource", float64(cur.HandshakesPerSource), float64(next.HandshakesPerSource))
	more("connectionsPerSourcePerSecond", cur.ConnectionsPerSourcePerSecond, next.ConnectionsPerSourcePerSecond)
	more("connectionsPerIdentity", float64(cur.ConnectionsPerIdentity), float64(next.ConnectionsPerIdentity))
	more("concurrentCallsPerIdentity", float64(cur.ConcurrentCallsPerIdentity), float64(next.ConcurrentCallsPerIdentity))
	more("callsPerSecondPerIdentity", cur.CallsPerSecondPerIdentity, next.CallsPerSecondPerIdentity)
	more("callBurstPerIdentity", float64(cur.CallBurstPerIdentity), float64(next.CallBurstPerIdentity))
	more("callsPerIdentityPerNode", float64(cur.CallsPerIdentityPerNode), float64(next.CallsPerIdentityPerNode))
	more("streamsPerIdentityPerNode", float64(cur.StreamsPerIdentityPerNode), float64(next.StreamsPerIdentityPerNode))
	more("clientCertificatesPerHour", float64(cur.ClientCertificatesPerHour), float64(next.ClientCertificatesPerHour))
	more("rapidResets", float64(cur.RapidResets), float64(next.RapidResets))
	return keys
}

// Close releases nothing: the section holds no goroutine or file. It is
// here so that every section ends the same way.
func (l *Limits) Close() error { return nil }

// Memory is the budget of bytes held for calls in flight (the proxy's
// Budget).
func (l *Limits) Memory() *Memory { return l.memory }

// Connections bounds the client connections: the gateway wraps its
// listener and transport credentials with it.
func (l *Limits) Connections() *Connections { return l.conns }

// Resets is the gRPC stats handler that closes connections whose client
// resets the calls it starts (HTTP/2 Rapid Reset).
func (l *Limits) Resets() *Resets { return l.resets }

// Call is one call a client asks apid to start.
type Call struct {
	// Identity is the caller's client certificate subject.
	Identity string
	// IssuesCertificate is set for a call that issues a client
	// certificate (talosctl config new).
	IssuesCertificate bool
}

// AdmitCall admits one call of a client (not one another apid forwarded:
// that was counted where it entered), or refuses it with
// ResourceExhausted naming the limit. An admitted call calls release once
// it ends.
func (l *Limits) AdmitCall(c Call) (release func(), err error) {
	release, err = l.calls.Acquire(c.Identity)
	if err != nil {
		return nil, err
	}
	if c.IssuesCertificate {
		if err := l.issued.Allow(c.Identity); err != nil {
			release()
			return nil, err
		}
	}
	return release, nil
}

// AdmitNode admits one call of identity id to node (a stream when stream
// is set): its share of that node's connection.
func (l *Limits) AdmitNode(id, node string, stream bool) (release func(), err error) {
	return l.perNode.Acquire(id, node, stream)
}

// AdmitMetadata refuses routing or forwarded metadata too large to be
// anything but an attempt to make apid work for nothing.
func (l *Limits) AdmitMetadata(m MetadataSize) error { return l.metadata.admit(m) }

// AdmitCheck admits one cluster health check of identity id, at most
// maxRunning on this apid and perIdentity of one identity (the health
// section's keys).
func (l *Limits) AdmitCheck(id string, maxRunning, perIdentity int) (release func(), err error) {
	return l.checks.admit(id, maxRunning, perIdentity)
}

// AdmitHeld counts one disruptive call of identity id held by the
// disruption budget, at most perIdentity at once (that section's key).
func (l *Limits) AdmitHeld(id string, perIdentity int) (release func(), err error) {
	return l.held.admit(id, perIdentity)
}

// Describe implements prometheus.Collector.
func (l *Limits) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range l.collectors {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (l *Limits) Collect(ch chan<- prometheus.Metric) {
	for _, c := range l.collectors {
		c.Collect(ch)
	}
}

func (l *Limits) newCollectors() []prometheus.Collector {
	return []prometheus.Collector{
		gauge("apid_buffered_bytes", "Bytes held for calls in flight (limits.bufferedBytes bounds new calls).", l.memory.Held),
		gauge("apid_buffered_bytes_limit", "The limits.bufferedBytes budget.", l.memory.Limit),
		gauge("apid_client_connections", "Client connections open, handshaking ones included.", l.conns.Open),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: "apid_handshake_failures_total", Help: "TLS handshakes with clients that failed (bad or missing certificates, clients that gave up).",
		}, func() float64 { return float64(l.conns.HandshakeFailures()) }),
		refusals("bufferedBytes", l.memory.Refused),
		refusals("connections", l.conns.RefusedTotal),
		refusals("connectionsPerIdentity", l.conns.RefusedPerIdentity),
		refusals("concurrentCallsPerIdentity", l.calls.RefusedConcurrent),
		refusals("callsPerSecondPerIdentity", l.calls.RefusedRate),
		refusals("perIdentityPerNode", l.perNode.Refused),
		refusals("clientCertificatesPerHour", l.issued.Refused),
		refusals("handshakes", l.conns.RefusedHandshakes),
		refusals("perSource", l.conns.RefusedPerSource),
		refusals("rapidResets", l.resets.Closed),
		refusals("metadataBytes", l.metadata.Refused),
		refusals("health.maxRunning", l.checks.refusedRunning.Load),
		refusals("health.maxRunningPerIdentity", l.checks.refusedPerIdentity.Load),
		refusals("disruption.maxHeldPerIdentity", l.held.refused.Load),
	}
}

// gauge exports what read returns now.
func gauge(name, help string, read func() int64) prometheus.Collector {
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
