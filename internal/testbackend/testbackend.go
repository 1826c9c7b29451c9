// Package testbackend is a node agent for tests and benchmarks whose
// behaviour can be set per call: slow, failing, hanging, flooding, dying
// mid-stream. It serves the Talos MachineService types (Version, Dmesg,
// Logs, EtcdRecover) so that replies decode with the real Talos client, and
// the cluster's members through Talos's resource API (SetMembers).
package testbackend

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Behaviour is what the backend does on its next calls.
type Behaviour struct {
	// Delay holds every reply back this long (or until the call ends).
	Delay time.Duration
	// Hang holds every reply until the call ends.
	Hang bool
	// Fail makes calls end with this code (and FailMessage) at once.
	Fail        codes.Code
	FailMessage string
	// Entries is the number of entries in a unary reply. Default 1.
	Entries int
	// Payload is the size of the filler in each unary entry (Version.Sha)
	// and each streamed message. Default 16.
	Payload int
	// StreamMessages is how many messages Dmesg sends. Default 3.
	StreamMessages int
	// FailAfter, when > 0, ends a stream with Unavailable after that many
	// messages.
	FailAfter int
	// Stuck, with streams, sends the first message then hangs until the
	// call ends.
	Stuck bool
}

// Server is one test backend.
type Server struct {
	machine.UnimplementedMachineServiceServer
	Name string
	Addr string

	behaviour atomic.Pointer[Behaviour]
	calls     atomic.Int64
	active    atomic.Int64
	sent      atomic.Int64
	ended     chan struct{}
	grpc      *grpc.Server

	mu      sync.Mutex
	lastMD  metadata.MD
	payload []byte

	members *members
}

// Start serves a backend named name on a fresh 127.0.0.1 port until the
// test ends.
func Start(tb testing.TB, name string, b Behaviour) *Server {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	s := New(name, b)
	s.Addr = lis.Addr().String()
	go func() { _ = s.grpc.Serve(lis) }()
	tb.Cleanup(s.grpc.Stop)
	return s
}

// New returns a backend not yet serving; Register it on a server or use
// Serve.
func New(name string, b Behaviour) *Server {
	s := &Server{Name: name, ended: make(chan struct{}, 1024), grpc: grpc.NewServer(grpc.MaxRecvMsgSize(64<<20), grpc.MaxSendMsgSize(64<<20)),
		members: newMembers()}
	s.Set(b)
	machine.RegisterMachineServiceServer(s.grpc, s)
	s.members.register(s.grpc)
	return s
}

// Serve serves lis until Stop.
func (s *Server) Serve(lis net.Listener) error {
	s.Addr = lis.Addr().String()
	return s.grpc.Serve(lis)
}

// Stop stops the backend at once, breaking running calls (a crash).
func (s *Server) Stop() { s.grpc.Stop() }

// Set changes the behaviour of the calls that start from now on.
func (s *Server) Set(b Behaviour) {
	if b.Entries == 0 {
		b.Entries = 1
	}
	if b.Payload == 0 {
		b.Payload = 16
	}
	if b.StreamMessages == 0 {
		b.StreamMessages = 3
	}
	s.behaviour.Store(&b)
	s.mu.Lock()
	s.payload = []byte(strings.Repeat("x", b.Payload))
	s.mu.Unlock()
}

// Calls returns how many calls the backend received.
func (s *Server) Calls() int64 { return s.calls.Load() }

// Sent returns how many streamed messages the backend has handed to gRPC.
func (s *Server) Sent() int64 { return s.sent.Load() }

// Active returns how many calls are running now.
func (s *Server) Active() int64 { return s.active.Load() }

// Ended receives once for every call that has returned (up to 1,024
// unread), so tests can wait for a backend's call to end without polling.
func (s *Server) Ended() <-chan struct{} { return s.ended }

func (s *Server) end() {
	s.active.Add(-1)
	select {
	case s.ended <- struct{}{}:
	default:
	}
}

// LastMetadata returns the incoming metadata of the latest call.
func (s *Server) LastMetadata() metadata.MD {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastMD.Copy()
}

// begin records a call, sends the identifying header and applies the
// common behaviour; it returns the behaviour for the rest of the call.
func (s *Server) begin(ctx context.Context) (*Behaviour, []byte, error) {
	s.calls.Add(1)
	md, _ := metadata.FromIncomingContext(ctx)
	s.mu.Lock()
	s.lastMD = md
	payload := s.payload
	s.mu.Unlock()
	b := s.behaviour.Load()
	_ = grpc.SetHeader(ctx, metadata.Pairs("x-backend", s.Name))
	_ = grpc.SetTrailer(ctx, metadata.Pairs("x-backend-trailer", s.Name))
	if b.Fail != codes.OK {
		msg := b.FailMessage
		if msg == "" {
			msg = s.Name + " fails on purpose"
		}
		return b, nil, status.Error(b.Fail, msg)
	}
	if err := wait(ctx, b); err != nil {
		return b, nil, err
	}
	return b, payload, nil
}

func wait(ctx context.Context, b *Behaviour) error {
	switch {
	case b.Hang:
		<-ctx.Done()
		return status.FromContextError(ctx.Err()).Err()
	case b.Delay > 0:
		t := time.NewTimer(b.Delay)
		defer t.Stop()
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-t.C:
		}
	}
	return nil
}

// Version replies with Entries entries whose Tag is the backend's name and
// whose Sha is Payload bytes of filler.
func (s *Server) Version(ctx context.Context, _ *emptypb.Empty) (*machine.VersionResponse, error) {
	s.active.Add(1)
	defer s.end()
	b, payload, err := s.begin(ctx)
	if err != nil {
		return nil, err
	}
	resp := &machine.VersionResponse{Messages: make([]*machine.Version, b.Entries)}
	for i := range resp.Messages {
		resp.Messages[i] = &machine.Version{Version: &machine.VersionInfo{Tag: fmt.Sprintf("%s/%d", s.Name, i), Sha: string(payload)}}
	}
	return resp, nil
}

// Dmesg streams StreamMessages messages of Payload bytes, each starting
// with "<name> <index> ".
func (s *Server) Dmesg(_ *machine.DmesgRequest, stream machine.MachineService_DmesgServer) error {
	s.active.Add(1)
	defer s.end()
	ctx := stream.Context()
	b, payload, err := s.begin(ctx)
	if err != nil {
		return err
	}
	for i := 0; i < b.StreamMessages; i++ {
		if b.FailAfter > 0 && i == b.FailAfter {
			return status.Errorf(codes.Unavailable, "%s died after %d messages", s.Name, i)
		}
		msg := append([]byte(fmt.Sprintf("%s %d ", s.Name, i)), payload...)
		if err := stream.Send(&common.Data{Bytes: msg}); err != nil {
			return err
		}
		s.sent.Add(1)
		if b.Stuck {
			<-ctx.Done()
			return status.FromContextError(ctx.Err()).Err()
		}
	}
	return nil
}

// Logs streams StreamMessages messages as Dmesg does, after the headers
// (which mark where a follower starts); with Follow it then holds the
// stream, as a follower waiting for new lines, until the call ends.
func (s *Server) Logs(req *machine.LogsRequest, stream machine.MachineService_LogsServer) error {
	s.active.Add(1)
	defer s.end()
	ctx := stream.Context()
	b, payload, err := s.begin(ctx)
	if err != nil {
		return err
	}
	if err := stream.SendHeader(nil); err != nil {
		return err
	}
	for i := 0; i < b.StreamMessages; i++ {
		if err := stream.Send(&common.Data{Bytes: append([]byte(fmt.Sprintf("%s %d ", s.Name, i)), payload...)}); err != nil {
			return err
		}
		s.sent.Add(1)
	}
	if !req.GetFollow() {
		return nil
	}
	<-ctx.Done()
	return status.FromContextError(ctx.Err()).Err()
}

// GenerateClientConfiguration refuses, as a node that holds no client CA
// does.
func (s *Server) GenerateClientConfiguration(ctx context.Context, _ *machine.GenerateClientConfigurationRequest) (*machine.GenerateClientConfigurationResponse, error) {
	s.active.Add(1)
	defer s.end()
	if _, _, err := s.begin(ctx); err != nil {
		return nil, err
	}
	return nil, status.Errorf(codes.FailedPrecondition, "%s holds no client CA", s.Name)
}

// EtcdRecover reads the upload and reports its size and SHA-256 in the
// trailer.
func (s *Server) EtcdRecover(stream machine.MachineService_EtcdRecoverServer) error {
	s.active.Add(1)
	defer s.end()
	if _, _, err := s.begin(stream.Context()); err != nil {
		return err
	}
	h := sha256.New()
	var n int
	for {
		d, err := stream.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			return err
		}
		n += len(d.GetBytes())
		h.Write(d.GetBytes())
	}
	stream.SetTrailer(metadata.Pairs("x-received-bytes", fmt.Sprint(n), "x-received-sha256", hex.EncodeToString(h.Sum(nil))))
	return stream.SendAndClose(&machine.EtcdRecoverResponse{Messages: []*machine.EtcdRecover{{}}})
}
