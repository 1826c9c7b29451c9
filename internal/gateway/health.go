package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus/promhttp"
	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/apid/apid/certs"
)

// readiness is whether this apid should be sent calls: it listens, its
// certificate is valid, the local node agent answers and it is not
// draining. It drives the grpc.health.v1 service on the main port and
// /readyz on the admin listener.
type readiness struct {
	grpc     *health.Server
	src      *certs.Source
	backend  string
	services []string

	mu        sync.Mutex
	listening bool
	draining  bool
	state     connectivity.State // of the connection to the local agent
	serving   bool               // what the health service says now
	published bool               // whether it has said anything yet
}

func newReadiness(src *certs.Source, backend string, services []string) *readiness {
	r := &readiness{grpc: health.NewServer(), src: src, backend: backend, services: services, state: connectivity.Idle}
	r.publish()
	return r
}

// reason is why apid is not ready, or "" when it is.
func (r *readiness) reason() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.reasonLocked(time.Now())
}

func (r *readiness) reasonLocked(now time.Time) string {
	switch {
	case r.draining:
		return "draining: apid is shutting down"
	case !r.listening:
		return "not listening yet"
	case r.state != connectivity.Ready:
		return fmt.Sprintf("local backend %s is %s", r.backend, r.state)
	}
	if leaf := r.src.Certificate().Leaf; leaf != nil && now.After(leaf.NotAfter) {
		return fmt.Sprintf("certificate %s expired at %s", r.src.Files().Cert, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	return ""
}

// publish sets the health service to what reason says, for the whole
// server ("") and each service.
func (r *readiness) publish() {
	r.mu.Lock()
	defer r.mu.Unlock()
	serving := r.reasonLocked(time.Now()) == ""
	if r.published && serving == r.serving {
		return
	}
	r.published, r.serving = true, serving
	st := healthpb.HealthCheckResponse_NOT_SERVING
	if serving {
		st = healthpb.HealthCheckResponse_SERVING
	}
	for _, svc := range append([]string{""}, r.services...) {
		r.grpc.SetServingStatus(svc, st)
	}
}

func (r *readiness) setListening() {
	r.mu.Lock()
	r.listening = true
	r.mu.Unlock()
	r.publish()
}

// setServices changes the services the health service reports.
func (r *readiness) setServices(services []string) {
	r.mu.Lock()
	r.services = services
	r.published = false
	r.mu.Unlock()
	r.publish()
}

// recheck publishes again every interval until ctx ends, so that a
// certificate that expires turns gRPC health NOT_SERVING as it turns
// /readyz 503.
func (r *readiness) recheck(ctx context.Context, interval time.Duration) {
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			r.publish()
		}
	}
}

// drain turns readiness off for good: health answers NOT_SERVING from now
// on, whatever else changes.
func (r *readiness) drain() {
	r.mu.Lock()
	r.draining = true
	r.mu.Unlock()
	r.grpc.Shutdown()
}

// watchBackend follows the state of the connection to the local agent
// until ctx ends, asking it to reconnect whenever it falls idle.
func (r *readiness) watchBackend(ctx context.Context, cc *grpc.ClientConn) {
	cc.Connect()
	for {
		s := cc.GetState()
		r.mu.Lock()
		r.state = s
		r.mu.Unlock()
		r.publish()
		if s == connectivity.Idle {
			cc.Connect()
		}
		if !cc.WaitForStateChange(ctx, s) {
			return
		}
	}
}

// admin serves /healthz, /readyz, /nodes and /metrics on lis until ctx
// ends.
// adminConnections bounds the admin endpoint's open connections; a probe
// or a scraper needs one or two.
const adminConnections = 64

func (g *Gateway) admin(ctx context.Context, lis net.Listener) error {
	r := g.ready
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintln(w, "ok")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
		if why := r.reason(); why != "" {
			w.WriteHeader(http.StatusServiceUnavailable)
			fmt.Fprintln(w, why)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("GET /nodes", g.serveNodes)
	mux.Handle("GET /metrics", promhttp.HandlerFor(g.metrics.registry, promhttp.HandlerOpts{}))
	// A small, bounded server: a connection cap, and timeouts for every
	// phase, so that idle or slow clients cannot hold the process's file
	// descriptors or the pages' memory.
	srv := &http.Server{Handler: g.checkHost(mux), ReadHeaderTimeout: 5 * time.Second, ReadTimeout: 10 * time.Second,
		WriteTimeout: 30 * time.Second, IdleTimeout: 30 * time.Second, MaxHeaderBytes: 16 << 10,
		ConnState: func(_ net.Conn, state http.ConnState) {
			switch state {
			case http.StateNew:
				g.adminOpen.Add(1)
			case http.StateClosed, http.StateHijacked:
				g.adminOpen.Add(-1)
			}
		}}
	lis = netutil.LimitListener(lis, adminConnections)
	stop := context.AfterFunc(ctx, func() { _ = srv.Close() })
	defer stop()
	g.log.Info("admin endpoint serving /healthz, /readyz, /nodes and /metrics", "listen", lis.Addr().String())
	if err := srv.Serve(lis); err != nil && !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// checkHost answers only requests whose Host is empty (HAProxy's check
// sends none), an IP address, localhost, or one of adminHosts: a browser
// page of another origin that rebinds its name to this address sends its
// own name, and is refused. The list is read per request, so a reload
// applies it.
func (g *Gateway) checkHost(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hostAllowed(r.Host, g.Config().AdminHosts) {
			next.ServeHTTP(w, r)
			return
		}
		g.metrics.adminRefused.Inc()
		if now := time.Now().UnixNano(); now-g.adminLogged.Load() > int64(time.Second) {
			g.adminLogged.Store(now)
			g.log.Warn("admin endpoint: request for a host it does not answer to refused (adminHosts)", "host", r.Host, "remote", r.RemoteAddr)
		}
		http.Error(w, fmt.Sprintf("this admin endpoint does not answer to host %q: add it to adminHosts, or use an IP address", r.Host), http.StatusMisdirectedRequest)
	})
}

func hostAllowed(host string, allowed []string) bool {
	if host == "" {
		return true
	}
	h := host
	if name, _, err := net.SplitHostPort(host); err == nil {
		h = name
	}
	h = strings.ToLower(strings.TrimSuffix(strings.Trim(h, "[]"), "."))
	if _, err := netip.ParseAddr(h); err == nil || h == "localhost" || strings.HasSuffix(h, ".localhost") {
		return true
	}
	for _, a := range allowed {
		if strings.EqualFold(strings.TrimSuffix(a, "."), h) {
			return true
		}
	}
	return false
}
