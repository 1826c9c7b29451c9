package proxy_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/proxy"
)

func TestOneToManySlowNodeDoesNotHoldTheReply(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{}, "n1", "n2", "slow")
	servers[2].Set(testbackend.Behaviour{Delay: 10 * time.Second})
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, NodeTimeout: 200 * time.Millisecond}, proxy.Options{})
	start := time.Now()
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if elapsed := time.Since(start); elapsed >= 10*time.Second {
		t.Fatalf("waited %v for the slow node", elapsed)
	}
	e := versionEntries(t, resp)
	if len(e) != 3 || e["n1"].Version == nil || e["n2"].Version == nil ||
		codes.Code(e["slow"].Metadata.GetStatus().GetCode()) != codes.DeadlineExceeded {
		t.Fatalf("reply %v", resp)
	}
}

func TestOneToManyCallDeadlineLeavesRoomForThePartialReply(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{}, "n1", "hangs")
	servers[1].Set(testbackend.Behaviour{Hang: true})
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany}, proxy.Options{})
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	resp, err := c.Version(ctx, &emptypb.Empty{})
	if err != nil {
		t.Fatalf("the call itself failed (%v): nodes were not cut off before its deadline", err)
	}
	e := versionEntries(t, resp)
	if e["n1"].Version == nil || codes.Code(e["hangs"].Metadata.GetStatus().GetCode()) != codes.DeadlineExceeded {
		t.Fatalf("reply %v", resp)
	}
}

func TestOneToManyOversizedReplyIsThatNodesError(t *testing.T) {
	servers, _ := backends(t, testbackend.Behaviour{}, "small", "huge")
	servers[1].Set(testbackend.Behaviour{Payload: 2 << 20})
	var bs []proxy.Backend
	for _, s := range servers {
		cc, err := grpc.NewClient(s.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(1<<20)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		bs = append(bs, target{name: s.Name, conn: cc})
	}
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany}, proxy.Options{})
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	e := versionEntries(t, resp)
	if e["small"].Version == nil || codes.Code(e["huge"].Metadata.GetStatus().GetCode()) != codes.ResourceExhausted {
		t.Fatalf("reply %v", resp)
	}
}

// TestStressMixedFaults runs a bounded number of concurrent fan-out calls,
// unary and streamed, while backends fail in random ways, and checks every
// reply accounts for every node with the right outcome.
func TestStressMixedFaults(t *testing.T) {
	const nodes, rounds, callsPerRound = 6, 8, 12
	names := make([]string, nodes)
	for i := range names {
		names[i] = fmt.Sprintf("n%d", i)
	}
	servers, bs := backends(t, testbackend.Behaviour{}, names...)
	// The node timeout only has to cut off the hanging nodes: 1 s leaves a
	// slow (20 ms) node a fiftyfold margin on a loaded machine.
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, NodeTimeout: time.Second}, proxy.Options{StreamBuffer: 4})
	cs := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, Kind: proxy.ServerStream}, proxy.Options{StreamBuffer: 4})
	rng := rand.New(rand.NewPCG(1, 2))
	faults := []testbackend.Behaviour{
		{},
		{Fail: codes.Internal},
		{Hang: true},
		{Delay: 20 * time.Millisecond, StreamMessages: 30},
		{StreamMessages: 30, FailAfter: 7},
	}
	want := map[int]codes.Code{0: codes.OK, 1: codes.Internal, 2: codes.DeadlineExceeded, 3: codes.OK, 4: codes.OK}
	for round := 0; round < rounds; round++ {
		chosen := make([]int, nodes)
		for i, s := range servers {
			chosen[i] = rng.IntN(len(faults))
			s.Set(faults[chosen[i]])
		}
		var wg sync.WaitGroup
		for call := 0; call < callsPerRound; call++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				if call%2 == 0 {
					checkUnary(t, c, names, chosen, want)
				} else {
					checkStream(t, cs, names, chosen, faults)
				}
			}()
		}
		wg.Wait()
		if t.Failed() {
			t.Fatalf("round %d with faults %v failed", round, chosen)
		}
	}
}

func checkUnary(t *testing.T, c machine.MachineServiceClient, names []string, chosen []int, want map[int]codes.Code) {
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Errorf("unary call failed: %v", err)
		return
	}
	if len(resp.Messages) != len(names) {
		t.Errorf("%d entries, want %d", len(resp.Messages), len(names))
		return
	}
	for i, m := range resp.Messages {
		if m.Metadata.GetHostname() != names[i] || codes.Code(m.Metadata.GetStatus().GetCode()) != want[chosen[i]] {
			t.Errorf("entry %d = %v, want %s with %v", i, m.Metadata, names[i], want[chosen[i]])
		}
	}
}

// checkStream reads a streamed fan-out until every node that does not
// hang has delivered all it will (its messages, or its error), then ends
// it: a hanging node must not hold the others back, and the test waits on
// outcomes, not on a deadline a loaded machine may miss.
func checkStream(t *testing.T, c machine.MachineServiceClient, names []string, chosen []int, faults []testbackend.Behaviour) {
	ctx, cancel := context.WithCancel(testkit.Context(t))
	defer cancel()
	stream, err := c.Dmesg(ctx, &machine.DmesgRequest{})
	if err != nil {
		t.Errorf("stream failed to start: %v", err)
		return
	}
	data := map[string]int{}
	errs := map[string]codes.Code{}
	done := func() bool {
		for i, n := range names {
			f := faults[chosen[i]]
			switch {
			case f.Hang:
			case f.Fail != codes.OK || f.FailAfter > 0:
				if _, ok := errs[n]; !ok {
					return false
				}
			case data[n] < max(f.StreamMessages, 3):
				return false
			}
		}
		return true
	}
	for !done() {
		d, err := stream.Recv()
		if err != nil {
			break // the end (or the test's own bounded wait ran out)
		}
		if d.Metadata.GetError() != "" {
			errs[d.Metadata.GetHostname()] = codes.Code(d.Metadata.GetStatus().GetCode())
			continue
		}
		data[d.Metadata.GetHostname()]++
	}
	for i, n := range names {
		f := faults[chosen[i]]
		switch {
		case f.Hang:
			// Never answers: nothing to check but that it did not block the others.
		case f.Fail != codes.OK:
			if errs[n] != f.Fail {
				t.Errorf("%s: error %v, want %v", n, errs[n], f.Fail)
			}
		case f.FailAfter > 0:
			if data[n] != f.FailAfter || errs[n] != codes.Unavailable {
				t.Errorf("%s: %d messages and error %v, want %d and Unavailable", n, data[n], errs[n], f.FailAfter)
			}
		default:
			if data[n] != max(f.StreamMessages, 3) {
				t.Errorf("%s: %d messages, want %d", n, data[n], max(f.StreamMessages, 3))
			}
		}
	}
}

// TestOneToManyFloodingNodeIsPausedNotBuffered has a node stream far more
// than the client reads and checks the node is held back by flow control:
// what it manages to send stays bounded by the windows and the proxy's
// buffer, not by the size of its output.
func TestOneToManyFloodingNodeIsPausedNotBuffered(t *testing.T) {
	const total, size = 20000, 32 << 10 // 640 MiB if it were all buffered
	servers, bs := backends(t, testbackend.Behaviour{StreamMessages: total, Payload: size}, "flood", "quiet")
	servers[1].Set(testbackend.Behaviour{StreamMessages: 1})
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany, Kind: proxy.ServerStream}, proxy.Options{StreamBuffer: 8})
	ctx, cancel := context.WithCancel(testkit.Context(t))
	defer cancel()
	stream, err := c.Dmesg(ctx, &machine.DmesgRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 10; i++ {
		if _, err := stream.Recv(); err != nil {
			t.Fatal(err)
		}
	}
	// The client stops reading. Wait until the flooding node stops making
	// progress (bounded), then check how far it got.
	last, still := int64(-1), 0
	for deadline := time.Now().Add(10 * time.Second); still < 20 && time.Now().Before(deadline); {
		n := servers[0].Sent()
		if n == last {
			still++
		} else {
			last, still = n, 0
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Windows: 64 KiB per HTTP/2 stream and connection by default on each of
	// the two hops, plus the proxy's 8-message buffer: a few hundred KiB.
	if sent := servers[0].Sent(); sent > 200 || still < 20 {
		t.Fatalf("flooding node sent %d of %d messages (%d MiB) to a client that read 10; still=%d", sent, total, sent*size>>20, still)
	}
	t.Logf("flooding node paused after %d messages", servers[0].Sent())
	cancel()
	select {
	case <-servers[0].Ended():
	case <-time.After(10 * time.Second):
		t.Fatal("flooding node's stream not cancelled")
	}
}

func TestOneToManyOversizedMergeDropsTheLargestEntries(t *testing.T) {
	servers, bs := backends(t, testbackend.Behaviour{Payload: 300 << 10}, "a", "big", "b")
	servers[1].Set(testbackend.Behaviour{Payload: 600 << 10})
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany}, proxy.Options{MaxReplySize: 1 << 20})
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatalf("the merged call failed instead of leaving out the largest reply: %v", err)
	}
	e := versionEntries(t, resp)
	if e["a"].Version == nil || e["b"].Version == nil {
		t.Fatalf("small replies lost: %v", resp.Messages)
	}
	if big := e["big"]; big.Version != nil || codes.Code(big.Metadata.GetStatus().GetCode()) != codes.ResourceExhausted {
		t.Fatalf("largest reply not replaced by an error entry: %v", big.Metadata)
	}
}

func TestOneToManyDoesNotHoardRepliesThatCannotBeSent(t *testing.T) {
	names := []string{"n0", "n1", "n2", "n3", "n4", "n5"}
	_, bs := backends(t, testbackend.Behaviour{Payload: 200 << 10}, names...)
	c := startProxy(t, proxy.Route{Backends: bs, Mode: proxy.OneToMany}, proxy.Options{MaxReplySize: 256 << 10})
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	var kept, dropped, onArrival int
	for _, m := range resp.Messages {
		switch codes.Code(m.Metadata.GetStatus().GetCode()) {
		case codes.OK:
			kept++
		case codes.ResourceExhausted:
			dropped++
			if strings.Contains(m.Metadata.GetError(), "already held") {
				onArrival++
			}
		default:
			t.Errorf("entry %v", m.Metadata)
		}
	}
	// 512 KiB may be held: two replies of 200 KiB, of which one fits the
	// 256 KiB merge; the other four are dropped on arrival or at the merge.
	if len(resp.Messages) != len(names) || kept != 1 || dropped != 5 || onArrival != 4 {
		t.Fatalf("%d entries: %d kept, %d dropped (%d on arrival, want 4)", len(resp.Messages), kept, dropped, onArrival)
	}
}
