package gateway

import (
	"context"
	"errors"
	"io"
	"net"
	"strconv"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/apid/apid/certs"
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
