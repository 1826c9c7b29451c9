package gateway

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/director"
	"github.com/apid/apid/limits"
	"github.com/apid/apid/proxy"
)

// NewLogger returns a text logger to w at level (debug, info, warn or
// error; anything else means info).
func NewLogger(w io.Writer, level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(level))
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: l}))
}

// Gateway is one apid: the TLS material, the connections to the local
// agent and to other nodes, and the gRPC server that proxies.
type Gateway struct {
	cfg     Config
	log     *slog.Logger
	src     *certs.Source
	local   *grpc.ClientConn
	pool    *director.Pool
	server  *grpc.Server
	metrics *metrics
	conns   *limits.Connections
	stop    context.CancelFunc
}

// New assembles a gateway from cfg, which it validates (every problem is
// reported at once). It opens no listener: Serve does. A nil log discards.
func New(cfg Config, log *slog.Logger) (*Gateway, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	policy, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	src, err := certs.NewSource(certs.Files{CA: cfg.CA, Cert: cfg.Cert, Key: cfg.Key})
	if err != nil {
		return nil, fmt.Errorf("load certificates: %w", err)
	}
	local, err := grpc.NewClient(cfg.Backend,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Idle mode has hung local backends (grpc-go #9191); the local
		// agent is one connection that is always wanted.
		grpc.WithIdleTimeout(0),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(cfg.MaxMessageSize), grpc.MaxCallSendMsgSize(cfg.MaxMessageSize)),
		grpc.WithInitialWindowSize(int32(cfg.Limits.StreamWindow)), grpc.WithInitialConnWindowSize(int32(cfg.Limits.ConnectionWindow)),
	)
	if err != nil {
		return nil, fmt.Errorf("local backend %q: %w", cfg.Backend, err)
	}
	pool := director.NewPool(director.PoolConfig{
		Port:        cfg.RemotePort,
		IdleTimeout: cfg.IdleTimeout,
		MaxConns:    cfg.MaxConnections,
		MaxDials:    cfg.MaxDials,
		DialOptions: remoteDialOptions(cfg),
		Credentials: func(host string) credentials.TransportCredentials {
			return credentials.NewTLS(certs.ClientConfig(src, host))
		},
	})
	authz := auth.NewAuthorizer(policy, log)
	router := director.NewRouter(director.Config{
		NodeTimeout:     cfg.NodeTimeout,
		SelfNames:       cfg.SelfNames,
		MaxNodes:        cfg.MaxNodes,
		ForwardKeys:     cfg.ForwardMetadata,
		ServerStreaming: cfg.ServerStreamingMethods,
		ClientStreaming: cfg.ClientStreamingMethods,
		BidiStreaming:   cfg.BidiStreamingMethods,
	}, local, pool)
	budget := limits.NewMemory(int64(cfg.Limits.BufferedBytes))
	conns := limits.NewConnections(cfg.Limits.Connections, cfg.Limits.ConnectionsPerIdentity, log)
	m := newMetrics(policy, pool, budget, conns)
	handler := proxy.NewHandler(router, proxy.Options{
		MaxReplySize: cfg.MaxMessageSize, NodeBuffer: int(cfg.Limits.NodeBuffer), Observer: m, Budget: budget,
	})

	server := grpc.NewServer(
		grpc.Creds(conns.Credentials(credentials.NewTLS(certs.ServerConfig(src, certs.ServerOptions{AllowTLS12: cfg.AllowTLS12})))),
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
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: time.Minute, Timeout: 20 * time.Second, MaxConnectionIdle: cfg.MaxConnectionIdle}),
		// Who the caller is comes first, so metrics and the call log can
		// name it; the authorizer comes last, right before the proxy.
		grpc.ChainStreamInterceptor(auth.IdentityInterceptor(), m.interceptor(), callLogger(log), authz.StreamInterceptor()),
	)

	ctx, stop := context.WithCancel(context.Background())
	gw := &Gateway{cfg: cfg, log: log, src: src, local: local, pool: pool, server: server, metrics: m, conns: conns, stop: stop}
	go src.Watch(ctx, cfg.ReloadInterval, gw.certificatesChanged, func(err error) {
		log.Warn("certificate reload failed; keeping the current ones", "err", err)
	})
	return gw, nil
}

// remoteDialOptions are the options of connections to other nodes' apid.
func remoteDialOptions(cfg Config) []grpc.DialOption {
	bo := backoff.DefaultConfig
	// A rebooted node should be back within seconds, not the 2 minutes of
	// gRPC's default cap.
	bo.MaxDelay = 15 * time.Second
	return []grpc.DialOption{
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: 20 * time.Second}),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 30 * time.Second, Timeout: 10 * time.Second, PermitWithoutStream: true}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(cfg.MaxMessageSize), grpc.MaxCallSendMsgSize(cfg.MaxMessageSize)),
		grpc.WithInitialWindowSize(int32(cfg.Limits.StreamWindow)), grpc.WithInitialConnWindowSize(int32(cfg.Limits.ConnectionWindow)),
		// The pool closes idle connections itself.
		grpc.WithIdleTimeout(0),
	}
}

// Reload re-reads the certificate files now (as on SIGHUP).
func (g *Gateway) Reload() {
	changed, err := g.src.Reload()
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
}

// Serve serves lis (and the metrics listener, if configured) until ctx
// ends, then stops gracefully (running calls get a few seconds to finish).
func (g *Gateway) Serve(ctx context.Context, lis net.Listener) error {
	if g.cfg.MetricsListen != "" {
		go func() {
			if err := g.metrics.serve(ctx, g.cfg.MetricsListen, g.log); err != nil {
				g.log.Error("metrics listener failed", "err", err)
			}
		}()
	}
	done := make(chan error, 1)
	go func() { done <- g.server.Serve(g.conns.Listener(lis)) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() {
		g.server.GracefulStop()
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(5 * time.Second):
		g.server.Stop()
	}
	<-done
	return nil
}

// Close releases everything but the server, which Serve stops.
func (g *Gateway) Close() {
	g.stop()
	g.server.Stop()
	_ = g.pool.Close()
	_ = g.local.Close()
}

// callLogger logs each call with stable keys; metadata values are never
// logged (they may carry tokens).
func callLogger(log *slog.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		start := time.Now()
		err := handler(srv, ss)
		level := slog.LevelDebug
		if err != nil {
			level = slog.LevelInfo
		}
		if log.Enabled(ss.Context(), level) {
			caller, _ := auth.IdentityFrom(ss.Context())
			log.Log(ss.Context(), level, "call", "method", info.FullMethod, "peer", caller.Subject,
				"code", status.Code(err).String(), "duration", time.Since(start))
		}
		return err
	}
}
