package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/proxy"
)

// errShuttingDown ends the calls still running when shutdownTimeout is up.
var errShuttingDown = errors.New("apid is shutting down")

// shutdownTracing bounds how long Close waits for the last spans to go.
const shutdownTracing = 5 * time.Second

// lifecycle is the gateway's life: serving, draining, stopping, and the
// calls in flight meanwhile.
type lifecycle struct {
	inFlight atomic.Int64
	serving  chan struct{}      // closed once Serve accepts
	hardStop context.Context    // done when running calls must end
	endCalls context.CancelFunc // ends them
	stopping context.Context    // done once apid stops accepting
	goAway   context.CancelFunc // ends it
	now      chan struct{}      // closed by StopNow
	nowOnce  sync.Once
	watchers context.Context    // the background watchers' context
	stop     context.CancelFunc // ends the watchers
	running  sync.WaitGroup     // the watchers
}

func newLifecycle() *lifecycle {
	l := &lifecycle{serving: make(chan struct{}), now: make(chan struct{})}
	hardStop, endCalls := context.WithCancelCause(context.Background())
	l.hardStop, l.endCalls = hardStop, func() { endCalls(errShuttingDown) }
	l.stopping, l.goAway = context.WithCancel(context.Background())
	l.watchers, l.stop = context.WithCancel(context.Background())
	return l
}

// watchBackend follows the local agent's connection and rechecks
// readiness (the certificate's expiry) until Close.
func (l *lifecycle) watchBackend(r *readiness, local *grpc.ClientConn) {
	l.running.Go(func() { r.watchBackend(l.watchers, local) })
	l.running.Go(func() { r.recheck(l.watchers, 10*time.Second) })
}

// close ends the watchers and every call at once.
func (l *lifecycle) close() {
	l.stop()
	l.goAway()
	l.endCalls()
	l.running.Wait()
}

// Serving is closed once Serve accepts connections.
func (g *Gateway) Serving() <-chan struct{} { return g.life.serving }

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
	go func() { done <- g.server.Serve(g.limits.Connections().Listener(proxyProtocol(lis, cfg))) }()
	g.ready.setListening()
	close(g.life.serving)
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
	// Held calls would die with this gateway's connections: they are
	// refused now, telling their callers to retry through another.
	g.budget.Drain()
	g.log.Info("draining: readiness is NOT_SERVING; still accepting calls", "drain_delay", cfg.DrainDelay, "calls_in_flight", g.life.inFlight.Load())
	delay := time.NewTimer(cfg.DrainDelay)
	select {
	case <-delay.C:
	case <-g.life.now:
		delay.Stop()
	}

	g.log.Info("no longer accepting: sent GOAWAY; waiting for running calls", "calls_in_flight", g.life.inFlight.Load(), "shutdown_timeout", cfg.ShutdownTimeout)
	g.life.goAway() // health watchers have heard NOT_SERVING: their streams end now
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
	case <-g.life.now:
	}
	g.log.Warn("shutdown timeout: ending the calls still running with UNAVAILABLE", "calls_in_flight", g.life.inFlight.Load())
	g.life.endCalls()
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
func (g *Gateway) StopNow() { g.life.nowOnce.Do(func() { close(g.life.now) }) }

// lifecycleInterceptor is a call's life on this gateway: counted in
// flight, and ended with UNAVAILABLE when shutdownTimeout is up. A unary
// call's stack is grown first (see stackPad).
func (g *Gateway) lifecycleInterceptor(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if g.routing.Kind(info.FullMethod) == proxy.Unary {
		stackPad()
	}
	g.life.inFlight.Add(1)
	defer g.life.inFlight.Add(-1)
	ctx := ss.Context()
	if info.FullMethod == healthWatch {
		// A health watch would otherwise hold the stop for the whole
		// shutdownTimeout; it has been told NOT_SERVING already.
		var cancel context.CancelCauseFunc
		ctx, cancel = context.WithCancelCause(ctx)
		defer cancel(nil)
		stop := context.AfterFunc(g.life.stopping, func() { cancel(errShuttingDown) })
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

const healthWatch = "/grpc.health.v1.Health/Watch"

// contextStream is a server stream with a context of its own.
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *contextStream) Context() context.Context { return s.ctx }

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
