package gateway

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/clusterhealth"
	"github.com/apid/apid/director"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/limits"
	"github.com/apid/apid/proxy"
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

// errShuttingDown ends the calls still running when shutdownTimeout is up.
var errShuttingDown = errors.New("apid is shutting down")

// Gateway is one apid: the TLS material, the connections to the local
// agent and to other nodes, and the gRPC server that proxies.
type Gateway struct {
	health    *clusterhealth.Server
	adminOpen atomic.Int64 // admin endpoint connections open
	// nodesBuild lets one /nodes request at a time build its page:
	// building merges the whole inventory, so its cost is paid once
	// however many clients ask at once.
	nodesBuild sync.Mutex
	cfg        atomic.Pointer[Config]
	reload     sync.Mutex // serialises Reload
	log        *slog.Logger
	level      *slog.LevelVar // nil: fixed by whoever made log
	src        *certs.Source
	local      *grpc.ClientConn
	pool       *director.Pool
	router     *director.Router
	authz      *auth.Authorizer
	budget     *limits.Memory
	conns      *limits.Connections
	calls      *limits.Calls
	perNode    *limits.PerNode
	issued     *limits.Issuance
	server     *grpc.Server
	metrics    *metrics
	ready      *readiness
	nodes      *nodeTable
	inv        *inventory.Inventory
	tracing    *tracing // nil: off

	ejections *ejectionCounts
	resets    *resetGuard

	inFlight  atomic.Int64
	adminAddr net.Addr           // set before serving is closed
	serving   chan struct{}      // closed once Serve accepts
	hardStop  context.Context    // done when running calls must end
	endCalls  context.CancelFunc // ends them
	stopping  context.Context    // done once apid stops accepting
	goAway    context.CancelFunc // ends it
	now       chan struct{}      // closed by StopNow
	nowOnce   sync.Once
	stop      context.CancelFunc // ends the watchers
}

// Option adjusts how New assembles a gateway.
type Option func(*Gateway)

// WithLogLevel gives the gateway the level of its logger: set to logLevel
// at start and on every reload.
func WithLogLevel(level *slog.LevelVar) Option {
	return func(g *Gateway) { g.level = level }
}

// New assembles a gateway from cfg, which it validates (every problem is
// reported at once). It opens no listener: Serve does. A nil log discards.
func New(cfg Config, log *slog.Logger, opts ...Option) (*Gateway, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	policy, err := cfg.validate()
	if err != nil {
		return nil, err
	}
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
	instance := src.Certificate().Leaf.Subject.CommonName
	if len(cfg.Routing.SelfNames) > 0 {
		instance = cfg.Routing.SelfNames[0]
	}
	tr, err := newTracing(cfg.Tracing, instance)
	if err != nil {
		return nil, err
	}
	built := false
	defer func() {
		if tr != nil && !built { // New failed after tracing started
			_ = tr.shutdown(context.Background())
		}
	}()
	var traced []grpc.DialOption
	if tr != nil {
		traced = append(traced, tr.dialOption())
	}
	local, err := grpc.NewClient(cfg.Backend, append(traced,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Idle mode has hung local backends (grpc-go #9191); the local
		// agent is one connection that is always wanted.
		grpc.WithIdleTimeout(0),
		// A restarted agent is used again within 15 s, not the up to 2
		// minutes of gRPC's default backoff.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: reconnectBackoff(), MinConnectTimeout: director.ConnectTimeout}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(cfg.MaxMessageSize), grpc.MaxCallSendMsgSize(cfg.MaxMessageSize)),
		grpc.WithInitialWindowSize(int32(cfg.Limits.StreamWindow)), grpc.WithInitialConnWindowSize(int32(cfg.Limits.ConnectionWindow)),
	)...)
	if err != nil {
		return nil, fmt.Errorf("local backend %q: %w", cfg.Backend, err)
	}
	poolCfg := cfg.Nodes
	poolCfg.DialOptions = append(remoteDialOptions(cfg), traced...)
	poolCfg.Credentials = func(host string) credentials.TransportCredentials {
		return credentials.NewTLS(certs.ClientConfig(src, host))
	}
	pool := director.NewPool(poolCfg)
	ctx, stop := context.WithCancel(context.Background())
	hardStop, endCalls := context.WithCancelCause(context.Background())
	stopping, goAway := context.WithCancel(context.Background())
	g := &Gateway{
		log: log, src: src, local: local, pool: pool,
		ejections: &ejectionCounts{},
		authz:     auth.NewAuthorizer(policy, log),
		budget:    limits.NewMemory(int64(cfg.Limits.BufferedBytes)),
		conns:     limits.NewConnections(cfg.Limits.Connections, cfg.Limits.ConnectionsPerIdentity, log),
		calls:     limits.NewCalls(cfg.Limits.ConcurrentCallsPerIdentity, cfg.Limits.CallsPerSecondPerIdentity, cfg.Limits.CallBurstPerIdentity),
		perNode:   limits.NewPerNode(cfg.Limits.CallsPerIdentityPerNode, cfg.Limits.StreamsPerIdentityPerNode),
		issued:    limits.NewIssuance(cfg.Limits.ClientCertificatesPerHour),
		ready:     newReadiness(src, cfg.Backend, policy.Services()),
		nodes:     newNodeTable(cfg.Nodes.MaxConns),
		tracing:   tr,
		serving:   make(chan struct{}),
		now:       make(chan struct{}),
		stop:      stop, hardStop: hardStop, endCalls: func() { endCalls(errShuttingDown) },
		stopping: stopping, goAway: goAway,
	}
	for _, o := range opts {
		o(g)
	}
	g.setLogLevel(cfg.LogLevel)
	g.cfg.Store(&cfg)
	g.router = director.NewRouter(cfg.Routing, local, pool, func(e director.Ejection, ejected bool) {
		if ejected {
			g.ejections.ejected.Add(1)
			log.Warn("node ejected", "node", e.Node, "failures", e.Failures, "ejections_in_a_row", e.Ejections,
				"until", e.Until.UTC().Format(time.RFC3339Nano), "last_error", e.LastError)
			return
		}
		g.ejections.restored.Add(1)
		log.Info("node restored", "node", e.Node, "ejected_since", e.Since.UTC().Format(time.RFC3339Nano))
	})
	g.router.UsePerNodeLimits(g.perNode)
	g.conns.SetHandshakeLimits(cfg.Limits.Handshakes, cfg.Limits.HandshakesPerSource, cfg.Limits.ConnectionsPerSourcePerSecond)
	g.conns.SetHandshakeTimeout(cfg.HandshakeTimeout)
	g.resets = &resetGuard{conns: g.conns, log: log, now: time.Now}
	g.metrics = newMetrics(metricSources{authz: g.authz, router: g.router, pool: pool, budget: g.budget, conns: g.conns,
		calls: g.calls, perNode: g.perNode, issued: g.issued, nodes: g.nodes, src: src, inFlight: g.inFlight.Load, ejections: g.ejections, resets: g.resets.closed.Load,
		healthRefused: func() (running, perIdentity int64) {
			if h := g.health; h != nil {
				return h.RefusedRunning(), h.RefusedPerIdentity()
			}
			return 0, 0
		},
		adminOpen: g.adminOpen.Load})
	g.inv, err = inventory.New(cfg.Inventory, log, func(e inventory.Event) { g.metrics.reloaded("inventory", e.Err) },
		inventory.WithMembers(watchMembers(local, pool)))
	if err != nil { // a file changed since validate read it
		stop()
		_ = pool.Close()
		_ = local.Close()
		return nil, err
	}
	g.router.UseInventory(g.inv)
	obs := &observer{metrics: g.metrics, nodes: g.nodes}
	serverOpts := []grpc.ServerOption{grpc.StatsHandler(auditStats{}), grpc.StatsHandler(g.resets), grpc.StatsHandler(shutdownConns{g.hardStop})}
	if tr != nil {
		obs.tracer = tr.tracer
		serverOpts = append(serverOpts, tr.serverOption())
	}
	handler := proxy.NewHandler(g.router, proxy.Options{
		MaxReplySize: cfg.MaxMessageSize, NodeBuffer: int(cfg.Limits.NodeBuffer), Observer: obs, Budget: g.budget,
		ReplyKey: g.router.ReplyKey,
	})

	g.server = grpc.NewServer(append(serverOpts,
		grpc.Creds(g.conns.Credentials(credentials.NewTLS(certs.ServerConfig(src, cfg.TLS.ServerOptions())))),
		grpc.ForceServerCodecV2(proxy.Codec()),
		grpc.UnknownServiceHandler(handler.StreamHandler()),
		grpc.MaxRecvMsgSize(cfg.MaxMessageSize),
		grpc.MaxSendMsgSize(cfg.MaxMessageSize),
		// Fixed windows (which also turn off gRPC's dynamic window that
		// grows to 16 MiB) bound what a stream whose reader stalls holds.
		grpc.InitialWindowSize(int32(cfg.Limits.StreamWindow)),
		grpc.InitialConnWindowSize(int32(cfg.Limits.ConnectionWindow)),
		// A client that has not finished its TLS handshake by now is not
		// going to; grpc-go's default waits 120 s.
		grpc.ConnectionTimeout(cfg.HandshakeTimeout),
		grpc.MaxConcurrentStreams(cfg.MaxConcurrentStreams),
		grpc.MaxHeaderListSize(1<<20),
		// An idle client connection should cost little: the HTTP/2 framer
		// reads from the TLS connection, which buffers its records itself,
		// without a second 32 KiB buffer (grpc-go already shares write
		// buffers). Measured: 62.7 KiB per idle connection before, 39.7
		// KiB after.
		grpc.ReadBufferSize(0),
		// The most eager released client, talosctl v1.13's event
		// tracker, pings every 10 s; a server that counts pings a hair
		// early as strikes sends it GOAWAY (talos PR #14137). Half that
		// interval leaves room for jitter.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time: time.Minute, Timeout: 20 * time.Second, MaxConnectionIdle: cfg.MaxConnectionIdle,
			MaxConnectionAge: connectionAge(cfg.MaxConnectionAge), MaxConnectionAgeGrace: connectionAge(cfg.MaxConnectionAgeGrace),
		}),
		// Who the caller is comes first, so metrics and the call log can
		// name it; the authorizer comes last, right before the proxy.
		grpc.ChainStreamInterceptor(g.growStack, auth.IdentityInterceptor(), g.metrics.interceptor(), auditLog(log), g.limitCalls(), g.endOnShutdown(), g.authz.StreamInterceptor()),
		// Unary calls reach only the services apid serves itself (health).
		grpc.ChainUnaryInterceptor(g.metrics.unaryInterceptor(), g.authz.UnaryInterceptor()),
	)...)
	healthpb.RegisterHealthServer(g.server, g.ready.grpc)
	g.health = clusterhealth.New(clusterhealth.Options{
		Dialer: g.router,
		Config: func() clusterhealth.Config {
			c := g.cfg.Load()
			h := c.Health
			h.MaxNodes = c.Routing.MaxNodes
			return h
		},
		Nodes: g.inventoryNodes,
		Self:  func() *x509.Certificate { return src.Certificate().Leaf },
		Authorize: func(ctx context.Context, method string) error {
			_, err := g.authz.Authorize(ctx, method)
			return err
		},
		// A check's calls to nodes are its caller's calls.
		Admit: func(ctx context.Context) (func(), error) {
			id, ok := auth.IdentityFrom(ctx)
			if !ok || id.Forwarded {
				return func() {}, nil
			}
			return g.calls.Acquire(id.Subject)
		},
		Identity: func(ctx context.Context) string {
			id, _ := auth.IdentityFrom(ctx)
			return id.Subject
		},
		Checking: checking,
	})
	g.health.Register(g.server)

	go src.Watch(ctx, cfg.TLS.ReloadInterval, func() {
		g.metrics.reloaded("certificates", nil)
		g.certificatesChanged()
	}, func(err error) {
		g.metrics.reloaded("certificates", err)
		log.Warn("certificate reload failed; keeping the current ones", "err", err)
	})
	built = true
	go g.ready.watchBackend(ctx, local)
	go g.ready.recheck(ctx, 10*time.Second)
	return g, nil
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

// ejectionCounts count nodes ejected and restored.
type ejectionCounts struct{ ejected, restored atomic.Int64 }

// connectionAge is d, or "never" for zero, in grpc-go's terms.
func connectionAge(d time.Duration) time.Duration {
	if d == 0 {
		return time.Duration(math.MaxInt64)
	}
	return d
}

// remoteDialOptions are the options of connections to other nodes' apid.
func remoteDialOptions(cfg Config) []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: reconnectBackoff(), MinConnectTimeout: director.ConnectTimeout}),
		// A node whose kernel still acknowledges TCP but whose apid answers
		// nothing (stopped, hung) is dropped after 15 s + 5 s of silence;
		// other apids accept pings every 10 s.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 15 * time.Second, Timeout: 5 * time.Second, PermitWithoutStream: true}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(cfg.MaxMessageSize), grpc.MaxCallSendMsgSize(cfg.MaxMessageSize)),
		grpc.WithInitialWindowSize(int32(cfg.Limits.StreamWindow)), grpc.WithInitialConnWindowSize(int32(cfg.Limits.ConnectionWindow)),
		// The pool closes idle connections itself.
		grpc.WithIdleTimeout(0),
		// What one node's reply headers may hold.
		grpc.WithMaxHeaderListSize(maxNodeHeaderList),
	}
}

// maxNodeHeaderList bounds the header list of a node's reply: a node that
// sends more fails its own call rather than making apid hold it.
const maxNodeHeaderList = 256 << 10

// reconnectBackoff is gRPC's backoff capped at 15 s: a rebooted node (or a
// restarted agent) is back within seconds, not the 2 minutes of gRPC's
// default cap.
func reconnectBackoff() backoff.Config {
	bo := backoff.DefaultConfig
	bo.MaxDelay = 15 * time.Second
	return bo
}

// Config returns the configuration running now.
func (g *Gateway) Config() Config { return *g.cfg.Load() }

// Reload applies next, a whole configuration read anew (as on SIGHUP), to
// calls that start from now on, and re-reads the certificate files. An
// invalid next is refused and the running configuration stays; changes
// that need a restart are logged and not applied.
func (g *Gateway) Reload(next Config) error {
	g.reload.Lock()
	defer g.reload.Unlock()
	policy, err := next.validate()
	if err != nil {
		return g.refuseReload(err)
	}
	if err := g.inv.Configure(next.Inventory); err != nil { // a file changed since validate read it
		return g.refuseReload(err)
	}
	g.metrics.reloaded("config", nil)
	live, restart := reconcile(*g.cfg.Load(), &next)
	if len(restart) > 0 {
		g.log.Warn("configuration changes that need a restart were not applied", "keys", restart)
	}
	g.authz.SetPolicy(policy)
	g.ready.setServices(policy.Services())
	g.router.SetConfig(next.Routing)
	g.budget.SetLimit(int64(next.Limits.BufferedBytes))
	g.conns.SetLimits(next.Limits.Connections, next.Limits.ConnectionsPerIdentity)
	g.calls.SetLimits(next.Limits.ConcurrentCallsPerIdentity, next.Limits.CallsPerSecondPerIdentity, next.Limits.CallBurstPerIdentity)
	g.perNode.SetLimits(next.Limits.CallsPerIdentityPerNode, next.Limits.StreamsPerIdentityPerNode)
	g.issued.SetLimit(next.Limits.ClientCertificatesPerHour)
	g.conns.SetHandshakeLimits(next.Limits.Handshakes, next.Limits.HandshakesPerSource, next.Limits.ConnectionsPerSourcePerSecond)
	g.setLogLevel(next.LogLevel)
	g.cfg.Store(&next)
	g.log.Info("configuration reloaded", "changed", live)
	g.reloadCertificates()
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

// setLogLevel applies logLevel to the logger, when the gateway holds its
// level.
func (g *Gateway) setLogLevel(level string) {
	if g.level != nil {
		g.level.Set(ParseLevel(level))
	}
}

// reloadCertificates re-reads the certificate files now.
func (g *Gateway) reloadCertificates() {
	changed, err := g.src.Reload()
	g.metrics.reloaded("certificates", err)
	switch {
	case err != nil:
		g.log.Warn("certificate reload failed; keeping the current ones", "err", err)
	case changed:
		g.certificatesChanged()
	default:
		g.log.Info("certificates unchanged")
	}
}

// certificatesChanged makes new calls to other nodes use new connections
// (and so the new certificate); running streams keep theirs.
func (g *Gateway) certificatesChanged() {
	g.log.Info("certificates reloaded")
	g.pool.Reset()
	g.ready.publish()
}

// Serving is closed once Serve accepts connections.
func (g *Gateway) Serving() <-chan struct{} { return g.serving }

// AdminAddr is the address of the admin endpoint (nil when off), once
// Serving is closed.
func (g *Gateway) AdminAddr() net.Addr { return g.adminAddr }

// Serve serves lis (and the admin endpoint, if configured) until ctx ends,
// then drains: readiness fails at once, calls are still accepted for
// drainDelay, then apid stops accepting (GOAWAY) and running calls get
// shutdownTimeout to finish before they end with UNAVAILABLE. StopNow cuts
// the drain short.
func (g *Gateway) Serve(ctx context.Context, lis net.Listener) error {
	cfg := g.Config()
	adminCtx, stopAdmin := context.WithCancel(context.Background())
	defer stopAdmin()
	if cfg.AdminListen != "" {
		alis, err := net.Listen("tcp", cfg.AdminListen)
		if err != nil {
			_ = lis.Close()
			return fmt.Errorf("adminListen: %w", err)
		}
		g.adminAddr = alis.Addr()
		go func() {
			if err := g.admin(adminCtx, alis); err != nil {
				g.log.Error("admin endpoint failed", "err", err)
			}
		}()
	}
	done := make(chan error, 1)
	go func() { done <- g.server.Serve(g.conns.Listener(proxyProtocol(lis, cfg))) }()
	g.ready.setListening()
	close(g.serving)
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	g.drain()
	<-done
	return nil
}

// drain runs the phases of a graceful stop, logging each.
func (g *Gateway) drain() {
	cfg := g.Config()
	start := time.Now()
	g.ready.drain()
	g.log.Info("draining: readiness is NOT_SERVING; still accepting calls", "drain_delay", cfg.DrainDelay, "calls_in_flight", g.inFlight.Load())
	delay := time.NewTimer(cfg.DrainDelay)
	select {
	case <-delay.C:
	case <-g.now:
		delay.Stop()
	}

	g.log.Info("no longer accepting: sent GOAWAY; waiting for running calls", "calls_in_flight", g.inFlight.Load(), "shutdown_timeout", cfg.ShutdownTimeout)
	g.goAway() // health watchers have heard NOT_SERVING: their streams end now
	stopped := make(chan struct{})
	go func() {
		g.server.GracefulStop()
		close(stopped)
	}()
	timeout := time.NewTimer(cfg.ShutdownTimeout)
	defer timeout.Stop()
	select {
	case <-stopped:
		g.log.Info("all calls ended", "after", time.Since(start).Round(time.Millisecond))
		return
	case <-timeout.C:
	case <-g.now:
	}
	g.log.Warn("shutdown timeout: ending the calls still running with UNAVAILABLE", "calls_in_flight", g.inFlight.Load())
	g.endCalls()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		// A handler that ignores its context: close the connections.
		g.log.Error("calls did not end; closing every connection")
		g.server.Stop()
		<-stopped
	}
	g.log.Info("all calls ended", "after", time.Since(start).Round(time.Millisecond))
}

// StopNow cuts a drain short: the remaining delays end at once and running
// calls end with UNAVAILABLE (as on a second SIGTERM).
func (g *Gateway) StopNow() { g.nowOnce.Do(func() { close(g.now) }) }

// Close releases everything but the server, which Serve stops.
func (g *Gateway) Close() {
	g.stop()
	g.goAway()
	g.endCalls()
	g.server.Stop()
	g.inv.Close()
	_ = g.pool.Close()
	_ = g.local.Close()
	if g.tracing != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := g.tracing.shutdown(ctx); err != nil {
			g.log.Warn("tracing: spans not sent", "err", err)
		}
	}
}

// limitCalls applies the caller identity's call limits (calls in flight,
// calls a second, certificates issued an hour) before any node is
// contacted.
func (g *Gateway) limitCalls() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		id, ok := auth.IdentityFrom(ss.Context())
		// A call another apid forwarded was counted against its caller
		// there; counting it here against the node certificate would make
		// every client's calls through that apid share one budget.
		if !ok || id.Forwarded {
			return handler(srv, ss)
		}
		release, err := g.calls.Acquire(id.Subject)
		if err != nil {
			return err
		}
		defer release()
		if info.FullMethod == methodIssueClient {
			if err := g.issued.Allow(id.Subject); err != nil {
				return err
			}
		}
		return handler(srv, ss)
	}
}

// endOnShutdown counts the call in flight and ends it with UNAVAILABLE
// when shutdownTimeout is up.
func (g *Gateway) endOnShutdown() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		g.inFlight.Add(1)
		defer g.inFlight.Add(-1)
		ctx := ss.Context()
		if info.FullMethod == healthWatch {
			// A health watch would otherwise hold the stop for the whole
			// shutdownTimeout; it has been told NOT_SERVING already.
			var cancel context.CancelCauseFunc
			ctx, cancel = context.WithCancelCause(ctx)
			defer cancel(nil)
			stop := context.AfterFunc(g.stopping, func() { cancel(errShuttingDown) })
			defer stop()
			ss = &contextStream{ServerStream: ss, ctx: ctx}
		}
		// Every other call's context ends with its connection's (see
		// shutdownConns): nothing to set up per call.
		err := handler(srv, ss)
		if errors.Is(context.Cause(ctx), errShuttingDown) {
			return status.Error(codes.Unavailable, "apid is shutting down and this call outlived shutdownTimeout: retry it, another gateway will serve it")
		}
		return err
	}
}

// shutdownConns gives each client connection a context that ends when
// running calls must (hardStop), the parent of every call's context on
// it: calls then end on shutdown with one registration per connection
// rather than a context and a callback per call (2 % of a one-to-one
// call's CPU, on one lock every call shared).
type shutdownConns struct{ hardStop context.Context }

type connStopKey struct{}

func (s shutdownConns) TagConn(ctx context.Context, _ *stats.ConnTagInfo) context.Context {
	ctx, cancel := context.WithCancelCause(ctx)
	stop := context.AfterFunc(s.hardStop, func() { cancel(errShuttingDown) })
	return context.WithValue(ctx, connStopKey{}, func() { stop(); cancel(nil) })
}

func (s shutdownConns) HandleConn(ctx context.Context, st stats.ConnStats) {
	if _, ended := st.(*stats.ConnEnd); ended {
		if release, ok := ctx.Value(connStopKey{}).(func()); ok {
			release()
		}
	}
}

func (shutdownConns) TagRPC(ctx context.Context, _ *stats.RPCTagInfo) context.Context { return ctx }
func (shutdownConns) HandleRPC(context.Context, stats.RPCStats)                       {}

const (
	healthWatch = "/grpc.health.v1.Health/Watch"
	// methodIssueClient issues a client certificate (talosctl config new).
	methodIssueClient = "/machine.MachineService/GenerateClientConfiguration"
)

// contextStream is a server stream with a context of its own.
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *contextStream) Context() context.Context { return s.ctx }

// growStack grows a unary call's goroutine stack to what a proxied call
// needs while the stack is still shallow. gRPC starts each call on a new
// goroutine with a small stack, which the call then outgrew twice, deep
// in routing and in the node stream's set-up, where each copy walks every
// frame: 8 to 13 % of a one-to-one call's CPU; grown here, the copy is a
// few frames, once (the profile's share of stack growth halves). Streams
// keep the small start: a long-lived stream would hold the bigger stack
// for its whole life.
func (g *Gateway) growStack(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if g.router.Kind(info.FullMethod) == proxy.Unary {
		stackPad()
	}
	return handler(srv, ss)
}

// stackPadSink keeps stackPad's frame from being optimized away.
var stackPadSink atomic.Uint32

// stackPad has a frame of 20 KiB: calling it grows the stack to 32 KiB.
//
//go:noinline
func stackPad() {
	var pad [20 << 10]byte
	i := stackPadSink.Load() % uint32(len(pad))
	pad[i] = 1
	if pad[(i+1)%uint32(len(pad))] != 0 {
		stackPadSink.Add(1)
	}
}
