package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/pki"
)

// echoAgent answers every method it is called with by echoing each
// message it receives, and says in the trailer how many it read: a node
// of a newer Talos, whose methods apid has no descriptor for.
func echoAgent(t *testing.T) string {
	t.Helper()
	srv := grpc.NewServer(grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
		n := 0
		for {
			var m wrapperspb.BytesValue
			err := ss.RecvMsg(&m)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				return err
			}
			n++
			if err := ss.SendMsg(&m); err != nil {
				return err
			}
		}
		ss.SetTrailer(metadata.Pairs("x-frames", strconv.Itoa(n)))
		return nil
	}))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}

// TestUnknownMethodRelaysEveryFrame: a method apid has no descriptor for
// (a newer Talos's client-streaming one, say) reaches the node whole, one
// to one: every message the client sends, every reply, the trailer.
func TestUnknownMethodRelaysEveryFrame(t *testing.T) {
	lg := startLiveWith(t, echoAgent(t), nil)
	cc := lg.conn("admin", certs.RoleAdmin)
	for _, md := range [][]string{nil, {"node", "127.0.0.1"}} {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), md...), 10*time.Second)
		s, err := cc.NewStream(ctx, &grpc.StreamDesc{ClientStreams: true, ServerStreams: true}, "/machine.LVMService/Upload")
		if err != nil {
			t.Fatal(err)
		}
		const sent = 5
		for i := range sent {
			if err := s.SendMsg(wrapperspb.Bytes([]byte{byte(i)})); err != nil {
				t.Fatalf("send %d: %v", i, err)
			}
		}
		if err := s.CloseSend(); err != nil {
			t.Fatal(err)
		}
		got := 0
		for {
			var m wrapperspb.BytesValue
			err := s.RecvMsg(&m)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%v: after %d replies: %v", md, got, err)
			}
			got++
		}
		if frames := s.Trailer().Get("x-frames"); got != sent || len(frames) != 1 || frames[0] != strconv.Itoa(sent) {
			t.Errorf("%v: %d replies, node read %v messages; want %d and %d", md, got, frames, sent, sent)
		}
		cancel()
	}
}

// TestMadeUpStatusCodesMintNoSeries: a node that answers with codes
// outside gRPC's 17 is counted under Unknown in every metric that labels
// codes, not a new series per code.
func TestMadeUpStatusCodesMintNoSeries(t *testing.T) {
	lg := startLive(t)
	c := lg.client("codes", certs.RoleReader)
	ctx := context.Background()
	for code := 100; code < 140; code++ {
		lg.backend.Set(testbackend.Behaviour{Fail: codes.Code(code), FailMessage: "made up"})
		if err := callVersion(ctx, c); status.Code(err) != codes.Code(code) {
			t.Fatalf("one-to-one: %v, want the node's code %d untouched", err, code)
		}
		if _, err := c.Version(metadata.AppendToOutgoingContext(ctx, "nodes", "127.0.0.1,node-1"), &emptypb.Empty{}); err != nil {
			t.Fatalf("fan-out: %v", err)
		}
	}
	body := lg.metrics()
	if n := strings.Count(body, `="Code(`); n != 0 {
		t.Errorf("%d series labelled with a made-up code", n)
	}
	for _, series := range []string{
		`grpc_server_handled_total{grpc_code="Unknown",grpc_method="Version",grpc_service="machine.MachineService",grpc_type="unary"} 40`, // the fan-outs succeed: their nodes are entries
		`apid_fanout_node_results_total{code="Unknown",kind="unary"} 80`,
	} {
		if !strings.Contains(body, series) {
			t.Errorf("no %s", series)
		}
	}
	if !regexp.MustCompile(`apid_node_calls_total\{code="Unknown",node="[^"]+"\} [1-9]`).MatchString(body) {
		t.Error("apid_node_calls_total has no Unknown series")
	}
}

// TestHealthChecksCountAgainstCallLimits: gRPC health checks are calls of
// their caller like any other: past its bucket they are refused.
func TestHealthChecksCountAgainstCallLimits(t *testing.T) {
	lg := startLive(t)
	lg.reload(func(c *Config) { c.Limits.CallsPerSecondPerIdentity, c.Limits.CallBurstPerIdentity = 0.001, 3 })
	h := healthpb.NewHealthClient(lg.conn("prober", certs.RoleReader))
	for i := range 3 {
		if _, err := h.Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
			t.Fatalf("check %d: %v", i, err)
		}
	}
	_, err := h.Check(context.Background(), &healthpb.HealthCheckRequest{})
	wantRefusal(t, err, codes.ResourceExhausted, "limits.callsPerSecondPerIdentity")
	// Another identity has a bucket of its own.
	if _, err := healthpb.NewHealthClient(lg.conn("other-prober", certs.RoleReader)).Check(context.Background(), &healthpb.HealthCheckRequest{}); err != nil {
		t.Errorf("another identity's check: %v", err)
	}
}

// TestCutCABundleKeepsTheRunningMaterial: a CA bundle cut inside a block
// is refused on reload, counted and logged, and the gateway goes on
// trusting what it trusted.
func TestCutCABundleKeepsTheRunningMaterial(t *testing.T) {
	lg := startLive(t)
	c := lg.client("before", certs.RoleReader)
	other, err := pki.NewCA("other", time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	lg.write("ca.crt", append(append([]byte(nil), lg.ca.CertPEM...), other.CertPEM[:len(other.CertPEM)/2]...))
	lg.reload(nil)
	if v := lg.metric(`apid_reloads_total{result="failure",what="certificates"}`); v != 1 {
		t.Errorf("certificate reload failures: %g, want 1", v)
	}
	if !strings.Contains(lg.logs.String(), "certificate reload failed; keeping the current ones") || !strings.Contains(lg.logs.String(), "cut short") {
		t.Errorf("no log line says the bundle was cut:\n%s", lg.logs.String())
	}
	for _, c := range []machine.MachineServiceClient{c, lg.client("after", certs.RoleReader)} {
		if err := callVersion(context.Background(), c); err != nil {
			t.Errorf("a client of the running CA: %v", err)
		}
	}
}

// TestAdminAnswersOnlyItsHosts: the admin endpoint answers a request with
// no Host, an IP address or localhost, and names in adminHosts (a reload
// applies them); any other Host, as a DNS-rebinding page sends, is
// refused and counted.
func TestAdminAnswersOnlyItsHosts(t *testing.T) {
	lg := startLive(t)
	admin := lg.gw.AdminAddr().String()
	get := func(host string) int {
		t.Helper()
		req, err := http.NewRequest("GET", "http://"+admin+"/nodes", nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	for host, want := range map[string]int{
		admin: 200, "127.0.0.1": 200, "[::1]:50001": 200, "localhost:50001": 200, "LOCALHOST": 200,
		"evil": 421, "evil.example:50001": 421, "ops.example": 421, "127.0.0.1.evil.example": 421,
	} {
		if got := get(host); got != want {
			t.Errorf("Host %q: %d, want %d", host, got, want)
		}
	}
	// HAProxy's check sends no Host (HTTP/1.0).
	c, err := net.Dial("tcp", admin)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := io.WriteString(c, "GET /readyz HTTP/1.0\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	reply, _ := io.ReadAll(c)
	if !strings.HasPrefix(string(reply), "HTTP/1.0 200") {
		t.Errorf("a request with no Host: %q", reply)
	}
	if v := lg.metric("apid_admin_host_refusals_total"); v != 4 {
		t.Errorf("apid_admin_host_refusals_total %g, want 4", v)
	}
	lg.reload(func(c *Config) { c.AdminHosts = []string{"ops.example"} })
	if got := get("ops.example"); got != 200 {
		t.Errorf("ops.example in adminHosts: %d", got)
	}
}
