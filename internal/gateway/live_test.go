package gateway

import (
	"context"
	"io"
	"net"
	"net/http"
	"reflect"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/cluster"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/disruption"
	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/inventory"
)

// liveGateway is a gateway in this process in front of a test backend as
// its local agent, for changing its configuration while it runs.
type liveGateway struct {
	*testGateway
	base    Config
	backend *testbackend.Server
}

func startLive(t testing.TB) *liveGateway {
	t.Helper()
	backend := testbackend.Start(t, "node-1", testbackend.Behaviour{})
	lg := startLiveWith(t, backend.Addr, nil)
	lg.backend = backend
	return lg
}

// startLiveWith starts a gateway whose local agent is at backend, its
// configuration changed by edit.
func startLiveWith(t testing.TB, backend string, edit func(*Config)) *liveGateway {
	t.Helper()
	tg := serveGateway(t, t.TempDir(), backend, edit)
	t.Cleanup(tg.gw.StopNow) // a drain waits for nothing in these tests
	return &liveGateway{testGateway: tg, base: tg.cfg}
}

// reload applies the base configuration changed by edit.
func (lg *liveGateway) reload(edit func(*Config)) {
	lg.t.Helper()
	next := lg.base
	next.Limits = lg.base.Limits
	next.Routing.SelfNames = slices.Clone(lg.base.Routing.SelfNames)
	if edit != nil {
		edit(&next)
	}
	if err := lg.gw.Reload(next); err != nil {
		lg.t.Fatalf("reload: %v", err)
	}
}

// client connects with a new certificate for cn carrying roles.
func (lg *liveGateway) client(cn string, roles ...string) machine.MachineServiceClient {
	return machine.NewMachineServiceClient(lg.conn(cn, roles...))
}

// conn connects with a new certificate for cn carrying roles.
func (lg *liveGateway) conn(cn string, roles ...string) *grpc.ClientConn {
	lg.t.Helper()
	return lg.testGateway.client(cn, roles...)
}

// metrics reads /metrics.
func (lg *liveGateway) metrics() string {
	lg.t.Helper()
	resp, err := http.Get("http://" + lg.gw.AdminAddr().String() + "/metrics")
	if err != nil {
		lg.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}

// metric reads one series' value from /metrics (0 when absent).
func (lg *liveGateway) metric(series string) float64 {
	lg.t.Helper()
	for line := range strings.Lines(lg.metrics()) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	return 0
}

func refused(limit string) string { return `apid_limit_refusals_total{limit="` + limit + `"}` }

// rise waits (bounded) until series counts more than before.
func (lg *liveGateway) rise(series string, before float64) {
	lg.t.Helper()
	if !testkit.Eventually(5*time.Second, func() bool { return lg.metric(series) > before }) {
		lg.t.Errorf("%s stayed at %g", series, before)
	}
}

// rawConns opens n TCP connections from source (a loopback address of
// the check's own, so that its per-source buckets are no one else's) that
// never start their handshake.
func (lg *liveGateway) rawConns(source string, n int) {
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(source)}}
	for range n {
		c, err := d.Dial("tcp", lg.addr)
		if err != nil {
			lg.t.Fatal(err)
		}
		lg.t.Cleanup(func() { c.Close() })
	}
}

func callVersion(ctx context.Context, c machine.MachineServiceClient, md ...string) error {
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(ctx, md...), 10*time.Second)
	defer cancel()
	_, err := c.Version(ctx, &emptypb.Empty{})
	return err
}

func wantRefusal(t *testing.T, err error, code codes.Code, text string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(err.Error(), text) {
		t.Errorf("got %v, want %s naming %q", err, code, text)
	}
}

// TestEveryLiveKeyApplies changes each key tagged reload:"live" in a running
// gateway, through Reload, and observes the change take effect: a bound
// refusing at its new value (counted), a log level emitting, a node set or
// a route changing, and for a duration the section's applied value. A live
// key with no check here fails the test: a new live key needs one.
func TestEveryLiveKeyApplies(t *testing.T) {
	lg := startLive(t)
	ctx := context.Background()
	checks := map[string]func(t *testing.T){
		"limits.bufferedBytes": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Limits.BufferedBytes = 2 << 20 })
			if v := lg.metric("apid_buffered_bytes_limit"); v != 2<<20 {
				t.Errorf("apid_buffered_bytes_limit %g, want %d", v, 2<<20)
			}
		},
		"limits.connections": func(t *testing.T) {
			before := lg.metric(refused("connections"))
			if err := callVersion(ctx, lg.client("conn-1", certs.RoleReader)); err != nil { // one connection open
				t.Fatal(err)
			}
			lg.reload(func(c *Config) { c.Limits.Connections = 1 })
			if err := callVersion(ctx, lg.client("conn-2", certs.RoleReader)); err == nil {
				t.Error("a call on a connection over limits.connections went through")
			}
			lg.rise(refused("connections"), before)
		},
		"limits.connectionsPerIdentity": func(t *testing.T) {
			before := lg.metric(refused("connectionsPerIdentity"))
			lg.reload(func(c *Config) { c.Limits.ConnectionsPerIdentity = 1 })
			if err := callVersion(ctx, lg.client("twice", certs.RoleReader)); err != nil {
				t.Fatal(err)
			}
			if err := callVersion(ctx, lg.client("twice", certs.RoleReader)); err == nil {
				t.Error("a second connection of one identity went through")
			}
			lg.rise(refused("connectionsPerIdentity"), before)
		},
		"limits.handshakes": func(t *testing.T) {
			before := lg.metric(refused("handshakes"))
			lg.reload(func(c *Config) { c.Limits.Handshakes = 1 })
			lg.rawConns("127.0.0.2", 3)
			lg.rise(refused("handshakes"), before)
		},
		"limits.handshakesPerSource": func(t *testing.T) {
			before := lg.metric(refused("perSource"))
			lg.reload(func(c *Config) { c.Limits.HandshakesPerSource = 1 })
			lg.rawConns("127.0.0.3", 3)
			lg.rise(refused("perSource"), before)
		},
		"limits.connectionsPerSourcePerSecond": func(t *testing.T) {
			before := lg.metric(refused("perSource"))
			lg.reload(func(c *Config) { c.Limits.ConnectionsPerSourcePerSecond = 0.01 }) // bursts of 1
			lg.rawConns("127.0.0.4", 3)
			lg.rise(refused("perSource"), before)
		},
		"limits.concurrentCallsPerIdentity": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Limits.ConcurrentCallsPerIdentity = 1 })
			cc := lg.conn("busy", certs.RoleReader)
			wctx, cancel := context.WithCancel(ctx)
			defer cancel()
			w, err := healthpb.NewHealthClient(cc).Watch(wctx, &healthpb.HealthCheckRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.Recv(); err != nil { // the watch runs: one call in flight
				t.Fatal(err)
			}
			wantRefusal(t, callVersion(ctx, machine.NewMachineServiceClient(cc)), codes.ResourceExhausted, "limits.concurrentCallsPerIdentity")
		},
		// The rate and the burst are one token bucket: the refusal names
		// both as applied.
		"limits.callsPerSecondPerIdentity": rateCheck(lg),
		"limits.callBurstPerIdentity":      rateCheck(lg),
		"limits.callsPerIdentityPerNode": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Limits.CallsPerIdentityPerNode = 1 })
			lg.backend.Set(testbackend.Behaviour{Hang: true})
			defer lg.backend.Set(testbackend.Behaviour{})
			c := lg.client("share", certs.RoleReader)
			hctx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)
			go func() { done <- callVersion(hctx, c) }()
			if !testkit.Eventually(5*time.Second, func() bool { return lg.backend.Active() == 1 }) {
				t.Fatal("the first call did not reach the node")
			}
			wantRefusal(t, callVersion(ctx, c), codes.ResourceExhausted, "limits.callsPerIdentityPerNode")
			cancel()
			<-done
		},
		"limits.streamsPerIdentityPerNode": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Limits.StreamsPerIdentityPerNode = 1 })
			lg.backend.Set(testbackend.Behaviour{Stuck: true})
			defer lg.backend.Set(testbackend.Behaviour{})
			c := lg.client("streams", certs.RoleReader)
			sctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := c.Dmesg(sctx, &machine.DmesgRequest{})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := s.Recv(); err != nil {
				t.Fatal(err)
			}
			s2, err := c.Dmesg(ctx, &machine.DmesgRequest{})
			if err == nil {
				_, err = s2.Recv()
			}
			wantRefusal(t, err, codes.ResourceExhausted, "limits.streamsPerIdentityPerNode")
		},
		"limits.clientCertificatesPerHour": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Limits.ClientCertificatesPerHour = 1 })
			c := lg.client("issuer", certs.RoleAdmin)
			_, err := c.GenerateClientConfiguration(ctx, &machine.GenerateClientConfigurationRequest{})
			if status.Code(err) == codes.ResourceExhausted {
				t.Fatalf("the first issuance was refused: %v", err)
			}
			_, err = c.GenerateClientConfiguration(ctx, &machine.GenerateClientConfigurationRequest{})
			wantRefusal(t, err, codes.ResourceExhausted, "clientCertificatesPerHour")
		},
		"limits.rapidResets": func(t *testing.T) {
			before := lg.metric(refused("rapidResets"))
			lg.reload(func(c *Config) { c.Limits.RapidResets = 2 })
			lg.backend.Set(testbackend.Behaviour{Hang: true})
			defer lg.backend.Set(testbackend.Behaviour{})
			c := lg.client("resets", certs.RoleReader)
			for i := 0; i < 20 && lg.metric(refused("rapidResets")) == before; i++ {
				rctx, cancel := context.WithCancel(ctx)
				done := make(chan error, 1)
				go func() { done <- callVersion(rctx, c) }()
				testkit.Eventually(time.Second, func() bool { return lg.backend.Active() > 0 })
				cancel()
				<-done
			}
			lg.rise(refused("rapidResets"), before)
		},
		"policy.rules": func(t *testing.T) {
			c := lg.client("policy-reader", certs.RoleReader)
			wantRefusal(t, func() error { _, err := c.Reboot(ctx, &machine.RebootRequest{}); return err }(), codes.PermissionDenied, "not authorized")
			lg.reload(func(c *Config) {
				c.Policy.Rules = []auth.Rule{{Method: "/machine.MachineService/Reboot", Roles: []string{certs.RoleReader}}}
			})
			if _, err := c.Reboot(ctx, &machine.RebootRequest{}); status.Code(err) != codes.Unimplemented { // the node's answer
				t.Errorf("reboot granted to os:reader: %v, want the node's Unimplemented", err)
			}
		},
		"policy.replace": func(t *testing.T) {
			c := lg.client("replaced", certs.RoleReader)
			if err := callVersion(ctx, c); err != nil {
				t.Fatal(err)
			}
			lg.reload(func(c *Config) { c.Policy.Replace = true })
			wantRefusal(t, callVersion(ctx, c), codes.PermissionDenied, "not authorized")
		},
		"health.maxRunning": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Health.MaxRunning, c.Health.MaxRunningPerIdentity = 1, 1 })
			lg.holdCheck(t, "checker-1", "checker-2", "1 cluster health checks are running")
		},
		"health.maxRunningPerIdentity": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Health.MaxRunningPerIdentity = 1 })
			lg.holdCheck(t, "checker-3", "checker-3", "health.maxRunningPerIdentity")
		},
		"health.maxClockSkew": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Health.MaxClockSkew = 7 * time.Second })
			if got := lg.gw.health.Applied().MaxClockSkew; got != 7*time.Second {
				t.Errorf("applied %s", got)
			}
		},
		"health.certificateDays": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Health.CertificateDays = 3 })
			if got := lg.gw.health.Applied().CertificateDays; got != 3 {
				t.Errorf("applied %d", got)
			}
		},
		"health.maxWait": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Health.MaxWait = 7 * time.Second })
			if got := lg.gw.health.Applied().MaxWait; got != 7*time.Second {
				t.Errorf("applied %s", got)
			}
		},
		"disruption.enabled": func(t *testing.T) {
			// Off, a reboot is not even judged; on, it is (admitted: the
			// test backend's node has nothing held against it).
			admitted := `apid_disruption_decisions_total{decision="admitted"}`
			c := lg.client("rebooter", certs.RoleAdmin)
			lg.reload(func(c *Config) { c.Disruption.Enabled = false })
			before := lg.metric(admitted)
			_, _ = c.Reboot(ctx, &machine.RebootRequest{})
			if v := lg.metric(admitted); v != before {
				t.Fatalf("off: %g admitted, want %g", v, before)
			}
			lg.reload(nil)
			_, _ = c.Reboot(ctx, &machine.RebootRequest{})
			if v := lg.metric(admitted); v != before+1 {
				t.Errorf("on: %g admitted, want %g", v, before+1)
			}
		},
		"disruption.maxUnavailable": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Disruption.MaxUnavailable = map[string]disruption.Amount{"zone=a": {N: 2}} })
			if got := lg.gw.budget.Applied().MaxUnavailable["zone=a"]; got.N != 2 {
				t.Errorf("applied %v", got)
			}
		},
		"disruption.maxWait": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Disruption.MaxWait = 7 * time.Second })
			if got := lg.gw.budget.Applied().MaxWait; got != 7*time.Second {
				t.Errorf("applied %s", got)
			}
		},
		"disruption.maxHeldPerIdentity": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Disruption.MaxHeldPerIdentity = 3 })
			if got := lg.gw.budget.Applied().MaxHeldPerIdentity; got != 3 {
				t.Errorf("applied %d", got)
			}
		},
		"disruption.probeInterval": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Disruption.ProbeInterval = 7 * time.Second })
			if got := lg.gw.budget.Applied().ProbeInterval; got != 7*time.Second {
				t.Errorf("applied %s", got)
			}
		},
		"adminHosts": func(t *testing.T) {
			get := func() int {
				req, _ := http.NewRequest("GET", "http://"+lg.gw.AdminAddr().String()+"/healthz", nil)
				req.Host = "ops.example"
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				resp.Body.Close()
				return resp.StatusCode
			}
			if code := get(); code != http.StatusMisdirectedRequest {
				t.Fatalf("ops.example before: %d", code)
			}
			lg.reload(func(c *Config) { c.AdminHosts = []string{"ops.example"} })
			if code := get(); code != http.StatusOK {
				t.Errorf("ops.example in adminHosts: %d", code)
			}
		},
		"drainDelay": func(t *testing.T) {
			lg.reload(func(c *Config) { c.DrainDelay = 7 * time.Second })
			if got := lg.gw.Config().DrainDelay; got != 7*time.Second {
				t.Errorf("applied %s", got)
			}
		},
		"shutdownTimeout": func(t *testing.T) {
			lg.reload(func(c *Config) { c.ShutdownTimeout = 7 * time.Second })
			if got := lg.gw.Config().ShutdownTimeout; got != 7*time.Second {
				t.Errorf("applied %s", got)
			}
		},
		"logLevel": func(t *testing.T) {
			c := lg.client("unknown-roles", certs.RoleReader, "os:made-up")
			if err := callVersion(ctx, c); err != nil || strings.Contains(lg.logs.String(), "ignoring unknown roles") {
				t.Fatalf("at info: %v, or a debug line was written", err)
			}
			lg.reload(func(c *Config) { c.LogLevel = "debug" })
			if err := callVersion(ctx, c); err != nil || !strings.Contains(lg.logs.String(), "ignoring unknown roles") {
				t.Errorf("at debug: %v, and no debug line", err)
			}
		},
		"inventory": func(t *testing.T) {
			c := lg.client("inventory", certs.RoleReader)
			if err := callVersion(ctx, c, "node", "cp-9"); err == nil {
				t.Fatal("a name in no inventory was served")
			}
			lg.reload(func(c *Config) {
				c.Inventory = inventory.Config{Nodes: []inventory.Node{{Name: "cp-9", Address: "127.0.0.1", Identity: "node-1"}}}
			})
			if err := callVersion(ctx, c, "node", "cp-9"); err != nil {
				t.Errorf("cp-9, now in the inventory and this node: %v", err)
			}
		},
		"selfNames": func(t *testing.T) {
			c := lg.client("self", certs.RoleReader)
			lg.reload(func(c *Config) { c.Routing.SelfNames = append(c.Routing.SelfNames, "127.0.0.9") })
			calls := lg.backend.Calls()
			if err := callVersion(ctx, c, "node", "127.0.0.9"); err != nil || lg.backend.Calls() != calls+1 {
				t.Errorf("127.0.0.9, now this node: %v", err)
			}
		},
		"maxNodes": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.MaxNodes = 2 })
			wantRefusal(t, callVersion(ctx, lg.client("max", certs.RoleReader), "nodes", "127.0.0.1,127.0.0.2,127.0.0.3"), codes.InvalidArgument, "more than 2 nodes")
		},
		"nodeTimeout": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.NodeTimeout = 7 * time.Second })
			if got := lg.gw.routing.Applied().NodeTimeout; got != 7*time.Second {
				t.Errorf("applied %s", got)
			}
		},
		"forwardMetadata": func(t *testing.T) {
			c := lg.client("forward", certs.RoleReader)
			lg.reload(func(c *Config) { c.Routing.ForwardKeys = []string{"x-live"} })
			if err := callVersion(ctx, c, "x-live", "yes"); err != nil || len(lg.backend.LastMetadata()["x-live"]) != 1 {
				t.Errorf("x-live not forwarded: %v", err)
			}
		},
		"replyMetadata": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.ReplyKeys = []string{"x-backend"} })
			var header metadata.MD
			c := lg.client("reply", certs.RoleReader)
			if _, err := c.Version(metadata.AppendToOutgoingContext(ctx, "nodes", "127.0.0.1,node-1"), &emptypb.Empty{}, grpc.Header(&header)); err != nil {
				t.Fatal(err)
			}
			if len(header["x-backend"]) == 0 {
				t.Errorf("x-backend did not reach the fan-out's client: %v", header)
			}
		},
		"unaryMethods": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.Unary = []string{"/live.Test/Unary"} })
			lg.kind(t, "/live.Test/Unary", "unary")
		},
		"serverStreamingMethods": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.ServerStreaming = []string{"/live.Test/ServerStream"} })
			lg.kind(t, "/live.Test/ServerStream", "server-streaming")
		},
		"clientStreamingMethods": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.ClientStreaming = []string{"/live.Test/ClientStream"} })
			lg.kind(t, "/live.Test/ClientStream", "client-streaming")
		},
		"bidiStreamingMethods": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.BidiStreaming = []string{"/live.Test/BidiStream"} })
			lg.kind(t, "/live.Test/BidiStream", "bidi-streaming")
		},
		"ejection": func(t *testing.T) {
			// One failure ejects a node now (three by default): a node
			// that refuses connections, once.
			before := lg.metric("apid_node_ejections_total")
			lg.reload(func(c *Config) { c.Routing.Ejection.ConsecutiveFailures = 1 })
			if err := callVersion(ctx, lg.client("ejector", certs.RoleReader), "nodes", "127.0.0.1,127.0.0.3"); err != nil {
				t.Fatal(err)
			}
			if v := lg.metric("apid_node_ejections_total"); v != before+1 {
				t.Errorf("ejections %g after one failure, want %g", v, before+1)
			}
		},
		"nodeNetworks": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.NodeNetworks = []string{"198.18.0.0/15"} })
			wantRefusal(t, callVersion(ctx, lg.client("networks", certs.RoleReader), "node", "127.0.0.3"), codes.PermissionDenied, "nodeNetworks")
		},
		"localOnly": func(t *testing.T) {
			lg.reload(func(c *Config) { c.Routing.LocalOnly = true })
			wantRefusal(t, callVersion(ctx, lg.client("local-only", certs.RoleReader), "node", "127.0.0.3"), codes.PermissionDenied, "no request forwarding")
		},
	}
	walkKeys(reflect.TypeFor[Config](), "", func(key string, _ []int, rule string) {
		if rule != "live" {
			return
		}
		check, ok := checks[key]
		if !ok {
			t.Errorf("live key %s has no check here: add one that sees it take effect on reload", key)
			return
		}
		delete(checks, key)
		t.Run(key, func(t *testing.T) {
			defer lg.reload(nil)
			check(t)
		})
	})
	for key := range checks {
		t.Errorf("checked key %s is not a live key", key)
	}
}

// rateCheck applies a bucket of 0.001 calls a second and bursts of 2: a
// third call at once is refused naming both.
func rateCheck(lg *liveGateway) func(t *testing.T) {
	return func(t *testing.T) {
		lg.reload(func(c *Config) { c.Limits.CallsPerSecondPerIdentity, c.Limits.CallBurstPerIdentity = 0.001, 2 })
		c := lg.client("rate-"+t.Name(), certs.RoleReader)
		for i := range 2 {
			if err := callVersion(context.Background(), c); err != nil {
				t.Fatalf("call %d: %v", i, err)
			}
		}
		wantRefusal(t, callVersion(context.Background(), c), codes.ResourceExhausted, "0.001 a second, bursts of 2")
	}
}

// kind reads the shape routing gives method from the call's metric series.
func (lg *liveGateway) kind(t *testing.T, method, want string) {
	t.Helper()
	if got := lg.gw.routing.Kind(method).String(); got != want {
		t.Errorf("%s routed as %s, want %s", method, got, want)
	}
}

// holdCheck starts a cluster health check as first that waits on a node
// that never answers, then a second as second, which the limits refuse
// naming text.
func (lg *liveGateway) holdCheck(t *testing.T, first, second, text string) {
	t.Helper()
	hctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	req := &cluster.HealthCheckRequest{WaitTimeout: durationpb.New(time.Minute),
		ClusterInfo: &cluster.ClusterInfo{ControlPlaneNodes: []string{"127.0.0.3"}}}
	s, err := cluster.NewClusterServiceClient(lg.conn(first, certs.RoleReader)).HealthCheck(hctx, req)
	if err != nil {
		t.Fatal(err)
	}
	if !testkit.Eventually(5*time.Second, func() bool { return lg.gw.health.Running() == 1 }) {
		t.Fatal("the first check did not start")
	}
	s2, err := cluster.NewClusterServiceClient(lg.conn(second, certs.RoleReader)).HealthCheck(context.Background(), req)
	if err == nil {
		_, err = s2.Recv()
	}
	wantRefusal(t, err, codes.ResourceExhausted, text)
	cancel()
	_, _ = s.Recv()
}

// TestReloadReportsRestartAndLooseningKeys: a key that needs a restart is
// named and left as it runs; a change that loosens trust is a log line and
// a metric of its own.
func TestReloadReportsRestartAndLooseningKeys(t *testing.T) {
	lg := startLive(t)
	lg.reload(func(c *Config) { c.Routing.LocalOnly = true })
	lg.reload(func(c *Config) { c.Listen = "127.0.0.1:1"; c.Limits.StreamWindow = 128 << 10 })
	if got := lg.gw.Config().Listen; got != lg.base.Listen {
		t.Errorf("listen became %q while running", got)
	}
	restart := regexp.MustCompile(`"msg":"configuration changes that need a restart were not applied","keys":\["listen","limits.streamWindow"\]`)
	if !restart.MatchString(lg.logs.String()) {
		t.Errorf("no log line names the restart keys:\n%s", lg.logs.String())
	}
	if !strings.Contains(lg.logs.String(), `"msg":"configuration reloaded with bounds or trust loosened","keys":["localOnly"]`) {
		t.Errorf("localOnly turned off again was not reported as loosening:\n%s", lg.logs.String())
	}
	if v := lg.metric("apid_config_loosened_total"); v != 1 {
		t.Errorf("apid_config_loosened_total %g, want 1", v)
	}
	lg.reload(func(c *Config) { c.Limits.Connections = 10 })
	if v := lg.metric("apid_config_loosened_total"); v != 1 {
		t.Errorf("lowering limits.connections counted as loosening: %g", v)
	}
	lg.reload(nil)
	if v := lg.metric("apid_config_loosened_total"); v != 2 || !strings.Contains(lg.logs.String(), `"keys":["limits.connections"]`) {
		t.Errorf("raising limits.connections back: apid_config_loosened_total %g, want 2, and a line naming it", v)
	}
	// Bounds of other sections: the health check's, routing's maxNodes.
	lg.reload(func(c *Config) { c.Health.MaxRunning, c.Health.MaxWait, c.Routing.MaxNodes = 9, time.Hour, 2000 })
	if !strings.Contains(lg.logs.String(), `"keys":["maxNodes","health.maxRunning","health.maxWait"]`) {
		t.Errorf("raised health and routing bounds not reported:\n%s", lg.logs.String())
	}
}
