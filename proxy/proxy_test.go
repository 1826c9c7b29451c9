package proxy_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/proxy"
)

func TestMain(m *testing.M) {
	// Idle fan-out workers exit on their own after a few seconds.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/apid/apid/proxy.(*workers).loop"))
}

// target is a backend of the static director: a name and a connection.
type target struct {
	name string
	conn grpc.ClientConnInterface
	err  error
}

func (t target) Name() string { return t.name }
func (t target) Connect(ctx context.Context, _ string) (context.Context, grpc.ClientConnInterface, func(), error) {
	return ctx, t.conn, nil, t.err
}

// staticDirector routes every call the same way.
type staticDirector struct{ route proxy.Route }

func (d staticDirector) Route(context.Context, string) (proxy.Route, error) { return d.route, nil }

// dial connects to addr in plaintext and closes the connection with the test.
func dial(t *testing.T, addr string) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// startProxy serves a proxy with route and returns a MachineService client
// of it.
func startProxy(t *testing.T, route proxy.Route, opts proxy.Options, extra ...grpc.ServerOption) machine.MachineServiceClient {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	h := proxy.NewHandler(staticDirector{route}, opts)
	srv := grpc.NewServer(append([]grpc.ServerOption{grpc.ForceServerCodecV2(proxy.Codec()), grpc.UnknownServiceHandler(h.StreamHandler())}, extra...)...)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return machine.NewMachineServiceClient(dial(t, lis.Addr().String()))
}

// backends starts one test backend per name.
func backends(t *testing.T, behaviour testbackend.Behaviour, names ...string) ([]*testbackend.Server, []proxy.Backend) {
	var servers []*testbackend.Server
	var targets []proxy.Backend
	for _, n := range names {
		s := testbackend.Start(t, n, behaviour)
		servers = append(servers, s)
		targets = append(targets, target{name: n, conn: dial(t, s.Addr)})
	}
	return servers, targets
}

// deadAddress returns a loopback address nothing listens on.
func deadAddress(t *testing.T) string {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := lis.Addr().String()
	lis.Close()
	return addr
}

func TestOneToOneUnaryKeepsBytesHeadersAndTrailers(t *testing.T) {
	_, bs := backends(t, testbackend.Behaviour{Entries: 2}, "n1")
	c := startProxy(t, proxy.Route{Backends: bs}, proxy.Options{})
	var header, trailer metadata.MD
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{}, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Messages) != 2 || resp.Messages[0].Version.Tag != "n1/0" || resp.Messages[0].Metadata != nil {
		t.Fatalf("one-to-one reply changed: %v", resp)
	}
	if got := header.Get("x-backend"); len(got) != 1 || got[0] != "n1" {
		t.Errorf("header x-backend = %v", got)
	}
	if got := trailer.Get("x-backend-trailer"); len(got) != 1 || got[0] != "n1" {
		t.Errorf("trailer x-backend-trailer = %v", got)
	}
}

func TestOneToOneKeepsBackendStatus(t *testing.T) {
	_, bs := backends(t, testbackend.Behaviour{Fail: codes.NotFound, FailMessage: "no such service"}, "n1")
	c := startProxy(t, proxy.Route{Backends: bs}, proxy.Options{})
	_, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if st := status.Convert(err); st.Code() != codes.NotFound || st.Message() != "no such service" {
		t.Fatalf("status = %v", st)
	}
}

func TestOneToOneUnreachableBackendIsUnavailable(t *testing.T) {
	c := startProxy(t, proxy.Route{Backends: []proxy.Backend{target{name: "dead", conn: dial(t, deadAddress(t))}}}, proxy.Options{})
	_, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("err = %v, want Unavailable", err)
	}
}

func TestOneToOneServerStream(t *testing.T) {
	_, bs := backends(t, testbackend.Behaviour{StreamMessages: 50, Payload: 1000}, "n1")
	c := startProxy(t, proxy.Route{Backends: bs}, proxy.Options{})
	stream, err := c.Dmesg(testkit.Context(t), &machine.DmesgRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		d, err := stream.Recv()
		if err == io.EOF {
			if i != 50 {
				t.Fatalf("%d messages, want 50", i)
			}
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("n1 %d ", i); !bytes.HasPrefix(d.Bytes, []byte(want)) || d.Metadata != nil {
			t.Fatalf("message %d = %.20q…, metadata %v", i, d.Bytes, d.Metadata)
		}
	}
}

func TestOneToOneClientStreamUpload(t *testing.T) {
	_, bs := backends(t, testbackend.Behaviour{}, "n1")
	c := startProxy(t, proxy.Route{Backends: bs, Kind: proxy.ClientStream}, proxy.Options{})
	stream, err := c.EtcdRecover(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	for i := 0; i < 100; i++ {
		chunk := bytes.Repeat([]byte{byte(i)}, 4096)
		h.Write(chunk)
		if err := stream.Send(&common.Data{Bytes: chunk}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := stream.CloseAndRecv(); err != nil {
		t.Fatal(err)
	}
	tr := stream.Trailer()
	if got := tr.Get("x-received-bytes"); len(got) != 1 || got[0] != "409600" {
		t.Errorf("received bytes = %v", got)
	}
	if got := tr.Get("x-received-sha256"); len(got) != 1 || got[0] != hex.EncodeToString(h.Sum(nil)) {
		t.Errorf("received sha256 = %v", got)
	}
}

func TestOneToOneOversizedRequestIsRefused(t *testing.T) {
	_, bs := backends(t, testbackend.Behaviour{}, "n1")
	c := startProxy(t, proxy.Route{Backends: bs}, proxy.Options{}, grpc.MaxRecvMsgSize(1024))
	stream, err := c.EtcdRecover(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(&common.Data{Bytes: make([]byte, 4096)})
	_, err = stream.CloseAndRecv()
	if status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("err = %v, want ResourceExhausted", err)
	}
}

func versionEntries(t *testing.T, resp *machine.VersionResponse) map[string]*machine.Version {
	t.Helper()
	out := map[string]*machine.Version{}
	for _, m := range resp.Messages {
		if m.Metadata == nil {
			t.Fatalf("entry without metadata: %v", m)
		}
		out[m.Metadata.Hostname] = m
	}
	return out
}

func TestOneToManyUnaryStampsEveryEntryInRequestOrder(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{Entries: 2}, "n1", "n2", "n3")
	// The first node answers last: the reply order must still follow the request.
	servers[0].Set(testbackend.Behaviour{Entries: 2, Delay: 200 * time.Millisecond})
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany}, proxy.Options{})
	var header, trailer metadata.MD
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{}, grpc.Header(&header), grpc.Trailer(&trailer))
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, m := range resp.Messages {
		got = append(got, m.Metadata.GetHostname()+"="+m.Version.GetTag())
	}
	want := "n1=n1/0 n1=n1/1 n2=n2/0 n2=n2/1 n3=n3/0 n3=n3/1"
	if strings.Join(got, " ") != want {
		t.Fatalf("entries %v, want %s", got, want)
	}
	hs := header.Get("x-backend")
	sort.Strings(hs)
	if strings.Join(hs, ",") != "n1,n2,n3" {
		t.Errorf("merged header x-backend = %v", hs)
	}
	if ts := trailer.Get("x-backend-trailer"); len(ts) != 3 {
		t.Errorf("merged trailer x-backend-trailer = %v", ts)
	}
	if again := trailer.Get("x-backend"); len(again) != 0 {
		t.Errorf("headers repeated in the trailer: %v", again)
	}
}

func TestOneToManyUnaryFailuresBecomeErrorEntries(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{}, "ok", "fails", "hangs")
	servers[1].Set(testbackend.Behaviour{Fail: codes.PermissionDenied, FailMessage: "not for you"})
	servers[2].Set(testbackend.Behaviour{Hang: true})
	bs = append(bs, target{name: "dead", conn: dial(t, deadAddress(t))}, target{name: "refused", err: errors.New("no route")})
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, NodeTimeout: 300 * time.Millisecond}, proxy.Options{})
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	entries := versionEntries(t, resp)
	if len(entries) != 5 {
		t.Fatalf("%d entries, want 5: %v", len(entries), resp)
	}
	if e := entries["ok"]; e.Metadata.Error != "" || e.Version.GetTag() != "ok/0" {
		t.Errorf("ok entry = %v", e)
	}
	for name, code := range map[string]codes.Code{"fails": codes.PermissionDenied, "hangs": codes.DeadlineExceeded, "dead": codes.Unavailable, "refused": codes.Unavailable} {
		e := entries[name]
		if e.Metadata.Error == "" || codes.Code(e.Metadata.Status.GetCode()) != code || e.Version != nil {
			t.Errorf("%s entry = %v, want error with %v", name, e, code)
		}
	}
	// As Talos writes it: the status as grpc-go prints the error, and the
	// status itself.
	if e := entries["fails"].Metadata; e.Error != "rpc error: code = PermissionDenied desc = not for you" || e.Status.GetMessage() != "not for you" {
		t.Errorf("error text %q, status message %q", e.Error, e.Status.GetMessage())
	}
}

func TestOneToManyRefusesClientStreams(t *testing.T) {
	_, bs := backends(t, testbackend.Behaviour{}, "n1", "n2")
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, Kind: proxy.ClientStream}, proxy.Options{})
	stream, err := c.EtcdRecover(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	_ = stream.Send(&common.Data{Bytes: []byte("x")})
	if _, err := stream.CloseAndRecv(); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("err = %v, want InvalidArgument", err)
	}
}

func collectStream(t *testing.T, stream machine.MachineService_DmesgClient) (map[string][]string, map[string]*common.Metadata) {
	t.Helper()
	data := map[string][]string{}
	errs := map[string]*common.Metadata{}
	for {
		d, err := stream.Recv()
		if err == io.EOF {
			return data, errs
		}
		if err != nil {
			t.Fatalf("stream failed: %v", err)
		}
		host := d.Metadata.GetHostname()
		if d.Metadata.GetError() != "" {
			errs[host] = d.Metadata
			continue
		}
		data[host] = append(data[host], string(d.Bytes))
	}
}

func TestOneToManyStreamInterleavesAndReportsDeadNodes(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{StreamMessages: 20}, "n1", "n2", "dies")
	servers[2].Set(testbackend.Behaviour{StreamMessages: 20, FailAfter: 5})
	bs = append(bs, target{name: "dead", conn: dial(t, deadAddress(t))})
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, Kind: proxy.ServerStream}, proxy.Options{})
	stream, err := c.Dmesg(testkit.Context(t), &machine.DmesgRequest{})
	if err != nil {
		t.Fatal(err)
	}
	data, errs := collectStream(t, stream)
	for name, want := range map[string]int{"n1": 20, "n2": 20, "dies": 5} {
		if len(data[name]) != want {
			t.Errorf("%s: %d messages, want %d", name, len(data[name]), want)
		}
		for i, m := range data[name] {
			if !strings.HasPrefix(m, fmt.Sprintf("%s %d ", name, i)) {
				t.Errorf("%s message %d = %.20q: out of order or mislabelled", name, i, m)
			}
		}
	}
	if len(errs) != 2 || errs["dies"].GetStatus().GetCode() != int32(codes.Unavailable) || errs["dead"].GetStatus().GetCode() != int32(codes.Unavailable) {
		t.Errorf("error messages = %v", errs)
	}
}

func TestOneToManyStuckNodeDoesNotBlockOthersAndCancelReachesAll(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{StreamMessages: 10}, "n1", "n2", "stuck")
	servers[2].Set(testbackend.Behaviour{Stuck: true})
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, Kind: proxy.ServerStream}, proxy.Options{})
	ctx, cancel := context.WithCancel(testkit.Context(t))
	stream, err := c.Dmesg(ctx, &machine.DmesgRequest{})
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]int{}
	for got["n1"] < 10 || got["n2"] < 10 || got["stuck"] < 1 {
		d, err := stream.Recv()
		if err != nil {
			t.Fatalf("after %v: %v", got, err)
		}
		got[d.Metadata.GetHostname()]++
	}
	if servers[2].Active() != 1 {
		t.Fatalf("stuck backend has %d active calls, want 1", servers[2].Active())
	}
	cancel()
	if _, err := stream.Recv(); status.Code(err) != codes.Canceled {
		t.Fatalf("after cancel: %v", err)
	}
	// Every backend's stream ends once the proxy passes the cancellation on.
	select {
	case <-servers[2].Ended():
	case <-time.After(10 * time.Second):
		t.Fatal("stuck backend's call still running after the client cancelled")
	}
}

// TestOneToManyReplyKeysFiltered: with ReplyKey set, only the keys it
// allows reach the client of a fan-out; a one-to-one reply is untouched.
func TestOneToManyReplyKeysFiltered(t *testing.T) {
	_, bs := backends(t, testbackend.Behaviour{}, "n1", "n2")
	allow := func(k string) bool { return k == "x-backend" }
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany}, proxy.Options{ReplyKey: allow})
	var header, trailer metadata.MD
	if _, err := c.Version(testkit.Context(t), &emptypb.Empty{}, grpc.Header(&header), grpc.Trailer(&trailer)); err != nil {
		t.Fatal(err)
	}
	if len(header.Get("x-backend")) != 2 || len(trailer.Get("x-backend-trailer")) != 0 {
		t.Errorf("fan-out: header %v, trailer %v; want x-backend only", header, trailer)
	}
	one := startProxy(t, proxy.Route{Backends: bs[:1]}, proxy.Options{ReplyKey: allow})
	header, trailer = nil, nil
	if _, err := one.Version(testkit.Context(t), &emptypb.Empty{}, grpc.Header(&header), grpc.Trailer(&trailer)); err != nil {
		t.Fatal(err)
	}
	if len(trailer.Get("x-backend-trailer")) != 1 {
		t.Errorf("one-to-one trailer %v: want it untouched", trailer)
	}
}
