package gateway

import (
	"fmt"
	"slices"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/clusterhealth"
	"github.com/apid/apid/director"
	"github.com/apid/apid/disruption"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/limits"
)

// Section is one section of the configuration at run time, in the manner
// of a Caddy module: the package that owns the section's keys builds it
// from them (its New), and it then owns the rest of its life.
//
//   - Apply takes the section's part of a reloaded configuration, already
//     validated: its live keys take effect for what starts from then on.
//     (Restart keys were put back to their running values before.)
//   - Loosens lists the keys of a next configuration that would admit or
//     trust more than what runs now: a reload (or a file cut short) that
//     relaxes trust is a log line and a metric of its own.
//   - Describe and Collect export its metrics.
//
// A section that holds goroutines or files also has Close, called once
// when the gateway closes. A section that exists once per cluster is one
// value per cluster: nothing here assumes one. The disruption budget holds
// calls rather than refusing them: it is built before routing, which holds
// disruptive calls for it, and reads the nodes through routing; what it
// bounds per caller (held calls), it asks the limits.
type Section[C any] interface {
	Apply(C) error
	Loosens(C) []string
	prometheus.Collector
}

// The sections, held to the contract by the compiler.
var (
	_ Section[limits.Config]        = (*limits.Limits)(nil)
	_ Section[auth.Config]          = (*auth.Authorizer)(nil)
	_ Section[director.Config]      = (*director.Router)(nil)
	_ Section[inventory.Config]     = (*inventory.Inventory)(nil)
	_ Section[clusterhealth.Config] = (*clusterhealth.Server)(nil)
	_ Section[disruption.Config]    = (*disruption.Budget)(nil)
	_ Section[certs.Config]         = (*certificates)(nil)
	_ Section[Config]               = (*own)(nil)
)

// section is a Section bound to its part of the whole Config, so that the
// gateway holds one list and loops.
type section interface {
	name() string
	apply(next *Config) error
	loosens(next *Config) []string
	prometheus.Collector
}

type part[C any] struct {
	Section[C]
	key  string
	pick func(*Config) C
}

func (p part[C]) name() string                  { return p.key }
func (p part[C]) apply(next *Config) error      { return p.Apply(p.pick(next)) }
func (p part[C]) loosens(next *Config) []string { return p.Loosens(p.pick(next)) }

func bind[C any](key string, s Section[C], pick func(*Config) C) section {
	return part[C]{Section: s, key: key, pick: pick}
}

// sectionList is every section in the order a reload applies them: the
// inventory first, the one whose Apply can still fail (a file changed
// since it was validated), so that a refused reload changes nothing; the
// gateway's own keys last, as they read the policy.
func (g *Gateway) sectionList() []section {
	return []section{
		bind("inventory", g.inv, func(c *Config) inventory.Config { return c.Inventory }),
		bind("limits", g.limits, func(c *Config) limits.Config { return c.Limits }),
		bind("policy", g.policy, func(c *Config) auth.Config { return c.Policy }),
		bind("routing", g.routing, func(c *Config) director.Config { return c.Routing }),
		bind("health", g.health, healthConfig),
		bind("disruption", g.budget, func(c *Config) disruption.Config { return c.Disruption }),
		bind("certificates", g.certs, func(c *Config) certs.Config { return c.TLS }),
		bind("gateway", &own{g}, func(c *Config) Config { return *c }),
	}
}

// healthConfig is the health section's part: its own keys, and the
// routing's bound on nodes (a check covers at most maxNodes).
func healthConfig(c *Config) clusterhealth.Config {
	h := c.Health
	h.MaxNodes = c.Routing.MaxNodes
	return h
}

// Reload applies next, a whole configuration read anew (as on SIGHUP), to
// calls that start from now on, and re-reads the certificate files. An
// invalid next is refused and the running configuration stays; changes to
// keys that need a restart are logged by name and not applied; changes
// that loosen what apid admits or trusts are logged apart and counted.
func (g *Gateway) Reload(next Config) error {
	g.reload.Lock()
	defer g.reload.Unlock()
	if err := next.Validate(); err != nil {
		return g.refuseReload(err)
	}
	live, restart := reconcile(g.Config(), &next)
	var loosened []string
	for _, s := range g.sections {
		loosened = append(loosened, s.loosens(&next)...)
	}
	for _, s := range g.sections {
		if err := s.apply(&next); err != nil {
			return g.refuseReload(fmt.Errorf("%s: %w", s.name(), err))
		}
	}
	g.cfg.Store(&next)
	g.metrics.reloaded("config", nil)
	if len(restart) > 0 {
		g.log.Warn("configuration changes that need a restart were not applied", "keys", restart)
	}
	if len(loosened) > 0 {
		g.metrics.loosened()
		g.log.Warn("configuration reloaded with bounds or trust loosened", "keys", loosened)
	}
	g.log.Info("configuration reloaded", "changed", live)
	return nil
}

// ReloadFailed counts and logs a reload whose configuration could not even
// be read (a file that does not parse): the running one stays.
func (g *Gateway) ReloadFailed(err error) {
	g.reload.Lock()
	defer g.reload.Unlock()
	_ = g.refuseReload(err)
}

func (g *Gateway) refuseReload(err error) error {
	g.metrics.reloaded("config", err)
	g.log.Error("configuration refused; the running one stays", "err", err)
	return err
}

// loosenedFromDefaults lists what cfg relaxes against apid's defaults,
// reported at start: there is no running configuration to compare with
// then, and a file cut short or edited by hand should not relax trust or
// bounds without a word. Restart keys count too (TLS 1.2, combined client
// certificates, a public admin endpoint, PROXY headers).
func loosenedFromDefaults(cfg Config) []string {
	d := Default()
	keys := slices.Concat(
		limits.Loosens(d.Limits, cfg.Limits),
		auth.Loosens(d.Policy, cfg.Policy),
		director.Loosens(d.Routing, cfg.Routing),
		inventory.Loosens(d.Inventory, cfg.Inventory),
		disruption.Loosens(d.Disruption, cfg.Disruption),
	)
	for _, k := range []struct {
		key string
		on  bool
	}{
		{"allowTLS12", cfg.TLS.AllowTLS12},
		{"allowCombinedClientCertificates", cfg.TLS.AllowCombinedClientCertificates},
		{"adminPublic", cfg.AdminPublic},
		{"proxyProtocol", len(cfg.ProxyProtocol) > 0},
	} {
		if k.on {
			keys = append(keys, k.key)
		}
	}
	return keys
}

// own is the gateway's own keys as a section: the log level, and what the
// health service reports (it follows the policy's services). drainDelay
// and shutdownTimeout are read from the running Config when a drain
// starts.
type own struct{ g *Gateway }

func (o *own) Apply(c Config) error {
	o.g.setLogLevel(c.LogLevel)
	o.g.ready.setServices(o.g.policy.Policy().Services())
	return nil
}

func (o *own) Loosens(Config) []string { return nil }

func (o *own) Describe(chan<- *prometheus.Desc) {}
func (o *own) Collect(chan<- prometheus.Metric) {}
