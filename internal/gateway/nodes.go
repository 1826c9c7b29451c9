package gateway

import (
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"

	"github.com/apid/apid/disruption"
)

// latencyBuckets are the upper bounds, in seconds, of the per-node latency
// histogram.
var latencyBuckets = []float64{0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}

// window is how many recent call durations a node keeps for percentiles.
const window = 256

// nodeTable follows every node apid calls: calls in flight, outcomes by
// code, a latency histogram, the recent latencies and the last error. It
// holds at most max nodes; a new node evicts the one idle longest, so
// clients naming made-up nodes cannot grow it (or the metrics drawn from
// it) without bound.
type nodeTable struct {
	mu    sync.Mutex
	max   int
	nodes map[string]*nodeStats
	now   func() time.Time
}

type nodeStats struct {
	name     string
	inFlight int
	calls    map[codes.Code]uint64
	buckets  []uint64 // per latencyBuckets, not cumulative
	sum      float64
	count    uint64
	recent   [window]time.Duration
	next     int // where recent's next sample goes
	filled   int
	lastErr  string
	lastCode codes.Code
	errAt    time.Time
	lastUsed time.Time
}

func newNodeTable(max int) *nodeTable {
	return &nodeTable{max: max, nodes: map[string]*nodeStats{}, now: time.Now}
}

// start counts a call to node; done, called once, records its outcome and
// how long the node took.
func (t *nodeTable) start(node string) (done func(code codes.Code, msg string, took time.Duration)) {
	began := t.now()
	t.mu.Lock()
	n := t.nodes[node]
	if n == nil {
		t.evict()
		n = &nodeStats{name: node, calls: map[codes.Code]uint64{}, buckets: make([]uint64, len(latencyBuckets)+1)}
		t.nodes[node] = n
	}
	n.inFlight++
	n.lastUsed = began
	t.mu.Unlock()
	var once sync.Once
	return func(code codes.Code, msg string, d time.Duration) {
		code = metricCode(code)
		once.Do(func() {
			now := t.now()
			t.mu.Lock()
			defer t.mu.Unlock()
			n.inFlight--
			n.lastUsed = now
			n.calls[code]++
			n.count++
			n.sum += d.Seconds()
			n.buckets[sort.SearchFloat64s(latencyBuckets, d.Seconds())]++
			n.recent[n.next] = d
			n.next = (n.next + 1) % window
			n.filled = min(n.filled+1, window)
			if code != codes.OK && code != codes.Canceled {
				n.lastErr, n.lastCode, n.errAt = msg, code, now
			}
		})
	}
}

// evict makes room for one more node, dropping the idle node least
// recently used. Nodes with calls in flight stay, even over max.
func (t *nodeTable) evict() {
	for len(t.nodes) >= t.max {
		var victim *nodeStats
		for _, n := range t.nodes {
			if n.inFlight == 0 && (victim == nil || n.lastUsed.Before(victim.lastUsed)) {
				victim = n
			}
		}
		if victim == nil {
			return
		}
		delete(t.nodes, victim.name)
	}
}

// NodeStatus is one node as /nodes shows it.
type NodeStatus struct {
	Node       string            `json:"node"`
	Connection string            `json:"connection"` // the pool's state, or "local", or "none"
	InFlight   int               `json:"inFlight"`
	Calls      map[string]uint64 `json:"calls"` // by status code
	LatencyMs  *Percentiles      `json:"latencyMs,omitempty"`
	LastError  *NodeError        `json:"lastError,omitempty"`
	LastUsed   time.Time         `json:"lastUsed"`
	Ejected    *NodeEjection     `json:"ejected,omitempty"`
	// Inventory is what the inventory says of the node, when it lists it.
	Inventory *NodeInventory `json:"inventory,omitempty"`
	// Disruption is what the disruption budget says of the node: calls
	// that took it down and are not over, calls held for its turn, why it
	// counts as down.
	Disruption *disruption.View `json:"disruption,omitempty"`
}

// NodeInventory is a node's entry in the inventory.
type NodeInventory struct {
	Address  string            `json:"address"`
	Identity string            `json:"identity"`
	Role     string            `json:"role"`
	Labels   map[string]string `json:"labels,omitempty"`
}

// NodeEjection says since when and until when a node is ejected.
type NodeEjection struct {
	Since     time.Time `json:"since"`
	Until     time.Time `json:"until"`
	Failures  int       `json:"failures"`
	LastError string    `json:"lastError"`
}

// Percentiles are latencies over a node's recent calls (up to 256).
type Percentiles struct {
	Calls int     `json:"calls"`
	P50   float64 `json:"p50"`
	P90   float64 `json:"p90"`
	P99   float64 `json:"p99"`
	Max   float64 `json:"max"`
}

// NodeError is the last call to a node that failed.
type NodeError struct {
	Code    string    `json:"code"`
	Message string    `json:"message"`
	At      time.Time `json:"at"`
}

// snapshot is every node's status, sorted by name.
func (t *nodeTable) snapshot() []NodeStatus {
	t.mu.Lock()
	defer t.mu.Unlock()
	out := make([]NodeStatus, 0, len(t.nodes))
	for _, n := range t.nodes {
		s := NodeStatus{Node: n.name, InFlight: n.inFlight, Calls: map[string]uint64{}, LastUsed: n.lastUsed}
		for c, v := range n.calls {
			s.Calls[c.String()] = v
		}
		if n.filled > 0 {
			s.LatencyMs = percentiles(n.recent[:n.filled])
		}
		if n.lastErr != "" || n.lastCode != codes.OK {
			s.LastError = &NodeError{Code: n.lastCode.String(), Message: n.lastErr, At: n.errAt}
		}
		out = append(out, s)
	}
	slices.SortFunc(out, func(a, b NodeStatus) int {
		switch {
		case a.Node < b.Node:
			return -1
		case a.Node > b.Node:
			return 1
		}
		return 0
	})
	return out
}

func percentiles(ds []time.Duration) *Percentiles {
	s := slices.Clone(ds)
	slices.Sort(s)
	at := func(q float64) float64 {
		i := int(q*float64(len(s)-1) + 0.5)
		return float64(s[i].Microseconds()) / 1000
	}
	return &Percentiles{Calls: len(s), P50: at(0.5), P90: at(0.9), P99: at(0.99), Max: at(1)}
}

var (
	nodeCallsDesc = prometheus.NewDesc("apid_node_calls_total",
		"Calls to each node apid follows (its part of one-to-one and fan-out calls), by status code.", []string{"node", "code"}, nil)
	nodeDurationDesc = prometheus.NewDesc("apid_node_call_duration_seconds",
		"Duration of each node's part of calls, per node.", []string{"node"}, nil)
	nodeInFlightDesc = prometheus.NewDesc("apid_node_calls_in_flight",
		"Calls to each node running now.", []string{"node"}, nil)
)

// Describe implements prometheus.Collector.
func (t *nodeTable) Describe(ch chan<- *prometheus.Desc) {
	ch <- nodeCallsDesc
	ch <- nodeDurationDesc
	ch <- nodeInFlightDesc
}

// Collect implements prometheus.Collector: one series set per node in the
// table that has answered at least once; nodes that never answered (down,
// or names a caller made up) share the series of node="unanswered", so
// callers cannot mint label values.
func (t *nodeTable) Collect(ch chan<- prometheus.Metric) {
	t.mu.Lock()
	defer t.mu.Unlock()
	rest := &nodeStats{name: "unanswered", calls: map[codes.Code]uint64{}, buckets: make([]uint64, len(latencyBuckets)+1)}
	for _, n := range t.nodes {
		if !n.answered() {
			for c, v := range n.calls {
				rest.calls[c] += v
			}
			for i, b := range n.buckets {
				rest.buckets[i] += b
			}
			rest.count, rest.sum, rest.inFlight = rest.count+n.count, rest.sum+n.sum, rest.inFlight+n.inFlight
			continue
		}
		n.collect(ch)
	}
	if rest.count > 0 || rest.inFlight > 0 {
		rest.collect(ch)
	}
}

// answered reports whether the node ever answered (with anything but a
// failure to reach it).
func (n *nodeStats) answered() bool {
	for c := range n.calls {
		switch c {
		case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled:
		default:
			return true
		}
	}
	return false
}

func (n *nodeStats) collect(ch chan<- prometheus.Metric) {
	for c, v := range n.calls {
		ch <- prometheus.MustNewConstMetric(nodeCallsDesc, prometheus.CounterValue, float64(v), n.name, c.String())
	}
	cum := make(map[float64]uint64, len(latencyBuckets))
	var total uint64
	for i, b := range latencyBuckets {
		total += n.buckets[i]
		cum[b] = total
	}
	ch <- prometheus.MustNewConstHistogram(nodeDurationDesc, n.count, n.sum, cum, n.name)
	ch <- prometheus.MustNewConstMetric(nodeInFlightDesc, prometheus.GaugeValue, float64(n.inFlight), n.name)
}
