package proxy_test

import (
	"context"
	"io"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/proxy"
)

// meter is a Budget that records what the proxy holds and can refuse.
type meter struct {
	held, peak atomic.Int64
	full       atomic.Bool
}

func (m *meter) Admit() error {
	if m.full.Load() {
		return status.Error(codes.ResourceExhausted, "budget spent")
	}
	return nil
}

func (m *meter) Hold(n int64) {
	h := m.held.Add(n)
	if h < 0 {
		panic("the proxy released more than it held")
	}
	for p := m.peak.Load(); h > p && !m.peak.CompareAndSwap(p, h); p = m.peak.Load() {
	}
}

// settles waits (bounded) for what is held to return to zero: the handler
// may still be releasing after the client saw the end of its call.
func (m *meter) settles(t *testing.T, what string) {
	t.Helper()
	for deadline := time.Now().Add(5 * time.Second); m.held.Load() != 0; {
		if time.Now().After(deadline) {
			t.Fatalf("%s: %d bytes still held after the call ended", what, m.held.Load())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestBudgetRefusesNewCallsBeforeAnyBackend(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{}, "a", "b")
	m := &meter{}
	m.full.Store(true)
	for _, route := range []proxy.Route{{Backends: bs[:1]}, {Backends: bs, Mode: proxy.OneToMany}} {
		c := startProxy(t, route, proxy.Options{Budget: m})
		_, err := c.Version(testkit.Context(t), &emptypb.Empty{})
		if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "budget spent") {
			t.Fatalf("call with the budget spent: %v, want the budget's ResourceExhausted", err)
		}
	}
	if n := servers[0].Calls() + servers[1].Calls(); n != 0 {
		t.Fatalf("%d calls reached a backend although the budget refused them", n)
	}
}

// TestBudgetCountsWhatCallsHoldAndReleasesIt runs every kind of call,
// including ones that fail or are cancelled midway, and checks that the
// proxy reported holding bytes while they ran and holds nothing after.
func TestBudgetCountsWhatCallsHoldAndReleasesIt(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{Payload: 40 << 10, StreamMessages: 20}, "a", "b", "c")
	_, dead := backends(t, testbackend.Behaviour{Fail: codes.Unavailable}, "dead")
	m := &meter{}
	opts := proxy.Options{Budget: m, NodeBuffer: 64 << 10}
	one := startProxy(t, proxy.Route{Backends: bs[:1]}, opts)
	many := startProxy(t, proxy.Route{Backends: append(bs, dead...), Mode: proxy.OneToMany}, opts)
	manyStream := startProxy(t, proxy.Route{Backends: append(bs, dead...), Mode: proxy.OneToMany, Kind: proxy.ServerStream}, opts)

	drain := func(s interface{ Recv() (*common.Data, error) }) int {
		n := 0
		for {
			if _, err := s.Recv(); err != nil {
				if err != io.EOF {
					t.Fatal(err)
				}
				return n
			}
			n++
		}
	}
	for _, tc := range []struct {
		name string
		call func(ctx context.Context) error
	}{
		{"one-to-one unary", func(ctx context.Context) error { _, err := one.Version(ctx, &emptypb.Empty{}); return err }},
		{"one-to-one stream", func(ctx context.Context) error {
			s, err := one.Dmesg(ctx, &machine.DmesgRequest{})
			if err == nil && drain(s) != 20 {
				t.Error("one-to-one stream lost messages")
			}
			return err
		}},
		{"fan-out unary with a failed node", func(ctx context.Context) error {
			r, err := many.Version(ctx, &emptypb.Empty{})
			if err == nil && len(r.Messages) != 4 {
				t.Errorf("fan-out gave %d entries, want 4", len(r.Messages))
			}
			return err
		}},
		{"fan-out stream with a failed node", func(ctx context.Context) error {
			s, err := manyStream.Dmesg(ctx, &machine.DmesgRequest{})
			if err == nil && drain(s) != 61 {
				t.Error("fan-out stream lost messages")
			}
			return err
		}},
		{"fan-out stream cancelled by its client", func(ctx context.Context) error {
			ctx, cancel := context.WithCancel(ctx)
			defer cancel()
			s, err := manyStream.Dmesg(ctx, &machine.DmesgRequest{})
			for err == nil { // the dead node's error entry may come first
				var d *common.Data
				if d, err = s.Recv(); err == nil && len(d.Bytes) > 0 {
					return nil
				}
			}
			return err
		}},
	} {
		m.peak.Store(0)
		if err := tc.call(testkit.Context(t)); err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		m.settles(t, tc.name)
		if m.peak.Load() < 40<<10 {
			t.Errorf("%s: peak held %d bytes, want at least one 40 KiB message counted", tc.name, m.peak.Load())
		}
		// Three nodes may each queue one NodeBuffer plus the message in
		// hand; the rest waits in the transport.
		if max := int64(3 * (2*64<<10 + 41<<10)); m.peak.Load() > max {
			t.Errorf("%s: peak held %d bytes, over the %d the node buffers allow", tc.name, m.peak.Load(), max)
		}
	}
	for _, s := range servers {
		select {
		case <-s.Ended():
		case <-time.After(10 * time.Second):
			t.Fatalf("backend %s still streaming after its call was cancelled", s.Name)
		}
	}
}
