package director

import (
	"net/netip"

	"github.com/prometheus/client_golang/prometheus"
)

// Apply makes calls that start from now on routed by cfg (already
// validated); running calls keep the configuration they started with.
func (r *Router) Apply(cfg Config) error {
	r.SetConfig(cfg)
	return nil
}

// Applied returns the configuration routing applies now.
func (r *Router) Applied() Config { return *r.applied.Load() }

// Loosens lists the keys of next that would let calls reach more than the
// configuration applied now does: forwarding turned back on, or node
// networks widened or dropped.
func (r *Router) Loosens(next Config) []string { return Loosens(r.Applied(), next) }

// Loosens lists the keys of next that let calls reach more than cur does.
func Loosens(cur, next Config) []string {
	var keys []string
	if cur.LocalOnly && !next.LocalOnly {
		keys = append(keys, "localOnly")
	}
	if widens(cur.NodeNetworks, next.NodeNetworks) {
		keys = append(keys, "nodeNetworks")
	}
	if next.MaxNodes > cur.MaxNodes {
		keys = append(keys, "maxNodes")
	}
	return keys
}

// widens reports whether the networks next admit an address that cur's do
// not (no networks at all admit every address).
func widens(cur, next []string) bool {
	if len(cur) == 0 {
		return false
	}
	if len(next) == 0 {
		return true
	}
	var have []netip.Prefix
	for _, c := range cur {
		if p, err := netip.ParsePrefix(c); err == nil {
			have = append(have, p.Masked())
		}
	}
	for _, n := range next {
		p, err := netip.ParsePrefix(n)
		if err != nil {
			continue
		}
		covered := false
		for _, h := range have {
			if h.Bits() <= p.Bits() && h.Contains(p.Masked().Addr()) {
				covered = true
				break
			}
		}
		if !covered {
			return true
		}
	}
	return false
}

// Close ends nothing the router owns: the connections are the pool's.
func (r *Router) Close() error { return nil }

var (
	ejectedDesc  = prometheus.NewDesc("apid_nodes_ejected", "Nodes ejected now (outlier ejection).", nil, nil)
	ejectionDesc = prometheus.NewDesc("apid_node_ejections_total", "Nodes ejected after failing in a row.", nil, nil)
	restoredDesc = prometheus.NewDesc("apid_node_restorations_total", "Ejected nodes restored after a call to them succeeded.", nil, nil)
)

// Describe implements prometheus.Collector.
func (r *Router) Describe(ch chan<- *prometheus.Desc) {
	ch <- ejectedDesc
	ch <- ejectionDesc
	ch <- restoredDesc
}

// Collect implements prometheus.Collector.
func (r *Router) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(ejectedDesc, prometheus.GaugeValue, float64(len(r.Ejections())))
	ch <- prometheus.MustNewConstMetric(ejectionDesc, prometheus.CounterValue, float64(r.ejected.Load()))
	ch <- prometheus.MustNewConstMetric(restoredDesc, prometheus.CounterValue, float64(r.restored.Load()))
}

var (
	poolOpenDesc  = prometheus.NewDesc("apid_node_connections_open", "Connections to other nodes held in the pool.", nil, nil)
	poolStateDesc = prometheus.NewDesc("apid_node_connections",
		"Connections to other nodes in the pool, by connectivity state.", []string{"state"}, nil)
)

// Describe implements prometheus.Collector.
func (p *Pool) Describe(ch chan<- *prometheus.Desc) {
	ch <- poolOpenDesc
	ch <- poolStateDesc
}

// Collect implements prometheus.Collector: the connections held, by state.
func (p *Pool) Collect(ch chan<- prometheus.Metric) {
	n := map[string]int{"IDLE": 0, "CONNECTING": 0, "READY": 0, "TRANSIENT_FAILURE": 0, "SHUTDOWN": 0}
	entries := p.Snapshot()
	for _, e := range entries {
		n[e.State]++
	}
	ch <- prometheus.MustNewConstMetric(poolOpenDesc, prometheus.GaugeValue, float64(len(entries)))
	for state, v := range n {
		ch <- prometheus.MustNewConstMetric(poolStateDesc, prometheus.GaugeValue, float64(v), state)
	}
}
