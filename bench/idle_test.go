package bench

import (
	"context"
	"fmt"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/internal/testbackend"
)

// idleStreams is how many streams BenchmarkIdleStreams holds open at once.
const idleStreams = 10_000

// idleOpeners is how many goroutines open the streams in parallel.
const idleOpeners = 16

// idleDrainTimeout bounds the wait for every backend call to end after the
// streams are cancelled.
const idleDrainTimeout = 30 * time.Second

// idleCost is what holding streams open costs the process.
type idleCost struct {
	bytes      float64 // heap in use plus goroutine stacks, per stream
	heap       float64 // heap in use alone, per stream
	goroutines float64 // per stream
}

// BenchmarkIdleStreams measures the memory of 10,000 Dmesg streams held open
// by a backend that sent one message and then waits. Client, proxy and
// backend share the process, so the via=direct figure is the cost of the two
// ends alone and the difference to it is what the proxy adds.
//
// The measurement does not depend on b.N. The testing package calls a
// benchmark once per -count with a fresh *testing.B, and again on that B
// for each larger b.N it tries; the streams are measured on the first call
// of each B and the later calls report the same result. ns/op is
// suppressed; B/op and allocs/op are zero because the timer is stopped.
func BenchmarkIdleStreams(b *testing.B) {
	for _, via := range []string{viaDirect, viaApid, viaMwitkow} {
		var (
			measured *testing.B
			cost     idleCost
		)
		b.Run(fmt.Sprintf("streams=%d/via=%s", idleStreams, via), func(b *testing.B) {
			if measured != b {
				b.StopTimer()
				cost, measured = measureIdle(b, via, idleStreams), b
			}
			b.ReportMetric(0, "ns/op")
			b.ReportMetric(cost.bytes, "B/stream")
			b.ReportMetric(cost.heap, "heap-B/stream")
			b.ReportMetric(cost.goroutines, "goroutines/stream")
		})
	}
}

// memoryInUse returns the heap in use and the goroutine stacks once the
// garbage is collected.
func memoryInUse() (heap, stacks uint64, goroutines int) {
	collectGarbage()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapInuse, m.StackInuse, runtime.NumGoroutine()
}

// measureIdle opens n streams through the variant via to a backend that
// stalls after the first message, measures what they hold, then cancels
// them and checks that every client stream and every backend call ends.
func measureIdle(tb testing.TB, via string, n int) idleCost {
	tb.Helper()
	backend := testbackend.Start(tb, "idle", testbackend.Behaviour{Stuck: true})
	c := oneToOne(tb, via, backend.Addr)

	// One stream first, so that connections, pools and lazily built state
	// are in place before the baseline is taken.
	warm, cancelWarm := context.WithCancel(context.Background())
	if _, err := openIdle(warm, c); err != nil {
		tb.Fatal(err)
	}
	cancelWarm()
	if err := waitEnded(backend, idleDrainTimeout); err != nil {
		tb.Fatal(err)
	}

	heap0, stacks0, g0 := memoryInUse()

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	streams := make([]machine.MachineService_DmesgClient, n)
	errs := make(chan error, idleOpeners)
	var wg sync.WaitGroup
	for w := range idleOpeners {
		wg.Go(func() {
			for i := w; i < n; i += idleOpeners {
				s, err := openIdle(ctx, c)
				if err != nil {
					errs <- fmt.Errorf("stream %d: %w", i, err)
					return
				}
				streams[i] = s
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		tb.Fatal(err)
	}
	if active := backend.Active(); active != int64(n) {
		tb.Fatalf("backend holds %d calls, want %d", active, n)
	}

	heap1, stacks1, g1 := memoryInUse()
	cost := idleCost{
		bytes:      (float64(heap1) + float64(stacks1) - float64(heap0) - float64(stacks0)) / float64(n),
		heap:       (float64(heap1) - float64(heap0)) / float64(n),
		goroutines: float64(g1-g0) / float64(n),
	}

	cancel()
	for i, s := range streams {
		if _, err := s.Recv(); status.Code(err) != codes.Canceled {
			tb.Fatalf("stream %d after cancel: %v, want Canceled", i, err)
		}
	}
	if err := waitEnded(backend, idleDrainTimeout); err != nil {
		tb.Fatal(err)
	}
	return cost
}

// openIdle opens a Dmesg stream and reads its first message.
func openIdle(ctx context.Context, c machine.MachineServiceClient) (machine.MachineService_DmesgClient, error) {
	s, err := c.Dmesg(ctx, &machine.DmesgRequest{})
	if err != nil {
		return nil, err
	}
	if _, err := s.Recv(); err != nil {
		return nil, err
	}
	return s, nil
}

// waitEnded waits until the backend has no call running. Every call that
// ends decrements Active before signalling Ended, and Ended only drops a
// signal when it already holds unread ones, so no wake-up is lost.
func waitEnded(backend *testbackend.Server, limit time.Duration) error {
	timeout := time.NewTimer(limit)
	defer timeout.Stop()
	for backend.Active() > 0 {
		select {
		case <-backend.Ended():
		case <-timeout.C:
			return fmt.Errorf("%d backend calls still running %v after cancel", backend.Active(), limit)
		}
	}
	return nil
}
