package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
)

// fanOutSizes are the fleet sizes of BenchmarkFanOutUnary.
var fanOutSizes = []int{1, 3, 10, 100, 1000}

// heapWatchedSize is the fleet size from which BenchmarkFanOutUnary also
// reports the heap's peak growth (sampling costs a little time, so smaller
// fleets, whose calls are short, are left unsampled).
const heapWatchedSize = 1000

// BenchmarkFanOutUnary measures one-to-many Version calls, one at a time,
// to fleets of 1 to 1,000 backends.
func BenchmarkFanOutUnary(b *testing.B) {
	for _, n := range fanOutSizes {
		b.Run(fmt.Sprintf("backends=%d", n), func(b *testing.B) {
			f := startFleet(b, n, testbackend.Behaviour{})
			for _, via := range []string{viaApid, viaSiderolabs} {
				benchFanOutUnary(b, f, via)
			}
		})
	}
}

// benchFanOutUnary runs the sub-benchmark of one variant. The proxy and its
// connections live across the rounds of b.N and are gone before the next
// variant starts, so a round neither pays for dialling a fleet nor measures
// the garbage of the previous round's connections.
func benchFanOutUnary(b *testing.B, f *fleet, via string) {
	s := &scope{TB: b}
	defer s.close()
	call := fanOutVersion(benchContext(s), f.oneToMany(s, via), f.size)
	for range 3 {
		if err := call(); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("via="+via, func(b *testing.B) {
		var heap *heapPeak
		if f.size >= heapWatchedSize {
			heap = watchHeap()
		}
		runCalls(b, 1, call)
		if heap != nil {
			heap.report(b)
		}
		reportCallRate(b)
	})
}

// fanOutVersion returns a call that asks c for Version and checks the reply
// holds one entry stamped by each of n backends, without errors.
func fanOutVersion(ctx context.Context, c machine.MachineServiceClient, n int) func() error {
	return func() error {
		resp, err := c.Version(ctx, &emptypb.Empty{})
		if err != nil {
			return err
		}
		if got := len(resp.GetMessages()); got != n {
			return fmt.Errorf("%d entries, want %d", got, n)
		}
		for _, m := range resp.Messages {
			if m.GetMetadata().GetHostname() == "" || m.GetMetadata().GetError() != "" {
				return fmt.Errorf("entry not stamped or failed: %v", m.GetMetadata())
			}
		}
		return nil
	}
}

// Shape of BenchmarkFanOutStream: the same number of 1 KiB messages either
// from streamBackends backends at once or from one backend directly.
const (
	streamBackends = 3
	streamPerNode  = 1000
	streamTotal    = streamBackends * streamPerNode
	streamPayload  = 1 << 10
)

// viaApidRelay is apid relaying the single stream one-to-one: the cost of
// one proxy hop alone, without fan-out.
const viaApidRelay = "apid-one-to-one"

// BenchmarkFanOutStream measures a Dmesg stream fanned out to three
// backends of 1,000 messages each against one direct stream carrying the
// same 3,000 messages, and against apid relaying that one stream; MB/s
// counts the messages' payload.
func BenchmarkFanOutStream(b *testing.B) {
	b.Run(fmt.Sprintf("msgs=%d/size=1KiB", streamTotal), func(b *testing.B) {
		f := startFleet(b, streamBackends, testbackend.Behaviour{StreamMessages: streamPerNode, Payload: streamPayload})
		single := testbackend.Start(b, "single", testbackend.Behaviour{StreamMessages: streamTotal, Payload: streamPayload})
		for _, via := range []string{viaDirect, viaApidRelay, viaApid, viaSiderolabs} {
			b.Run("via="+via, func(b *testing.B) {
				var c machine.MachineServiceClient
				switch via {
				case viaDirect:
					c = oneToOne(b, viaDirect, single.Addr)
				case viaApidRelay:
					c = oneToOne(b, viaApid, single.Addr)
				default:
					c = f.oneToMany(b, via)
				}
				call := readDmesg(benchContext(b), c, streamTotal)
				if err := call(); err != nil {
					b.Fatal(err)
				}
				b.SetBytes(streamTotal * streamPayload)
				runCalls(b, 1, call)
			})
		}
	})
}

// readDmesg returns a call that reads a whole Dmesg stream from c and checks
// it carried want messages and no error message.
func readDmesg(ctx context.Context, c machine.MachineServiceClient, want int) func() error {
	return func() error {
		stream, err := c.Dmesg(ctx, &machine.DmesgRequest{})
		if err != nil {
			return err
		}
		for got := 0; ; got++ {
			d, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				if got != want {
					return fmt.Errorf("%d messages, want %d", got, want)
				}
				return nil
			}
			if err != nil {
				return err
			}
			if e := d.GetMetadata().GetError(); e != "" {
				return fmt.Errorf("error message from %s: %s", d.GetMetadata().GetHostname(), e)
			}
		}
	}
}
