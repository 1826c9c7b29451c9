package bench

import (
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
)

// The benchmarks only check counts on their hot path; these tests check
// that every variant really delivers what the benchmark claims to measure.

func TestOneToOneVariantsRelayTheBackendsReply(t *testing.T) {
	backend := testbackend.Start(t, "node", testbackend.Behaviour{Payload: 100})
	for _, via := range []string{viaDirect, viaApid, viaMwitkow, viaSiderolabs} {
		t.Run(via, func(t *testing.T) {
			resp, err := oneToOne(t, via, backend.Addr).Version(testkit.Context(t), &emptypb.Empty{})
			if err != nil {
				t.Fatal(err)
			}
			if len(resp.Messages) != 1 {
				t.Fatalf("%d entries, want 1", len(resp.Messages))
			}
			m := resp.Messages[0]
			if m.GetVersion().GetTag() != "node/0" || len(m.GetVersion().GetSha()) != 100 || m.Metadata != nil {
				t.Fatalf("reply changed on the way: %v", m)
			}
		})
	}
}

func TestFanOutVariantsStampEveryBackend(t *testing.T) {
	// 7 backends on 3 shared servers exercises the layout used for the
	// largest fleet as well as the one-server-per-backend one.
	for _, servers := range []int{0, 3} {
		const n = 7
		var f *fleet
		if servers == 0 {
			f = startFleet(t, n, testbackend.Behaviour{})
		} else {
			f = &fleet{size: n}
			for i := range servers {
				f.servers = append(f.servers, testbackend.Start(t, fmt.Sprintf("server-%d", i), testbackend.Behaviour{}))
			}
		}
		for _, via := range []string{viaApid, viaSiderolabs} {
			t.Run(fmt.Sprintf("servers=%d/%s", len(f.servers), via), func(t *testing.T) {
				resp, err := f.oneToMany(t, via).Version(testkit.Context(t), &emptypb.Empty{})
				if err != nil {
					t.Fatal(err)
				}
				var got, want []string
				for i := range n {
					want = append(want, fmt.Sprintf("%s %s/0", backendName(i), f.servers[i%len(f.servers)].Name))
				}
				for _, m := range resp.Messages {
					if m.GetMetadata().GetError() != "" {
						t.Fatalf("error entry: %v", m.Metadata)
					}
					got = append(got, m.GetMetadata().GetHostname()+" "+m.GetVersion().GetTag())
				}
				// siderolabs merges in completion order; apid in backend order.
				if via == viaSiderolabs {
					slices.Sort(got)
					slices.Sort(want)
				}
				if !slices.Equal(got, want) {
					t.Fatalf("entries\n%v\nwant\n%v", got, want)
				}
				if err := fanOutVersion(testkit.Context(t), f.oneToMany(t, via), n)(); err != nil {
					t.Fatal(err)
				}
			})
		}
	}
}

func TestFanOutStreamVariantsDeliverEveryMessage(t *testing.T) {
	const perNode = 20
	f := startFleet(t, 3, testbackend.Behaviour{StreamMessages: perNode, Payload: 64})
	single := testbackend.Start(t, "single", testbackend.Behaviour{StreamMessages: 3 * perNode, Payload: 64})
	for _, via := range []string{viaDirect, viaApid, viaSiderolabs} {
		t.Run(via, func(t *testing.T) {
			var c machine.MachineServiceClient
			if via == viaDirect {
				c = oneToOne(t, viaDirect, single.Addr)
			} else {
				c = f.oneToMany(t, via)
			}
			stream, err := c.Dmesg(testkit.Context(t), &machine.DmesgRequest{})
			if err != nil {
				t.Fatal(err)
			}
			next := map[string]int{} // next message index per origin
			for {
				d, err := stream.Recv()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
				origin, _, _ := strings.Cut(string(d.Bytes), " ")
				host := d.GetMetadata().GetHostname()
				if via != viaDirect && host != "node-"+strings.TrimPrefix(origin, "server-") {
					t.Fatalf("message from %s stamped %q", origin, host)
				}
				if want := fmt.Sprintf("%s %d ", origin, next[origin]); !strings.HasPrefix(string(d.Bytes), want) {
					t.Fatalf("message %.20q, want prefix %q", d.Bytes, want)
				}
				next[origin]++
			}
			total := 0
			for _, k := range next {
				total += k
			}
			if total != 3*perNode {
				t.Fatalf("%d messages (%v), want %d", total, next, 3*perNode)
			}
			if err := readDmesg(testkit.Context(t), c, 3*perNode)(); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestIdleStreamsAreMeasuredAndReleased(t *testing.T) {
	for _, via := range []string{viaDirect, viaApid, viaMwitkow} {
		t.Run(via, func(t *testing.T) {
			cost := measureIdle(t, via, 50)
			if cost.goroutines <= 0 || cost.bytes <= 0 {
				t.Fatalf("50 idle streams cost nothing? %+v", cost)
			}
		})
	}
}
