package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/apid/apid/certs"
)

// certificates is the certificates section at run time: the TLS material
// the listener and the node connections use (certs.Source), re-read every
// reloadInterval and on each reload, with the expiry of what it holds as
// metrics. Its keys (the files, TLS versions) need a restart; the files'
// contents do not.
type certificates struct {
	src     *certs.Source
	log     *slog.Logger
	changed func()          // new material: new connections to nodes, readiness again
	counted func(err error) // a reload's outcome, for apid_reloads_total
	stop    context.CancelFunc
	watch   sync.WaitGroup
}

// newCertificates loads the material cfg names and checks that it can
// work (a CA bundle that lacks the node certificate's issuer, selfNames
// the certificate does not carry, ...): every problem at once. changed is
// called after new material replaced the old, counted with each reload's
// outcome.
func newCertificates(cfg Config, log *slog.Logger, changed func(), counted func(error)) (*certificates, error) {
	src, err := certs.NewSource(cfg.TLS.Files)
	if err != nil {
		return nil, fmt.Errorf("load certificates: %w", err)
	}
	problems, warnings := checkMaterial(cfg, src)
	if len(problems) > 0 {
		return nil, errors.Join(problems...)
	}
	for _, w := range warnings {
		log.Warn(w.Error())
	}
	return &certificates{src: src, log: log, changed: changed, counted: counted}, nil
}

// watchFiles re-reads the files every interval until Close.
func (c *certificates) watchFiles(interval time.Duration) {
	ctx, stop := context.WithCancel(context.Background())
	c.stop = stop
	c.watch.Go(func() {
		c.src.Watch(ctx, interval, func() {
			c.counted(nil)
			c.log.Info("certificates reloaded")
			c.changed()
		}, func(err error) {
			c.counted(err)
			c.log.Warn("certificate reload failed; keeping the current ones", "err", err)
		})
	})
}

// Apply re-reads the files now (a reload). A file that does not load
// keeps the running material and is reported; it does not refuse the
// configuration.
func (c *certificates) Apply(certs.Config) error {
	changed, err := c.src.Reload()
	c.counted(err)
	switch {
	case err != nil:
		c.log.Warn("certificate reload failed; keeping the current ones", "err", err)
	case changed:
		c.log.Info("certificates reloaded")
		c.changed()
	default:
		c.log.Info("certificates unchanged")
	}
	return nil
}

// Loosens lists nothing: what the section could loosen (TLS 1.2, combined
// client certificates) needs a restart.
func (c *certificates) Loosens(certs.Config) []string { return nil }

// Close stops watching the files.
func (c *certificates) Close() error {
	if c.stop != nil {
		c.stop()
		c.watch.Wait()
	}
	return nil
}

var certExpiryDesc = prometheus.NewDesc("apid_certificate_expiry_seconds",
	"Seconds until a certificate expires (negative: expired): the one apid serves (kind=serving), the one it forwards with (kind=forwarding) and each CA it trusts (kind=ca).",
	[]string{"kind", "subject"}, nil)

// Describe implements prometheus.Collector.
func (c *certificates) Describe(ch chan<- *prometheus.Desc) { ch <- certExpiryDesc }

// Collect implements prometheus.Collector: the seconds until the serving
// certificate, the forwarding one and each CA expire.
func (c *certificates) Collect(ch chan<- prometheus.Metric) {
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
