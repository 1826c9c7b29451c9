package proxy_test

import (
	"context"
	"sync"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/proxy"
)

// gated is a target that waits for a gate: it records the request it was
// shown and how its part ended.
type gated struct {
	target
	refuse error

	mu       sync.Mutex
	request  []byte
	outcomes []proxy.Outcome
}

func (g *gated) Await(_ context.Context, request []byte) (func(proxy.Outcome), error) {
	g.mu.Lock()
	g.request = append([]byte(nil), request...)
	g.mu.Unlock()
	if g.refuse != nil {
		return nil, g.refuse
	}
	return func(o proxy.Outcome) {
		g.mu.Lock()
		defer g.mu.Unlock()
		o.Reply = append([]byte(nil), o.Reply...)
		g.outcomes = append(g.outcomes, o)
	}, nil
}

func (g *gated) outcome(t *testing.T) proxy.Outcome {
	t.Helper()
	g.mu.Lock()
	defer g.mu.Unlock()
	if len(g.outcomes) != 1 {
		t.Fatalf("%s: %d outcomes, want 1", g.name, len(g.outcomes))
	}
	return g.outcomes[0]
}

// TestGatedBackends: a gated backend is shown the request before anything
// is sent, a refusal is the call's (one-to-one) or that node's entry
// (fan-out), and the gate hears whether the call was sent, the node's
// code and its reply; a streaming method is never let past a gate.
func TestGatedBackends(t *testing.T) {
	_, ts := backends(t, testbackend.Behaviour{}, "node-a", "node-b")
	a := &gated{target: ts[0].(target)}
	c := startProxy(t, proxy.Route{Backends: []proxy.Backend{a}, Mode: proxy.OneToOne, Kind: proxy.Unary}, proxy.Options{})
	if _, err := c.Reboot(context.Background(), &machine.RebootRequest{Mode: machine.RebootRequest_POWERCYCLE}); status.Code(err) != codes.Unimplemented {
		t.Fatalf("reboot through the gate: %v", err)
	}
	if o := a.outcome(t); !o.Sent || o.Code != codes.Unimplemented {
		t.Errorf("one-to-one outcome %+v, want sent, Unimplemented", o)
	}
	if len(a.request) != 2 { // field 1 (mode), varint 1
		t.Errorf("the gate was shown %x", a.request)
	}

	// Refused at the gate: nothing sent, the gate's status.
	b := &gated{target: ts[1].(target), refuse: status.Error(codes.DeadlineExceeded, "held: not your turn")}
	c = startProxy(t, proxy.Route{Backends: []proxy.Backend{b}, Mode: proxy.OneToOne, Kind: proxy.Unary}, proxy.Options{})
	if _, err := c.Version(context.Background(), &emptypb.Empty{}); status.Code(err) != codes.DeadlineExceeded || status.Convert(err).Message() != "held: not your turn" {
		t.Errorf("refused at the gate: %v", err)
	}

	// Fan-out: a node that answers, one refused at its gate, one whose
	// connection fails (never sent).
	ok := &gated{target: ts[0].(target)}
	never := &gated{target: target{name: "node-c", err: status.Error(codes.Unavailable, "ejected")}}
	c = startProxy(t, proxy.Route{Backends: []proxy.Backend{ok, b, never}, Mode: proxy.OneToMany, Kind: proxy.Unary}, proxy.Options{})
	resp, err := c.Version(context.Background(), &emptypb.Empty{})
	if err != nil || len(resp.GetMessages()) != 3 {
		t.Fatalf("fan-out: %v, %v", resp, err)
	}
	if m := resp.GetMessages()[1].GetMetadata(); m.GetStatus().GetCode() != int32(codes.DeadlineExceeded) {
		t.Errorf("the refused node's entry: %v", m)
	}
	if o := ok.outcome(t); !o.Sent || o.Code != codes.OK || len(o.Reply) == 0 {
		t.Errorf("the answering node's outcome %+v", o)
	}
	if o := never.outcome(t); o.Sent {
		t.Errorf("a node never connected to was told sent: %+v", o)
	}

	// A gated streaming method is refused, not let past.
	s := startProxy(t, proxy.Route{Backends: []proxy.Backend{&gated{target: ts[0].(target)}}, Mode: proxy.OneToOne, Kind: proxy.ServerStream}, proxy.Options{})
	stream, err := s.Dmesg(metadata.AppendToOutgoingContext(context.Background()), &machine.DmesgRequest{})
	if err == nil {
		_, err = stream.Recv()
	}
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("a gated stream: %v", err)
	}
}
