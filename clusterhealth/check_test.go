package clusterhealth

import (
	"context"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"io"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/cluster"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	timeapi "github.com/siderolabs/talos/pkg/machinery/api/time"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/limits"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// fakeNode is a node agent on loopback answering Version and Time.
type fakeNode struct {
	machine.UnimplementedMachineServiceServer
	timeapi.UnimplementedTimeServiceServer
	tag  string
	skew time.Duration
	// upgraded, when set, is the tag reported from then on.
	upgraded   string
	upgradedAt time.Time
	// refuseThenHang: the first Version is refused, later ones never
	// answer.
	refuseThenHang bool
	calls          atomic.Int64
}

func (n *fakeNode) Version(ctx context.Context, _ *emptypb.Empty) (*machine.VersionResponse, error) {
	if n.refuseThenHang {
		if n.calls.Add(1) == 1 {
			return nil, status.Error(codes.Unavailable, "first refusal")
		}
		<-ctx.Done()
		return nil, ctx.Err()
	}
	tag := n.tag
	if n.upgraded != "" && time.Now().After(n.upgradedAt) {
		tag = n.upgraded
	}
	return &machine.VersionResponse{Messages: []*machine.Version{{Version: &machine.VersionInfo{Tag: tag}}}}, nil
}

func (n *fakeNode) Time(context.Context, *emptypb.Empty) (*timeapi.TimeResponse, error) {
	return &timeapi.TimeResponse{Messages: []*timeapi.Time{{Localtime: timestamppb.New(time.Now().Add(n.skew))}}}, nil
}

func serveNode(t *testing.T, n *fakeNode) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	machine.RegisterMachineServiceServer(g, n)
	timeapi.RegisterTimeServiceServer(g, n)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return lis.Addr().String()
}

// dialer reaches node names through a table of loopback addresses.
type dialer struct {
	addrs map[string]string
}

func (d dialer) CheckTargets(context.Context) error { return nil }

func (d dialer) Dial(ctx context.Context, target string) (context.Context, grpc.ClientConnInterface, func(error), error) {
	addr, ok := d.addrs[target]
	if !ok {
		return nil, nil, nil, status.Errorf(codes.NotFound, "node %q is not in the inventory", target)
	}
	cc, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, nil, err
	}
	return ctx, cc, func(error) { cc.Close() }, nil
}

func cert(notAfter time.Time) *x509.Certificate {
	return &x509.Certificate{Subject: pkix.Name{CommonName: "node"}, NotAfter: notAfter}
}

// open serves s on loopback until the test ends and starts one health
// check on it over a real connection.
func open(t *testing.T, s *Server, req *cluster.HealthCheckRequest) (cluster.ClusterService_HealthCheckClient, error) {
	t.Helper()
	return openCtx(t, t.Context(), s, req)
}

// openCtx is open with the call's context.
func openCtx(t *testing.T, ctx context.Context, s *Server, req *cluster.HealthCheckRequest) (cluster.ClusterService_HealthCheckClient, error) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	s.Register(g)
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cluster.NewClusterServiceClient(cc).HealthCheck(ctx, req)
}

// check runs one health check and returns its lines and the error of its
// last message.
func check(t *testing.T, s *Server, req *cluster.HealthCheckRequest) (lines []string, failure string) {
	t.Helper()
	stream, err := open(t, s, req)
	if err != nil {
		t.Fatal(err)
	}
	lines, failure, err = drain(stream)
	if err != nil {
		t.Fatalf("Recv: %v", err)
	}
	return lines, failure
}

// drain reads a check to its end: its lines, the error of its last
// message, and the status it ended with if not OK.
func drain(stream cluster.ClusterService_HealthCheckClient) (lines []string, failure string, err error) {
	for {
		msg, err := stream.Recv()
		if err == io.EOF {
			return lines, failure, nil
		}
		if err != nil {
			return lines, failure, err
		}
		lines = append(lines, msg.GetMessage())
		if e := msg.GetMetadata().GetError(); e != "" {
			failure = e
		}
	}
}

func newServer(addrs map[string]string, nodes func() ([]string, []string), self *x509.Certificate) *Server {
	return New(testConfig, Options{Dialer: dialer{addrs: addrs}, Nodes: nodes, Self: func() *x509.Certificate { return self }})
}

var testConfig = Config{MaxClockSkew: 2 * time.Second, CertificateDays: 30, MaxWait: time.Minute, MaxNodes: 10, MaxRunning: 2, MaxRunningPerIdentity: 2}

func TestHealthyCluster(t *testing.T) {
	t.Parallel()
	addrs := map[string]string{
		"cp-1": serveNode(t, &fakeNode{tag: "v1.13.9"}),
		"cp-2": serveNode(t, &fakeNode{tag: "v1.13.9", skew: 500 * time.Millisecond}),
		"w-1":  serveNode(t, &fakeNode{tag: "v1.13.9"}),
	}
	inv := func() ([]string, []string) { return []string{"cp-1", "cp-2"}, []string{"w-1"} }
	s := newServer(addrs, inv, cert(time.Now().Add(365*24*time.Hour)))
	lines, failure := check(t, s, &cluster.HealthCheckRequest{})
	if failure != "" {
		t.Fatalf("failed: %s\n%s", failure, strings.Join(lines, "\n"))
	}
	want := []string{
		"checking 3 nodes through apid: cp-1, cp-2, w-1",
		"waiting for all nodes to answer through apid: OK",
		"waiting for all nodes to report the same version: OK",
		"waiting for node clocks to agree within 2s: OK",
		"waiting for node certificates to be valid for 30 more days: OK",
		"all checks passed",
	}
	if strings.Join(lines, "\n") != strings.Join(want, "\n") {
		t.Fatalf("lines:\n%s", strings.Join(lines, "\n"))
	}
	// The request's nodes replace the inventory's.
	lines, failure = check(t, s, &cluster.HealthCheckRequest{ClusterInfo: &cluster.ClusterInfo{WorkerNodes: []string{"w-1"}}})
	if failure != "" || lines[0] != "checking 1 node through apid: w-1" {
		t.Fatalf("%q %s", lines, failure)
	}
}

func TestUnhealthyClusters(t *testing.T) {
	t.Parallel()
	good := serveNode(t, &fakeNode{tag: "v1.13.9"})
	// A port nothing listens on (1, tcpmux, is unused on Linux): a node
	// that is down.
	down := "127.0.0.1:1"
	year := cert(time.Now().Add(365 * 24 * time.Hour))
	for _, tc := range []struct {
		name  string
		nodes map[string]string
		self  *x509.Certificate
		want  string
	}{
		{"down", map[string]string{"cp-1": good, "cp-2": down}, year,
			"node cp-2 does not answer through apid within 4s (check: reachability): Unavailable"},
		{"unknown", map[string]string{"cp-1": good}, year,
			`node cp-2 does not answer through apid within 4s (check: reachability): NotFound: node "cp-2" is not in the inventory`},
		{"versions", map[string]string{"cp-1": good, "cp-2": serveNode(t, &fakeNode{tag: "v1.12.0"}), "w-1": good}, year,
			"nodes report different versions (check: version): most run v1.13.9; cp-2 runs v1.12.0"},
		{"clock", map[string]string{"cp-1": good, "cp-2": serveNode(t, &fakeNode{tag: "v1.13.9", skew: -10 * time.Second})}, year,
			"off apid's, more than 2s (check: clock)"},
		{"certificate", map[string]string{"cp-1": good, "cp-2": good}, cert(time.Now().Add(10 * 24 * time.Hour)),
			"node cp-1: certificate \"node\" expires"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := newServer(tc.nodes, nil, tc.self)
			info := &cluster.ClusterInfo{ControlPlaneNodes: []string{"cp-1", "cp-2"}}
			if _, ok := tc.nodes["w-1"]; ok {
				info.WorkerNodes = []string{"w-1"}
			}
			// 4 s: a first round that a loaded machine slows past the
			// wait would leave only the cut-off attempt to report.
			const wait = 4 * time.Second
			start := time.Now()
			lines, failure := check(t, s, &cluster.HealthCheckRequest{WaitTimeout: durationpb.New(wait), ClusterInfo: info})
			if !strings.Contains(failure, tc.want) {
				t.Fatalf("failure %q, want %q\n%s", failure, tc.want, strings.Join(lines, "\n"))
			}
			// It gives up once the wait is over, not an attempt later.
			if took := time.Since(start); took > wait+attemptTimeout {
				t.Errorf("took %s", took)
			}
		})
	}
}

// TestCutOffAttemptKeepsTheFinding: when the wait ends during an
// attempt, the failure reported is what the node said before, not the
// deadline that cut the last attempt short.
func TestCutOffAttemptKeepsTheFinding(t *testing.T) {
	t.Parallel()
	s := newServer(map[string]string{"cp-1": serveNode(t, &fakeNode{tag: "v1.13.9"}), "cp-2": serveNode(t, &fakeNode{refuseThenHang: true})}, nil, nil)
	_, failure := check(t, s, &cluster.HealthCheckRequest{WaitTimeout: durationpb.New(3 * time.Second),
		ClusterInfo: &cluster.ClusterInfo{ControlPlaneNodes: []string{"cp-1", "cp-2"}}})
	if !strings.Contains(failure, "node cp-2 does not answer through apid within 3s (check: reachability): Unavailable: first refusal") {
		t.Fatalf("failure %q, want the node's refusal", failure)
	}
}

func TestNoNodes(t *testing.T) {
	t.Parallel()
	s := newServer(nil, func() ([]string, []string) { return nil, nil }, nil)
	_, failure := check(t, s, &cluster.HealthCheckRequest{})
	if !strings.Contains(failure, "no nodes to check") {
		t.Fatalf("failure %q", failure)
	}
}

// TestConvergingClusterPasses: the nodes are asked again in each round, so
// a node that finishes its upgrade within the wait passes the check.
func TestConvergingClusterPasses(t *testing.T) {
	t.Parallel()
	addrs := map[string]string{
		"cp-1": serveNode(t, &fakeNode{tag: "v1.13.9"}),
		"cp-2": serveNode(t, &fakeNode{tag: "v1.13.8", upgraded: "v1.13.9", upgradedAt: time.Now().Add(1500 * time.Millisecond)}),
	}
	s := newServer(addrs, func() ([]string, []string) { return []string{"cp-1", "cp-2"}, nil }, cert(time.Now().Add(365*24*time.Hour)))
	lines, failure := check(t, s, &cluster.HealthCheckRequest{WaitTimeout: durationpb.New(10 * time.Second)})
	if failure != "" || !strings.Contains(strings.Join(lines, "\n"), "nodes report different versions") || lines[len(lines)-1] != "all checks passed" {
		t.Fatalf("failure %q\n%s", failure, strings.Join(lines, "\n"))
	}
}

// TestCheckBounds: the wait is capped, the nodes are bounded, the checks
// running at once are bounded, and what the caller may not call ends the
// check at once.
func TestCheckBounds(t *testing.T) {
	t.Parallel()
	good := serveNode(t, &fakeNode{tag: "v1.13.9"})
	year := cert(time.Now().Add(365 * 24 * time.Hour))
	cfg := testConfig
	cfg.MaxWait = time.Second
	s := New(cfg, Options{Dialer: dialer{addrs: map[string]string{"cp-1": good, "cp-2": "127.0.0.1:1"}}, Self: func() *x509.Certificate { return year },
		Admission: byHeader{l: limits.New(limits.DefaultConfig(), time.Second, nil), admitted: new(atomic.Int64)}})

	start := time.Now()
	lines, failure := check(t, s, &cluster.HealthCheckRequest{WaitTimeout: durationpb.New(time.Hour),
		ClusterInfo: &cluster.ClusterInfo{ControlPlaneNodes: []string{"cp-1", "cp-2"}}})
	if !strings.Contains(failure, "within 1s") || lines[1] != "waiting at most 1s (this apid's health.maxWait), not the 1h0m0s asked for" {
		t.Fatalf("capped wait: %q\n%s", failure, strings.Join(lines, "\n"))
	}
	if took := time.Since(start); took > 1*time.Second+attemptTimeout {
		t.Errorf("took %s", took)
	}

	many := make([]string, 11)
	for i := range many {
		many[i] = fmt.Sprintf("n-%d", i)
	}
	if _, failure := check(t, s, &cluster.HealthCheckRequest{ClusterInfo: &cluster.ClusterInfo{WorkerNodes: many}}); !strings.Contains(failure, "at most 10 (maxNodes)") {
		t.Errorf("11 nodes: %q", failure)
	}

	// Two checks waiting on a dead node fill MaxRunning (2): a third is
	// refused.
	cfg.MaxWait = 3 * time.Second
	_ = s.Apply(cfg)
	done := make(chan struct{}, 2)
	for range 2 {
		go func() {
			defer func() { done <- struct{}{} }()
			check(t, s, &cluster.HealthCheckRequest{ClusterInfo: &cluster.ClusterInfo{ControlPlaneNodes: []string{"cp-2"}}})
		}()
	}
	if !testkit.Eventually(5*time.Second, func() bool { return s.running.Load() == 2 }) {
		t.Fatal("the two checks did not start")
	}
	_, err := checkErr(t, s)
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "2 cluster health checks are running") {
		t.Errorf("third check: %v", err)
	}
	<-done
	<-done

	// One identity may run MaxRunningPerIdentity checks: with it at 1, a
	// second check of the same caller is refused while another caller's
	// runs; and each node call is admitted as the caller's own.
	cfg.MaxRunning, cfg.MaxRunningPerIdentity = 4, 1
	var admitted atomic.Int64
	perID := New(cfg, Options{Dialer: dialer{addrs: map[string]string{"cp-1": good, "cp-2": "127.0.0.1:1"}}, Self: func() *x509.Certificate { return year },
		Admission: byHeader{l: limits.New(limits.DefaultConfig(), time.Second, nil), admitted: &admitted},
	})
	busy := make(chan struct{})
	go func() {
		defer close(busy)
		checkAs(t, perID, "reader", []string{"cp-2"})
	}()
	if !testkit.Eventually(5*time.Second, func() bool { return perID.running.Load() == 1 }) {
		t.Fatal("the first check did not start")
	}
	if _, err := checkAs(t, perID, "reader", []string{"cp-1"}); status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "maxRunningPerIdentity") {
		t.Errorf("the same caller's second check: %v", err)
	}
	if failure, err := checkAs(t, perID, "admin", []string{"cp-1"}); err != nil || failure != "" {
		t.Errorf("another caller's check: %q, %v", failure, err)
	}
	<-busy
	if admitted.Load() < 2 {
		t.Errorf("%d node calls admitted as the caller's", admitted.Load())
	}

	// A caller who may not read the time fails at the clock check, now.
	denyTime := New(testConfig, Options{Dialer: dialer{addrs: map[string]string{"cp-1": good}}, Self: func() *x509.Certificate { return year }, Authorize: func(_ context.Context, m string) error {
		if m == methodTime {
			return status.Error(codes.PermissionDenied, m+" needs one of the roles os:reader")
		}
		return nil
	}})
	start = time.Now()
	_, failure = check(t, denyTime, &cluster.HealthCheckRequest{WaitTimeout: durationpb.New(30 * time.Second),
		ClusterInfo: &cluster.ClusterInfo{ControlPlaneNodes: []string{"cp-1"}}})
	if !strings.Contains(failure, "node cp-1: cannot read its clock (check: clock): PermissionDenied") || time.Since(start) > 5*time.Second {
		t.Errorf("denied Time: %q after %s", failure, time.Since(start))
	}
}

// checkErr starts a check and returns the status it ends with before any
// message.
func checkErr(t *testing.T, s *Server) (*cluster.HealthCheckProgress, error) {
	t.Helper()
	stream, err := open(t, s, &cluster.HealthCheckRequest{ClusterInfo: &cluster.ClusterInfo{ControlPlaneNodes: []string{"cp-1"}}})
	if err != nil {
		return nil, err
	}
	return stream.Recv()
}

// checkAs runs a check as caller (its identity carried in x-who) and
// returns its failure line, or the status it ended with.
func checkAs(t *testing.T, s *Server, caller string, nodes []string) (string, error) {
	t.Helper()
	ctx := metadata.AppendToOutgoingContext(t.Context(), "x-who", caller)
	stream, err := openCtx(t, ctx, s, &cluster.HealthCheckRequest{
		WaitTimeout: durationpb.New(3 * time.Second), ClusterInfo: &cluster.ClusterInfo{ControlPlaneNodes: nodes}})
	if err != nil {
		return "", err
	}
	_, failure, err := drain(stream)
	return failure, err
}

// byHeader admits checks through the limits section, naming the caller by
// the x-who header, and counts the node calls admitted as the caller's.
type byHeader struct {
	l        *limits.Limits
	admitted *atomic.Int64
}

func (b byHeader) AdmitCheck(ctx context.Context, maxRunning, perIdentity int) (func(), error) {
	md, _ := metadata.FromIncomingContext(ctx)
	return b.l.AdmitCheck(strings.Join(md.Get("x-who"), ""), maxRunning, perIdentity)
}

func (b byHeader) AdmitCall(context.Context) (func(), error) {
	b.admitted.Add(1)
	return func() {}, nil
}
