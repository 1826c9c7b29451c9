package proxy_test

import (
	"context"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/proxy"
)

// outcomes records what an Observer is told.
type outcomes struct {
	mu     sync.Mutex
	codes  []codes.Code
	routes int
	twice  int
}

func (o *outcomes) Routed(context.Context, string, proxy.Route) {
	o.mu.Lock()
	o.routes++
	o.mu.Unlock()
}

func (o *outcomes) BackendStarted(ctx context.Context, _ proxy.Backend, _ proxy.Kind) (context.Context, func(codes.Code, string, time.Duration)) {
	called := false
	return ctx, func(c codes.Code, _ string, _ time.Duration) {
		o.mu.Lock()
		defer o.mu.Unlock()
		if called {
			o.twice++ // a part settled twice: a bug the tests report
		}
		called = true
		o.codes = append(o.codes, c)
	}
}

func (o *outcomes) take() []codes.Code {
	o.mu.Lock()
	defer o.mu.Unlock()

	c := o.codes
	o.codes = nil
	slices.Sort(c)
	return c
}

// waitFor returns the outcomes once n have been reported (bounded: a
// stream's backends report as they wind down).
func (o *outcomes) waitFor(t *testing.T, n int) []codes.Code {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		o.mu.Lock()
		got, twice := len(o.codes), o.twice
		o.mu.Unlock()
		if twice > 0 {
			t.Fatalf("%d backend parts were settled twice", twice)
		}
		if got >= n || time.Now().After(deadline) {
			return o.take()
		}
	}
}

// TestObserverHearsTheCodesTheClientSaw: replies dropped on arrival or
// left out of an oversized merge are reported as ResourceExhausted, a
// malformed reply as Internal, and streams the client cancelled as
// Canceled, never as OK.
func TestObserverHearsTheCodesTheClientSaw(t *testing.T) {
	t.Run("unary", func(t *testing.T) {
		names := []string{"n0", "n1", "n2", "n3", "n4", "n5"}
		_, bs := backends(t, testbackend.Behaviour{Payload: 200 << 10}, names...)
		o := &outcomes{}
		c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany}, proxy.Options{MaxReplySize: 256 << 10, Observer: o})
		resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		var saw []codes.Code
		for _, m := range resp.Messages {
			saw = append(saw, codes.Code(m.Metadata.GetStatus().GetCode()))
		}
		slices.Sort(saw)
		if got := o.take(); !slices.Equal(got, saw) || len(got) != 6 || got[0] != codes.OK || got[5] != codes.ResourceExhausted {
			t.Fatalf("observer heard %v, the client saw %v", got, saw)
		}
	})

	t.Run("malformed", func(t *testing.T) {
		_, good := backends(t, testbackend.Behaviour{}, "good")
		bad := startRaw(t, []byte{0x08, 0x01}) // field 1 as a varint: not an entry
		o := &outcomes{}
		c := startProxy(t, proxy.Route{Backends: append(good, target{name: "bad", conn: dial(t, bad)}), Mode: proxy.OneToMany}, proxy.Options{Observer: o})
		if _, err := c.Version(testkit.Context(t), &emptypb.Empty{}); err != nil {
			t.Fatal(err)
		}
		if got := o.take(); !slices.Equal(got, []codes.Code{codes.OK, codes.Internal}) {
			t.Fatalf("observer heard %v, want OK and Internal", got)
		}
	})

	t.Run("stream cancelled by the client", func(t *testing.T) {
		_, bs := backends(t, testbackend.Behaviour{StreamMessages: 100000, Payload: 1 << 10}, "a", "b")
		o := &outcomes{}
		c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, Kind: proxy.ServerStream}, proxy.Options{Observer: o})
		ctx, cancel := context.WithCancel(testkit.Context(t))
		s, err := c.Dmesg(ctx, &machine.DmesgRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); err != nil {
			t.Fatal(err)
		}
		cancel()
		if got := o.waitFor(t, 2); !slices.Equal(got, []codes.Code{codes.Canceled, codes.Canceled}) {
			t.Fatalf("observer heard %v, want Canceled for both nodes", got)
		}
	})
}

// rawCodec sends []byte as they are and reads any message as bytes.
type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(*v.(*[]byte))}, nil
}
func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	*v.(*[]byte) = data.Materialize()
	return nil
}
func (rawCodec) Name() string { return "proto" }

// startRaw serves every method with reply, as it is, and returns the
// address.
func startRaw(t *testing.T, reply []byte) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.ForceServerCodecV2(rawCodec{}), grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
		var req []byte
		if err := ss.RecvMsg(&req); err != nil {
			return err
		}
		out := slices.Clone(reply)
		return ss.SendMsg(&out)
	}))
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return lis.Addr().String()
}
