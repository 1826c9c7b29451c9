package test

import (
	"context"
	"fmt"
	"net"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/client"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// blackHole accepts TCP connections on addr and never says a word: a node
// whose TLS handshake never completes.
func blackHole(t *testing.T, addr string) {
	t.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		<-done
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
}

func TestFanOutSurvivesANodeThatNeverAnswersTLS(t *testing.T) {
	c := startDemo(t, 78, 2)
	hole := "127.0.78.50"
	blackHole(t, net.JoinHostPort(hole, fmt.Sprint(c.port)))
	cl := c.client(t, c.endpoint(0))
	nodes := append(slices.Clone(c.nodes), hole)

	t.Run("the client's deadline still gets the partial reply", func(t *testing.T) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := cl.Version(client.WithNodes(ctx, nodes...))
		errs := nodeErrors(t, err)
		if len(errs) != 1 || errs[0].Node != hole {
			t.Fatalf("errors %v, want one for the black hole", err)
		}
		if resp == nil || len(resp.Messages) != 2 {
			t.Fatalf("reply %v, want both live nodes", resp)
		}
		if ctx.Err() != nil {
			t.Fatal("reply arrived after the client's deadline")
		}
	})

	t.Run("apid-node-timeout shortens the wait", func(t *testing.T) {
		ctx := metadata.AppendToOutgoingContext(client.WithNodes(testkit.Context(t), nodes...), "apid-node-timeout", "1s")
		start := time.Now()
		resp, err := cl.MachineClient.Version(ctx, &emptypb.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		// The demo's own per-node deadline is 10 s: returning sooner shows
		// the client's shorter one was used.
		if elapsed := time.Since(start); elapsed >= 10*time.Second {
			t.Fatalf("took %v", elapsed)
		}
		var bad []string
		for _, m := range resp.Messages {
			if m.Metadata.GetError() != "" {
				bad = append(bad, m.Metadata.GetHostname())
				if codes.Code(m.Metadata.GetStatus().GetCode()) != codes.DeadlineExceeded {
					t.Errorf("black hole entry has %v", m.Metadata.GetStatus())
				}
			}
		}
		if len(resp.Messages) != 3 || !slices.Equal(bad, []string{hole}) {
			t.Fatalf("reply %v", resp)
		}
	})
}
