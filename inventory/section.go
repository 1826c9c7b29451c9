package inventory

import "github.com/prometheus/client_golang/prometheus"

// Apply replaces the sources with those of cfg, as Configure does: the
// inventory section's reload.
func (inv *Inventory) Apply(cfg Config) error { return inv.Configure(cfg) }

// Loosens lists the keys of next that would let callers reach nodes the
// inventory applied now does not: names outside it looked up in DNS.
func (inv *Inventory) Loosens(next Config) []string { return Loosens(*inv.conf.Load(), next) }

// Loosens lists the keys of next that let callers reach nodes cur does not.
func Loosens(cur, next Config) []string {
	resolves := func(c Config) bool { return c.ResolveUnknown || !c.Configured() }
	if !resolves(cur) && resolves(next) {
		return []string{"inventory.resolveUnknown"}
	}
	return nil
}

var nodesDesc = prometheus.NewDesc("apid_inventory_nodes", "Nodes in the inventory now, all sources merged.", nil, nil)

// Describe implements prometheus.Collector.
func (inv *Inventory) Describe(ch chan<- *prometheus.Desc) { ch <- nodesDesc }

// Collect implements prometheus.Collector.
func (inv *Inventory) Collect(ch chan<- prometheus.Metric) {
	ch <- prometheus.MustNewConstMetric(nodesDesc, prometheus.GaugeValue, float64(inv.Set().Len()))
}
