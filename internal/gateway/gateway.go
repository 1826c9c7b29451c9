package gateway

import (
	"context"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"

	"google.golang.org/grpc"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/clusterhealth"
	"github.com/apid/apid/director"
	"github.com/apid/apid/disruption"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/limits"
)

// NewLogger returns a logger to w in format (json, or text) whose level is
// level (which the caller may change while it runs, as a reload does).
func NewLogger(w io.Writer, level *slog.LevelVar, format string) *slog.Logger {
	opts := &slog.HandlerOptions{Level: level}
	if format == "text" {
		return slog.New(slog.NewTextHandler(w, opts))
	}
	return slog.New(slog.NewJSONHandler(w, opts))
}

// ParseLevel reads debug, info, warn or error; anything else means info
// (Validate refuses it first).
func ParseLevel(s string) slog.Level {
	var l slog.Level
	_ = l.UnmarshalText([]byte(s))
	return l
}

// Gateway is one apid: its sections (certificates, limits, policy,
// routing, inventory, health), the connections to the local agent and to
// other nodes, and the gRPC server that proxies.
type Gateway struct {
	cfg    atomic.Pointer[Config]
	reload sync.Mutex // serialises Reload
	log    *slog.Logger
	level  *slog.LevelVar // nil: fixed by whoever made log

	// The sections, each built from its keys; sections lists them for
	// Reload and the metrics.
	certs    *certificates
	limits   *limits.Limits
	policy   *auth.Authorizer
	inv      *inventory.Inventory
	routing  *director.Router
	health   *clusterhealth.Server
	budget   *disruption.Budget
	sections []section

	local   *grpc.ClientConn // the local node agent
	pool    *director.Pool   // the other nodes' apid
	tracing *tracing         // nil: off
	server  *grpc.Server
	metrics *metrics
	ready   *readiness
	nodes   *nodeTable
	life    *lifecycle

	adminOpen   atomic.Int64 // admin endpoint connections open
	adminLogged atomic.Int64 // when a refused admin request was last logged (unix ns)
	adminAddr   net.Addr     // set before serving is closed
	// nodesBuild lets one /nodes request at a time build its page:
	// building merges the whole inventory, so its cost is paid once
	// however many clients ask at once.
	nodesBuild sync.Mutex
}

// Option adjusts how New assembles a gateway.
type Option func(*Gateway)

// WithLogLevel gives the gateway the level of its logger: set to logLevel
// at start and on every reload.
func WithLogLevel(level *slog.LevelVar) Option {
	return func(g *Gateway) { g.level = level }
}

// New assembles a gateway from cfg, which it validates (every problem is
// reported at once): each section is built from its keys, then the server
// that passes calls through them. It opens no listener: Serve does. A nil
// log discards.
func New(cfg Config, log *slog.Logger, opts ...Option) (_ *Gateway, err error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	g := &Gateway{log: log, metrics: newMetrics(), nodes: newNodeTable(cfg.Nodes.MaxConns), life: newLifecycle()}
	for _, o := range opts {
		o(g)
	}
	defer func() {
		if err != nil {
			g.Close()
		}
	}()
	if g.certs, err = newCertificates(cfg, log, g.certificatesChanged, g.metrics.counter("certificates")); err != nil {
		return nil, err
	}
	if g.tracing, err = newTracing(cfg.Tracing, instanceName(cfg, g.certs)); err != nil {
		return nil, err
	}
	if g.local, err = dialLocal(cfg, g.tracing); err != nil {
		return nil, err
	}
	g.pool = director.NewPool(poolConfig(cfg, g.certs, g.tracing))
	g.limits = limits.New(cfg.Limits, cfg.HandshakeTimeout, log)
	if g.policy, err = newAuthorizer(cfg.Policy, log); err != nil {
		return nil, err
	}
	inventoryCounted := g.metrics.counter("inventory")
	if g.inv, err = inventory.New(cfg.Inventory, log, func(e inventory.Event) { inventoryCounted(e.Err) },
		inventory.WithMembers(watchMembers(g.local, g.pool))); err != nil {
		return nil, err
	}
	// The budget reads the nodes through routing, which holds calls
	// for the budget: built first, it dials once routing exists.
	if err = cfg.Disruption.Etcd.CheckFiles(cfg.TLS.Key, cfg.TLS.ClientKey); err != nil {
		return nil, err
	}
	if g.budget, err = disruption.New(cfg.Disruption, disruption.Options{
		Dial: func(ctx context.Context, node string) (context.Context, grpc.ClientConnInterface, func(error), error) {
			return g.routing.DialEjected(ctx, node)
		},
		Inventory: g.inv.Set, Admission: g.limits, Log: log, Gateway: instanceName(cfg, g.certs),
	}); err != nil {
		return nil, err
	}
	if g.budget.Shared() {
		log.Info("disruption budget shared with the cluster's other gateways through etcd", "endpoints", cfg.Disruption.Etcd.Endpoints)
	} else if cfg.Disruption.Enabled {
		log.Info("disruption budget kept by this gateway alone: set disruption.etcd to share it with the cluster's other gateways")
	}
	g.routing = director.NewRouter(cfg.Routing, director.Deps{Local: g.local, Nodes: g.pool, Inventory: g.inv, Admission: g.limits, Log: log, Budget: g.budget})
	g.health = clusterhealth.New(healthConfig(&cfg), g.healthOptions())
	g.ready = newReadiness(g.certs.src, cfg.Backend, g.policy.Policy().Services())
	g.sections = g.sectionList()
	for _, s := range g.sections {
		g.metrics.register(s)
	}
	g.metrics.register(g.pool, g.nodes, g.gauges())
	g.server = g.newServer(cfg)
	if keys := loosenedFromDefaults(cfg); len(keys) > 0 {
		g.metrics.loosened()
		log.Warn("configuration loosens apid's defaults", "keys", keys)
	}
	g.setLogLevel(cfg.LogLevel)
	g.cfg.Store(&cfg)
	g.certs.watchFiles(cfg.TLS.ReloadInterval)
	g.life.watchBackend(g.ready, g.local)
	return g, nil
}

// newAuthorizer builds the policy section from its keys.
func newAuthorizer(cfg auth.Config, log *slog.Logger) (*auth.Authorizer, error) {
	policy, err := cfg.Policy()
	if err != nil {
		return nil, err
	}
	return auth.NewAuthorizer(policy, log), nil
}

// healthOptions are what the cluster health check uses of the other
// sections.
func (g *Gateway) healthOptions() clusterhealth.Options {
	return clusterhealth.Options{
		Dialer:    g.routing,
		Nodes:     g.inventoryNodes,
		Self:      func() *x509.Certificate { return g.certs.src.Certificate().Leaf },
		Authorize: func(ctx context.Context, method string) error { _, err := g.policy.Authorize(ctx, method); return err },
		Admission: callers{g.limits},
		Checking:  checking,
	}
}

// instanceName names this apid in traces: its first self name, or its
// certificate's common name.
func instanceName(cfg Config, c *certificates) string {
	if len(cfg.Routing.SelfNames) > 0 {
		return cfg.Routing.SelfNames[0]
	}
	return c.src.Certificate().Leaf.Subject.CommonName
}

// inventoryNodes are the nodes a cluster health check covers when the
// request names none.
func (g *Gateway) inventoryNodes() (controlPlane, workers []string) {
	for _, n := range g.inv.Set().Nodes() {
		if n.Role == inventory.RoleControlPlane {
			controlPlane = append(controlPlane, n.Name)
		} else {
			workers = append(workers, n.Name)
		}
	}
	return controlPlane, workers
}

// Config returns the configuration running now.
func (g *Gateway) Config() Config { return *g.cfg.Load() }

// setLogLevel applies logLevel to the logger, when the gateway holds its
// level.
func (g *Gateway) setLogLevel(level string) {
	if g.level != nil {
		g.level.Set(ParseLevel(level))
	}
}

// certificatesChanged makes new calls to other nodes use new connections
// (and so the new certificate); running streams keep theirs.
func (g *Gateway) certificatesChanged() {
	g.pool.Reset()
	g.ready.publish()
}

// Close releases everything New built, the server included (Serve stops
// it gracefully first); it tolerates a gateway New gave up on half-way.
func (g *Gateway) Close() {
	g.life.close()
	if g.server != nil {
		g.server.Stop()
	}
	if g.certs != nil {
		_ = g.certs.Close()
	}
	if g.budget != nil {
		_ = g.budget.Close()
	}
	if g.inv != nil {
		g.inv.Close()
	}
	if g.pool != nil {
		_ = g.pool.Close()
	}
	if g.local != nil {
		_ = g.local.Close()
	}
	if g.tracing != nil {
		ctx, cancel := context.WithTimeout(context.Background(), shutdownTracing)
		defer cancel()
		if err := g.tracing.shutdown(ctx); err != nil {
			g.log.Warn("tracing: spans not sent", "err", err)
		}
	}
}
