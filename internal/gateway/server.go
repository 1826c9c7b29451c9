package gateway

import (
	"fmt"
	"math"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/director"
	"github.com/apid/apid/limits"
	"github.com/apid/apid/proxy"
)

// newServer is the gRPC server every call passes through: the TLS the
// certificates section serves, wrapped by the limits' connection bounds;
// four interceptors, one concern each (observe, admit, lifecycle,
// authorize: a call admission refuses is never counted in flight); the proxy for every method apid does not serve itself.
func (g *Gateway) newServer(cfg Config) *grpc.Server {
	obs := &observer{metrics: g.metrics, nodes: g.nodes}
	opts := []grpc.ServerOption{grpc.StatsHandler(auditStats{}), grpc.StatsHandler(g.limits.Resets()), grpc.StatsHandler(shutdownConns{g.life.hardStop})}
	if g.tracing != nil {
		obs.tracer = g.tracing.tracer
		opts = append(opts, g.tracing.serverOption())
	}
	handler := proxy.NewHandler(g.routing, proxy.Options{
		MaxReplySize: cfg.MaxMessageSize, NodeBuffer: int(cfg.Limits.NodeBuffer), Observer: obs, Budget: g.limits.Memory(),
		ReplyKey: g.routing.ReplyKey,
	})
	srv := grpc.NewServer(append(append(opts, transportOptions(cfg)...),
		grpc.Creds(g.limits.Connections().Credentials(credentials.NewTLS(certs.ServerConfig(g.certs.src, cfg.TLS.ServerOptions())))),
		grpc.ForceServerCodecV2(proxy.Codec()),
		grpc.UnknownServiceHandler(handler.StreamHandler()),
		// Who the caller is and how the call ended is recorded first, so
		// that the call log and the metrics see every refusal; the
		// authorizer comes last, right before the proxy.
		grpc.ChainStreamInterceptor(g.observe, g.admit, g.lifecycleInterceptor, g.policy.StreamInterceptor()),
		// Unary calls reach only the services apid serves itself (health).
		grpc.ChainUnaryInterceptor(g.metrics.grpc.unaryInterceptor(g.label), g.admitUnary, g.policy.UnaryInterceptor()),
	)...)
	healthpb.RegisterHealthServer(srv, g.ready.grpc)
	g.health.Register(srv)
	g.registerReflection(srv)
	return srv
}

// transportOptions are the server transport's settings toward clients.
func transportOptions(cfg Config) []grpc.ServerOption {
	return []grpc.ServerOption{
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
		grpc.MaxHeaderListSize(headerListBound(cfg)),
		idleConnectionBuffers,
		// The most eager released client, talosctl v1.13's event
		// tracker, pings every 10 s; a server that counts pings a hair
		// early as strikes sends it GOAWAY (talos PR #14137). Half that
		// interval leaves room for jitter.
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			Time: time.Minute, Timeout: 20 * time.Second, MaxConnectionIdle: cfg.MaxConnectionIdle,
			MaxConnectionAge: connectionAge(cfg.MaxConnectionAge), MaxConnectionAgeGrace: connectionAge(cfg.MaxConnectionAgeGrace),
		}),
	}
}

// headerListBound is the header list a client may send, advertised in
// HTTP/2's SETTINGS so that the transport refuses a larger one before
// decoding it: what apid accepts of routing metadata (limits.MaxNodesBytes
// of node and nodes values, in up to maxNodes fields, as the official
// client sends one nodes field per node), of each forwarded key
// (limits.MaxForwardBytes), and room for the request's own headers. HTTP/2
// counts each field as its name, its value and 32 bytes. It is read at
// start: a reload that raises maxNodes past it needs a restart to accept
// lists that long.
func headerListBound(cfg Config) uint32 {
	const field = 32
	maxNodes := cfg.Routing.MaxNodes
	if maxNodes <= 0 {
		maxNodes = director.DefaultConfig().MaxNodes
	}
	forwarded := len(director.DefaultForwardKeys) + len(cfg.Routing.ForwardKeys)
	n := limits.MaxNodesBytes + maxNodes*(field+len(director.KeyNodes)) +
		forwarded*(limits.MaxForwardBytes+field) + requestHeaders
	return uint32(n)
}

// requestHeaders is room for what a gRPC request carries besides routing
// and forwarded metadata (pseudo-headers, content-type, te, user-agent,
// grpc-timeout, talos-role values, a client's own small keys).
const requestHeaders = 16 << 10

// connectionAge is d, or "never" for zero, in grpc-go's terms.
func connectionAge(d time.Duration) time.Duration {
	if d == 0 {
		return time.Duration(math.MaxInt64)
	}
	return d
}

// dialLocal connects to the local node agent (plaintext, on a unix socket
// or loopback).
func dialLocal(cfg Config, tr *tracing) (*grpc.ClientConn, error) {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// Idle mode has hung local backends (grpc-go #9191); the local
		// agent is one connection that is always wanted.
		grpc.WithIdleTimeout(0),
		// A restarted agent is used again within 15 s, not the up to 2
		// minutes of gRPC's default backoff.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: reconnectBackoff(), MinConnectTimeout: director.ConnectTimeout}),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(cfg.MaxMessageSize), grpc.MaxCallSendMsgSize(cfg.MaxMessageSize)),
		grpc.WithInitialWindowSize(int32(cfg.Limits.StreamWindow)), grpc.WithInitialConnWindowSize(int32(cfg.Limits.ConnectionWindow)),
	}
	if tr != nil {
		opts = append(opts, tr.dialOption())
	}
	cc, err := grpc.NewClient(cfg.Backend, opts...)
	if err != nil {
		return nil, fmt.Errorf("local backend %q: %w", cfg.Backend, err)
	}
	return cc, nil
}

// poolConfig is the node connections' configuration: the keys, and the
// dial options and forwarding credentials the gateway gives them.
func poolConfig(cfg Config, c *certificates, tr *tracing) director.PoolConfig {
	p := cfg.Nodes
	p.DialOptions = remoteDialOptions(cfg)
	if tr != nil {
		p.DialOptions = append(p.DialOptions, tr.dialOption())
	}
	p.Credentials = func(host string) credentials.TransportCredentials {
		return credentials.NewTLS(certs.ClientConfig(c.src, host))
	}
	return p
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
