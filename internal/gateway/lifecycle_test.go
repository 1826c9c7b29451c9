package gateway

import (
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/stats"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testkit"
)

// TestHealthAndReadiness: the gRPC health service answers any
// authenticated caller, roles or not, and /readyz follows the local agent.
func TestHealthAndReadiness(t *testing.T) {
	tg := startGateway(t, nil)
	if body := tg.waitReady(200); body != "ready" {
		t.Fatalf("/readyz body %q", body)
	}
	if code, body := tg.get("/healthz"); code != 200 || body != "ok" {
		t.Fatalf("/healthz: %d %q", code, body)
	}
	if code, body := tg.get("/metrics"); code != 200 || !strings.Contains(body, "apid_calls_in_flight") {
		t.Fatalf("/metrics: %d, %d bytes", code, len(body))
	}

	ctx := testkit.Context(t)
	// A role no policy knows grants nothing.
	noRoles := healthpb.NewHealthClient(tg.client("probe", "team:probes"))
	for _, svc := range []string{"", "machine.MachineService"} {
		resp, err := noRoles.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || resp.Status != healthpb.HealthCheckResponse_SERVING {
			t.Fatalf("health of %q for a caller without roles: %v, %v", svc, resp, err)
		}
	}
	if _, err := noRoles.Check(ctx, &healthpb.HealthCheckRequest{Service: "no.Such"}); status.Code(err) != codes.NotFound {
		t.Fatalf("health of an unknown service: %v, want NotFound", err)
	}
	// The policy still holds for everything else.
	if _, err := machine.NewMachineServiceClient(tg.client("probe2", "team:probes")).Version(ctx, &emptypb.Empty{}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Version without roles: %v, want PermissionDenied", err)
	}
	watch, err := noRoles.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := watch.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v, %v", m, err)
	}

	// The local agent goes away: not ready, with the reason, and health
	// says so to watchers.
	tg.agentSrv.Stop()
	body := tg.waitReady(503)
	if !strings.HasPrefix(body, "local backend unix://") {
		t.Fatalf("/readyz reason %q, want the local backend named", body)
	}
	if m, err := watch.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("watch after the agent stopped: %v, %v", m, err)
	}
	if code, _ := tg.get("/healthz"); code != 200 {
		t.Fatalf("/healthz %d while the agent is down: the process is alive", code)
	}
}

// TestDrain: readiness fails at once, calls are accepted for drainDelay,
// then no connection is accepted and a stream that outlives
// shutdownTimeout ends with UNAVAILABLE saying why.
func TestDrain(t *testing.T) {
	// The drain delay leaves a loaded machine time for the new connection
	// and call below.
	const drainDelay, shutdownTimeout = 2 * time.Second, 800 * time.Millisecond
	tg := startGateway(t, func(c *Config) { c.DrainDelay, c.ShutdownTimeout = drainDelay, shutdownTimeout })
	tg.waitReady(200)
	ctx := testkit.Context(t)
	cc := tg.client("admin", certs.RoleAdmin)
	mc := machine.NewMachineServiceClient(cc)
	logs, err := mc.Logs(ctx, &machine.LogsRequest{Id: "agent", Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := logs.Header(); err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	tg.cancel()
	// Readiness fails at once (well within the drain delay).
	tg.waitReady(503)
	if d := time.Since(start); d > drainDelay {
		t.Fatalf("/readyz failed %s after the stop, after the drain delay", d)
	}
	if resp, err := healthpb.NewHealthClient(cc).Check(ctx, &healthpb.HealthCheckRequest{}); err != nil || resp.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("health while draining: %v, %v", resp, err)
	}
	// Still accepting: a new connection's call succeeds.
	if _, err := machine.NewMachineServiceClient(tg.client("late", certs.RoleAdmin)).Version(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("a call during the drain delay: %v", err)
	}

	// The stream outlives the shutdown timeout and is ended for it.
	for {
		_, err = logs.Recv()
		if err != nil {
			break
		}
	}
	elapsed := time.Since(start)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "shutting down") {
		t.Fatalf("stream ended with %v, want UNAVAILABLE saying apid is shutting down", err)
	}
	if elapsed < drainDelay+shutdownTimeout {
		t.Fatalf("stream ended %s after the stop, before drainDelay+shutdownTimeout", elapsed)
	}
	if err := <-tg.served; err != nil {
		t.Fatal(err)
	}
	t.Logf("stream ended %s after the stop (drainDelay %s + shutdownTimeout %s)", elapsed.Round(time.Millisecond), drainDelay, shutdownTimeout)
	// Stopped: no new connection is served.
	if _, err := machine.NewMachineServiceClient(tg.client("after", certs.RoleAdmin)).Version(ctx, &emptypb.Empty{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("a call after the stop: %v, want Unavailable", err)
	}
}

// TestDrainEndsWhenCallsDo: with no call running but a health watch, the
// stop takes the drain delay and no more: the watch hears NOT_SERVING and
// ends when apid stops accepting. StopNow cuts even the delay short.
func TestDrainEndsWhenCallsDo(t *testing.T) {
	tg := startGateway(t, func(c *Config) { c.DrainDelay, c.ShutdownTimeout = 300*time.Millisecond, time.Minute })
	// Ready first: the local agent connects just after Serve starts, and a
	// watch opened before then begins with NOT_SERVING.
	tg.waitReady(200)
	ctx := testkit.Context(t)
	watch, err := healthpb.NewHealthClient(tg.client("probe", "team:probes")).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if m, err := watch.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("watch: %v, %v", m, err)
	}
	start := time.Now()
	tg.cancel()
	if m, err := watch.Recv(); err != nil || m.Status != healthpb.HealthCheckResponse_NOT_SERVING {
		t.Fatalf("watch while draining: %v, %v", m, err)
	}
	if err := <-tg.served; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("the stop took %s with a health watch open: it waited for the watch", d)
	}
	if _, err := watch.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("watch after the stop: %v, want Unavailable", err)
	}

	tg = startGateway(t, func(c *Config) { c.DrainDelay, c.ShutdownTimeout = time.Hour, time.Hour })
	start = time.Now()
	tg.cancel()
	tg.waitReady(503)
	tg.gw.StopNow()
	if err := <-tg.served; err != nil {
		t.Fatal(err)
	}
	if d := time.Since(start); d > 20*time.Second {
		t.Fatalf("StopNow took %s", d)
	}
}

// TestHealthExemptionIsExact: only the health service's own methods skip
// the policy; another method under its name goes to the policy like any.
func TestHealthExemptionIsExact(t *testing.T) {
	// Were the call routed, it would go to loopback nodes on a closed port,
	// never off the machine.
	tg := startGateway(t, func(c *Config) { c.Nodes.Port = closedPort(t) })
	cc := tg.client("nobody", "team:none")
	ctx := metadata.AppendToOutgoingContext(testkit.Context(t), "nodes", "127.0.0.1,127.0.0.9")
	err := cc.Invoke(ctx, "/grpc.health.v1.Health/Nope", &emptypb.Empty{}, &emptypb.Empty{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a made-up method under the health service, fanned out by a caller without roles: %v, want PermissionDenied", err)
	}
}

// TestReloadAppliesLiveKeys: policy and call limits change for new calls;
// an invalid configuration and a change of address are not applied.
func TestReloadAppliesLiveKeys(t *testing.T) {
	tg := startGateway(t, nil)
	ctx := testkit.Context(t)
	reader := machine.NewMachineServiceClient(tg.client("reader", certs.RoleReader))
	if _, err := reader.Version(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("reader Version before the reload: %v", err)
	}

	bad := tg.cfg
	bad.LogLevel = "loud"
	bad.Limits.CallBurstPerIdentity = 0
	err := tg.gw.Reload(bad)
	if err == nil || !strings.Contains(err.Error(), "logLevel") || !strings.Contains(err.Error(), "callBurstPerIdentity") {
		t.Fatalf("invalid reload: %v, want both problems named", err)
	}
	if _, err := reader.Version(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("after a refused reload: %v", err)
	}

	next := tg.cfg
	next.Listen = "127.0.0.1:1"
	next.Policy.Rules = []auth.Rule{{Method: "/machine.MachineService/Version", Roles: []string{certs.RoleOperator}}}
	next.Limits.CallsPerSecondPerIdentity, next.Limits.CallBurstPerIdentity = 0.001, 1
	if err := tg.gw.Reload(next); err != nil {
		t.Fatal(err)
	}
	if got := tg.gw.Config().Listen; got != tg.cfg.Listen {
		t.Fatalf("listen changed live to %q: it needs a restart", got)
	}
	_, err = reader.Version(ctx, &emptypb.Empty{})
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("reader Version after the policy made it operator-only: %v", err)
	}
	op := machine.NewMachineServiceClient(tg.client("operator", certs.RoleOperator))
	if _, err := op.Version(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("operator's first call: %v", err)
	}
	_, err = op.Version(ctx, &emptypb.Empty{})
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "limits.callsPerSecondPerIdentity") {
		t.Fatalf("operator's second call over a burst of 1: %v", err)
	}
}

// TestConcurrentCallsPerIdentity: a caller with a stream open cannot open
// a second over a limit of 1; another caller can, and the first can again
// once its stream ends.
func TestConcurrentCallsPerIdentity(t *testing.T) {
	tg := startGateway(t, func(c *Config) { c.Limits.ConcurrentCallsPerIdentity = 1 })
	ctx := testkit.Context(t)
	alice := machine.NewMachineServiceClient(tg.client("alice", certs.RoleAdmin))
	sctx, stop := context.WithCancel(ctx)
	logs, err := alice.Logs(sctx, &machine.LogsRequest{Id: "agent", Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := logs.Header(); err != nil {
		t.Fatal(err)
	}
	if _, err := alice.Version(ctx, &emptypb.Empty{}); status.Code(err) != codes.ResourceExhausted ||
		!strings.Contains(err.Error(), "limits.concurrentCallsPerIdentity") {
		t.Fatalf("second call in flight: %v", err)
	}
	if _, err := machine.NewMachineServiceClient(tg.client("bob", certs.RoleAdmin)).Version(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("another identity: %v", err)
	}
	stop()
	for err == nil {
		_, err = logs.Recv()
	}
	if !errors.Is(err, io.EOF) && status.Code(err) != codes.Canceled {
		t.Fatalf("cancelled stream: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, err := alice.Version(ctx, &emptypb.Empty{})
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("alice still refused 10 s after her stream ended: %v", err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestStreamsPerIdentityPerNode: one identity's streams to a node are
// bounded apart from its short calls and from other identities.
func TestStreamsPerIdentityPerNode(t *testing.T) {
	tg := startGateway(t, func(c *Config) { c.Limits.StreamsPerIdentityPerNode = 1 })
	ctx := testkit.Context(t)
	reader := machine.NewMachineServiceClient(tg.client("reader", certs.RoleReader))
	for _, md := range []metadata.MD{{}, metadata.Pairs("node", "127.0.0.1")} {
		sctx, stop := context.WithCancel(metadata.NewOutgoingContext(ctx, md))
		logs, err := reader.Logs(sctx, &machine.LogsRequest{Id: "agent", Follow: true})
		if err == nil {
			_, err = logs.Header()
		}
		if err != nil {
			t.Fatal(err)
		}
		second, err := reader.Logs(sctx, &machine.LogsRequest{Id: "agent", Follow: true})
		if err == nil {
			_, err = second.Recv()
		}
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "limits.streamsPerIdentityPerNode") {
			t.Errorf("%v: a second stream: %v", md, err)
		}
		if _, err := reader.Version(metadata.NewOutgoingContext(ctx, md), &emptypb.Empty{}); err != nil {
			t.Errorf("%v: a short call beside the stream: %v", md, err)
		}
		other, err := machine.NewMachineServiceClient(tg.client("other", certs.RoleReader)).Logs(metadata.NewOutgoingContext(sctx, md), &machine.LogsRequest{Id: "agent", Follow: true})
		if err == nil {
			_, err = other.Header()
		}
		if err != nil {
			t.Errorf("%v: another identity's stream: %v", md, err)
		}
		stop()
	}
}

// TestClientCertificatesPerHour: one subject may ask for so many client
// certificates an hour, so that minting fresh subjects cannot shed its
// limits.
func TestClientCertificatesPerHour(t *testing.T) {
	tg := startGateway(t, func(c *Config) { c.Limits.ClientCertificatesPerHour = 2 })
	ctx := testkit.Context(t)
	admin := machine.NewMachineServiceClient(tg.client("admin", certs.RoleAdmin))
	req := &machine.GenerateClientConfigurationRequest{Roles: []string{certs.RoleReader}}
	for i := range 2 {
		// This agent holds no CA: it refuses, after the gateway counted.
		if _, err := admin.GenerateClientConfiguration(ctx, req); status.Code(err) == codes.ResourceExhausted {
			t.Fatalf("request %d: %v", i+1, err)
		}
	}
	if _, err := admin.GenerateClientConfiguration(ctx, req); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "limits.clientCertificatesPerHour") {
		t.Fatalf("a third within the hour: %v", err)
	}
	if _, err := machine.NewMachineServiceClient(tg.client("other", certs.RoleAdmin)).GenerateClientConfiguration(ctx, req); status.Code(err) == codes.ResourceExhausted {
		t.Fatalf("another subject: %v", err)
	}
	if _, err := admin.Version(ctx, &emptypb.Empty{}); err != nil {
		t.Fatalf("other calls of the same subject: %v", err)
	}
}

// TestShutdownConnsEndCallsWithTheirConnection: a connection's context ends
// with errShuttingDown at the hard stop, and once the connection has ended
// it is released from the hard stop (no registration per connection left).
func TestShutdownConnsEndCallsWithTheirConnection(t *testing.T) {
	hardStop, stopAll := context.WithCancelCause(context.Background())
	sc := shutdownConns{hardStop: hardStop}
	open := sc.TagConn(context.Background(), &stats.ConnTagInfo{})
	ended := sc.TagConn(context.Background(), &stats.ConnTagInfo{})
	sc.HandleConn(ended, &stats.ConnEnd{})
	if ended.Err() == nil || errors.Is(context.Cause(ended), errShuttingDown) {
		t.Fatalf("an ended connection: %v, cause %v", ended.Err(), context.Cause(ended))
	}
	if open.Err() != nil {
		t.Fatal("an open connection ended before the hard stop")
	}
	stopAll(errShuttingDown)
	<-open.Done()
	if !errors.Is(context.Cause(open), errShuttingDown) {
		t.Fatalf("cause at the hard stop: %v", context.Cause(open))
	}
}
