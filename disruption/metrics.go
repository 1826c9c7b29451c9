package disruption

import (
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the section's series.
type metrics struct {
	active    atomic.Int64 // disruptions admitted and not over
	wait      prometheus.Histogram
	decisions *prometheus.CounterVec
	all       []prometheus.Collector
}

func newMetrics(b *Budget) *metrics {
	m := &metrics{
		wait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "apid_disruption_wait_seconds",
			Help:    "How long disruptive calls that were held waited for their node's turn.",
			Buckets: []float64{1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800},
		}),
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "apid_disruption_decisions_total",
			Help: "What the disruption budget decided for disruptive calls: admitted (at once or after a hold), held, forced, expired (gave up held), canceled (the caller left).",
		}, []string{"decision"}),
	}
	for _, d := range []string{"admitted", "held", "forced", "expired", "canceled"} {
		m.decisions.WithLabelValues(d)
	}
	gauge := func(state string, read func() float64) prometheus.Collector {
		return prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name:        "apid_disruptions",
			Help:        "Disruptive calls held (waiting for their node's turn) and active (admitted, their node not back yet).",
			ConstLabels: prometheus.Labels{"state": state},
		}, read)
	}
	m.all = []prometheus.Collector{
		gauge("held", func() float64 { b.mu.Lock(); defer b.mu.Unlock(); return float64(len(b.queue)) }),
		gauge("active", func() float64 { return float64(b.m.active.Load()) }),
		m.wait, m.decisions,
	}
	return m
}

func (m *metrics) decided(d string)       { m.decisions.WithLabelValues(d).Inc() }
func (m *metrics) waited(d time.Duration) { m.wait.Observe(d.Seconds()) }

// Describe implements prometheus.Collector.
func (b *Budget) Describe(ch chan<- *prometheus.Desc) {
	for _, c := range b.m.all {
		c.Describe(ch)
	}
}

// Collect implements prometheus.Collector.
func (b *Budget) Collect(ch chan<- prometheus.Metric) {
	for _, c := range b.m.all {
		c.Collect(ch)
	}
}
