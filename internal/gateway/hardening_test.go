package gateway

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/limits"
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
	if _, err := io.WriteString(c, "GET /healthz HTTP/1.0\r\n\r\n"); err != nil {
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

// TestHeaderListBoundedByWhatApidAccepts: the header list a client may
// send is advertised from what apid accepts of routing and forwarded
// metadata, so that a 900 KiB nodes header is refused by HTTP/2 before it
// is decoded, and reaches no node.
func TestHeaderListBoundedByWhatApidAccepts(t *testing.T) {
	lg := startLive(t)
	want := headerListBound(lg.base)
	if want > 256<<10 || want < limits.MaxNodesBytes {
		t.Fatalf("bound %d bytes", want)
	}
	cfg := lg.clientTLS("raw", certs.RoleAdmin)
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.Dial("tcp", lg.addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(20 * time.Second))
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var advertised uint32
	for advertised == 0 {
		f, err := fr.ReadFrame()
		if err != nil {
			t.Fatal(err)
		}
		if s, ok := f.(*http2.SettingsFrame); ok && !s.IsAck() {
			v, ok := s.Value(http2.SettingMaxHeaderListSize)
			if !ok {
				t.Fatal("the server advertises no header list bound")
			}
			advertised = v
			_ = fr.WriteSettingsAck()
		}
	}
	if advertised != want {
		t.Errorf("advertised %d, want %d", advertised, want)
	}

	calls, checked := lg.backend.Calls(), lg.metric(refused("metadataBytes"))
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":path", "/machine.MachineService/Version"},
		{":authority", "127.0.0.1"}, {"content-type", "application/grpc"}, {"te", "trailers"},
		{"nodes", strings.Repeat("node-x,", 900<<10/7)}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	const chunk = 16 << 10
	b := block.Bytes()
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:chunk], EndStream: true}); err != nil {
		t.Fatal(err)
	}
	for b = b[chunk:]; len(b) > 0; {
		n := min(chunk, len(b))
		if err := fr.WriteContinuation(1, n == len(b), b[:n]); err != nil {
			break // the server may close the connection first
		}
		b = b[n:]
	}
	reset := false
	for !reset {
		f, err := fr.ReadFrame()
		if err != nil {
			reset = true // the connection closed: refused too
			break
		}
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			reset = true
		case *http2.GoAwayFrame:
			reset = true
		case *http2.MetaHeadersFrame:
			for _, h := range f.Fields {
				if h.Name == "grpc-status" && h.Value != "0" {
					reset = true
				}
			}
		}
	}
	if lg.backend.Calls() != calls {
		t.Error("the oversized request reached the node")
	}
	if v := lg.metric(refused("metadataBytes")); v != checked {
		t.Error("the oversized header list was decoded and reached apid's own metadata check")
	}

	// The official client hears the bound from the server and does not
	// send such a list at all.
	err = callVersion(context.Background(), lg.client("client", certs.RoleAdmin), "nodes", strings.Repeat("node-x,", 900<<10/7))
	if err == nil || lg.backend.Calls() != calls {
		t.Errorf("a 900 KiB nodes header through the official client: %v", err)
	}
}

// TestHungNodeEjectedThroughTheGateway: a node whose address accepts TCP
// and never speaks, fanned out to back to back with a caller's deadline
// (apid-node-timeout) shorter than a connection attempt, is ejected once
// its connections have failed to establish for longer than an attempt may
// take (20 s), and the calls after that do not wait for it.
func TestHungNodeEjectedThroughTheGateway(t *testing.T) {
	if testing.Short() {
		t.Skip("runs past the 20 s connect timeout")
	}
	hung := testkit.SilentListener(t, "127.0.0.77:0")
	_, port, _ := net.SplitHostPort(hung.Addr().String())
	lg := startLiveWith(t, testbackend.Start(t, "node-1", testbackend.Behaviour{}).Addr, func(c *Config) {
		c.Nodes.Port, _ = strconv.Atoi(port)
	})
	c := lg.client("caller", certs.RoleReader)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "nodes", "127.0.0.1,127.0.0.77", "apid-node-timeout", "1s")
	deadline := time.Now().Add(40 * time.Second)
	calls := 0
	for lg.metric("apid_node_ejections_total") == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("not ejected after %d calls in 40 s", calls)
		}
		resp, err := c.Version(ctx, &emptypb.Empty{})
		if err != nil || len(resp.Messages) != 2 {
			t.Fatalf("fan-out: %v, %v", resp, err)
		}
		calls++
	}
	// Ejected: its entry is the ejection's refusal, not a wait for its
	// deadline.
	resp, err := c.Version(ctx, &emptypb.Empty{})
	if err != nil || len(resp.Messages) != 2 || !strings.Contains(resp.Messages[1].GetMetadata().GetError(), "ejected") {
		t.Fatalf("after ejection: %v, %v", resp, err)
	}
	t.Logf("ejected after %d calls", calls)
}

// rawConn is a client's HTTP/2 connection to the gateway, below gRPC: for
// sending what no gRPC client would.
type rawConn struct {
	conn net.Conn
	fr   *http2.Framer
	next uint32 // the next stream id
}

func (c *rawConn) close() { c.conn.Close() }

func dialRaw(tb testing.TB, lg *liveGateway) *rawConn {
	tb.Helper()
	cfg := lg.clientTLS("raw", certs.RoleAdmin)
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.Dial("tcp", lg.addr, cfg)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { conn.Close() })
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		tb.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	fr.MaxHeaderListSize = 1 << 20
	// A window large enough that replies never wait for an update.
	if err := fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 30}); err != nil {
		tb.Fatal(err)
	}
	if err := fr.WriteWindowUpdate(0, 1<<30); err != nil {
		tb.Fatal(err)
	}
	return &rawConn{conn: conn, fr: fr, next: 1}
}

// headerBlock is the HPACK block of a Version request with extra fields.
func headerBlock(extra ...hpack.HeaderField) []byte {
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":path", "/machine.MachineService/Version"},
		{":authority", "127.0.0.1"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	for _, f := range extra {
		_ = enc.WriteField(f)
	}
	return block.Bytes()
}

// call sends one request (block, then an empty message unless the block
// is refused first) and reads until its stream ends.
func (c *rawConn) call(tb testing.TB, block []byte, body bool) {
	id := c.next
	c.next += 2
	const chunk = 16 << 10
	first := block[:min(chunk, len(block))]
	if err := c.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: first, EndHeaders: len(block) <= chunk}); err != nil {
		tb.Fatal(err)
	}
	for b := block[len(first):]; len(b) > 0; {
		n := min(chunk, len(b))
		if err := c.fr.WriteContinuation(id, n == len(b), b[:n]); err != nil {
			break // closed by the server part-way: read why below
		}
		b = b[n:]
	}
	if body {
		if err := c.fr.WriteData(id, true, []byte{0, 0, 0, 0, 0}); err != nil {
			tb.Fatal(err)
		}
	}
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			if !body {
				return // refused: the transport closed the connection
			}
			tb.Fatal(err)
		}
		switch f := f.(type) {
		case *http2.RSTStreamFrame:
			if f.StreamID == id {
				return
			}
		case *http2.MetaHeadersFrame:
			if f.StreamID == id && f.StreamEnded() {
				return
			}
		case *http2.SettingsFrame:
			if !f.IsAck() {
				_ = c.fr.WriteSettingsAck()
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				_ = c.fr.WritePing(true, f.Data)
			}
		}
	}
}

// BenchmarkOversizedHeader: what a request with a 900 KiB nodes header
// costs now that HTTP/2 refuses it undecoded, beside an ordinary call, through
// a whole gateway in this process (both ends' CPU). The transport closes a
// connection that sends a header list past the bound, so each oversized
// request comes on a new connection: its own cost is nodes=900KiB less
// handshake, to set against ordinary (Version, answered by the node, on one
// connection). Compare them in one run.
func BenchmarkOversizedHeader(b *testing.B) {
	lg := startLive(b)
	big := headerBlock(hpack.HeaderField{Name: "nodes", Value: strings.Repeat("node-x,", 900<<10/7)})
	b.Run("ordinary", func(b *testing.B) {
		c := dialRaw(b, lg)
		block := headerBlock()
		for b.Loop() {
			c.call(b, block, true)
		}
	})
	b.Run("handshake", func(b *testing.B) {
		for b.Loop() {
			c := dialRaw(b, lg)
			c.close()
		}
	})
	b.Run("nodes=900KiB", func(b *testing.B) {
		for b.Loop() {
			c := dialRaw(b, lg)
			c.call(b, big, false)
			c.close()
		}
	})
}

// TestCheckFilesNamesWhatClientsWouldHitLater: a serving certificate
// without the listen address, and a forwarding node with no identity to
// forward with, are problems found before serving, not errors clients meet
// later.
func TestCheckFilesNamesWhatClientsWouldHitLater(t *testing.T) {
	lg := startLive(t) // its files: a node certificate for 127.0.0.1 and node-1, and a forwarding one
	check := func(edit func(*Config)) (problems, warnings string) {
		cfg := lg.base
		edit(&cfg)
		p, w := CheckFiles(cfg)
		return fmt.Sprint(p), fmt.Sprint(w)
	}
	// A warning: behind a TCP balancer, clients may reach it by a name the
	// certificate carries.
	if p, w := check(func(c *Config) { c.Listen = "127.0.0.9:50000" }); p != "[]" || !strings.Contains(w, "listen 127.0.0.9:50000: cert") || !strings.Contains(w, "does not carry the IP address 127.0.0.9") {
		t.Errorf("listen on an address the certificate lacks: problems %s, warnings %s", p, w)
	}
	if p, _ := check(func(c *Config) { c.Listen = "127.0.0.1:50000" }); p != "[]" {
		t.Errorf("listen on the certificate's address: %s", p)
	}
	if _, w := check(func(c *Config) { c.Listen = ":50000" }); !strings.Contains(w, "every address of this machine") || !strings.Contains(w, "node-1, 127.0.0.1") {
		t.Errorf("a wildcard listen: %s", w)
	}
	if p, _ := check(func(c *Config) { c.TLS.ClientCert, c.TLS.ClientKey = "", "" }); !strings.Contains(p, "clientCert: not set, and cert") {
		t.Errorf("no forwarding identity: %s", p)
	}
	if p, _ := check(func(c *Config) { c.TLS.ClientCert, c.TLS.ClientKey, c.Routing.LocalOnly = "", "", true }); p != "[]" {
		t.Errorf("no forwarding identity on a local-only node: %s", p)
	}
}

// TestReflectionListsWhatTheGatewayServes: grpcurl's list through apid
// names the services apid serves itself besides the node API.
func TestReflectionListsWhatTheGatewayServes(t *testing.T) {
	lg := startLive(t)
	stream, err := reflectionpb.NewServerReflectionClient(lg.conn("lister", certs.RoleReader)).ServerReflectionInfo(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range resp.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	for _, want := range []string{"cluster.ClusterService", "grpc.health.v1.Health", "machine.MachineService", "cosi.resource.State", "grpc.reflection.v1.ServerReflection"} {
		if !slices.Contains(names, want) {
			t.Errorf("reflection lists %v, without %s", names, want)
		}
	}
	if slices.ContainsFunc(names, func(n string) bool { return strings.HasPrefix(n, "opentelemetry.") }) {
		t.Errorf("reflection lists a service no client reaches through apid: %v", names)
	}
	// A descriptor resolves, so grpcurl can describe and call.
	if err := stream.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "cluster.ClusterService"}}); err != nil {
		t.Fatal(err)
	}
	if resp, err := stream.Recv(); err != nil || len(resp.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
		t.Errorf("describe cluster.ClusterService: %v, %v", resp, err)
	}
}

// TestStartReportsWhatLoosensTheDefaults: at start, a configuration that
// relaxes apid's defaults (a bound raised, TLS 1.2, a policy granting more)
// is a warning naming the keys and counts as a loosening; the defaults
// are not.
func TestStartReportsWhatLoosensTheDefaults(t *testing.T) {
	plain := startLive(t)
	if strings.Contains(plain.logs.String(), "loosens apid's defaults") || plain.metric("apid_config_loosened_total") != 0 {
		t.Errorf("the defaults reported as loosening:\n%s", plain.logs.String())
	}
	lg := startLiveWith(t, testbackend.Start(t, "node-1", testbackend.Behaviour{}).Addr, func(c *Config) {
		c.Limits.Connections = 10000
		c.TLS.AllowTLS12 = true
		c.Policy.Rules = []auth.Rule{{Method: "/machine.MachineService/Reboot", Roles: []string{certs.RoleReader}}}
	})
	if !strings.Contains(lg.logs.String(), `"msg":"configuration loosens apid's defaults","keys":["limits.connections","policy","allowTLS12"]`) {
		t.Errorf("no warning naming the loosened keys:\n%s", lg.logs.String())
	}
	if v := lg.metric("apid_config_loosened_total"); v != 1 {
		t.Errorf("apid_config_loosened_total %g, want 1", v)
	}
}
