package proxy_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/proxy"
)

// lending is a backend that lends its connection for each call and
// checks that the proxy gives it back only once the call has returned:
// a pool that closes a connection on release (one that never became
// ready) must not cut the call short and change the error it ends with.
type lending struct {
	name     string
	conn     grpc.ClientConnInterface
	inUse    atomic.Int64 // calls between start and return
	early    atomic.Int64 // releases while a call was still in use
	released atomic.Int64
}

func (l *lending) Name() string { return l.name }
func (l *lending) Connect(ctx context.Context, _ string) (context.Context, grpc.ClientConnInterface, func(), error) {
	return ctx, watched{l}, func() {
		if l.inUse.Load() > 0 {
			l.early.Add(1)
		}
		l.released.Add(1)
	}, nil
}

// watched counts the calls in progress on the lent connection.
type watched struct{ l *lending }

func (w watched) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	w.l.inUse.Add(1)
	defer w.l.inUse.Add(-1)
	return w.l.conn.Invoke(ctx, method, args, reply, opts...)
}

func (w watched) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	return w.l.conn.NewStream(ctx, desc, method, opts...)
}

// TestConnectionsAreReleasedAfterTheCallReturns runs fan-out calls whose
// per-node deadline expires (the moment the call's context ends is also
// the moment the call itself gives up) and checks every lent connection
// came back after its call returned, never before. (Streams are cancelled
// by the proxy before their connection is released.)
func TestConnectionsAreReleasedAfterTheCallReturns(t *testing.T) {
	servers, _ := backends(t, testbackend.Behaviour{Hang: true}, "slow")
	l := &lending{name: "slow", conn: dial(t, servers[0].Addr)}
	c := startProxy(t, proxy.Route{Backends: []proxy.Backend{l}, Mode: proxy.OneToMany, NodeTimeout: 10 * time.Millisecond}, proxy.Options{})
	for range 40 {
		if _, err := c.Version(testkit.Context(t), &emptypb.Empty{}); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(5 * time.Second); l.released.Load() < 40 && time.Now().Before(deadline); {
		time.Sleep(5 * time.Millisecond)
	}
	if l.released.Load() != 40 || l.early.Load() != 0 {
		t.Fatalf("%d of 40 connections released, %d of them while their call was still running", l.released.Load(), l.early.Load())
	}
}
