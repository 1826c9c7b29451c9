package test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"github.com/apid/apid/internal/testkit"
)

// TestSoak (make soak; not part of make test) keeps 1,000 streamed
// fan-outs running at once through one gateway to three nodes for
// APID_SOAK (a duration, 10m in make soak): each worker reads a 64 KiB file
// from every node, to the end, again and again. The gateway's RSS must grow
// less than 10 % from the end of the first minute to the end, and its
// goroutines must return to their number before the load once it stops.
func TestSoak(t *testing.T) {
	d, err := time.ParseDuration(os.Getenv("APID_SOAK"))
	if err != nil {
		t.Skip("set APID_SOAK to a duration (make soak) to run the soak")
	}
	const workers, conns = 1000, 10
	c := startMemCluster(t, 74, 3, "maxConcurrentStreams: 1000\nlimits:\n  concurrentCallsPerIdentity: 100000\n  callsPerSecondPerIdentity: 1000000\n  callBurstPerIdentity: 1000000\n")
	small := filepath.Join(filepath.Dir(c.file), "small")
	data := make([]byte, 64<<10)
	for i := range data {
		data[i] = byte(i)
	}
	if err := os.WriteFile(small, data, 0o644); err != nil {
		t.Fatal(err)
	}
	clients := make([]machine.MachineServiceClient, conns)
	for i := range clients {
		clients[i] = machine.NewMachineServiceClient(c.dial(t, 0, c.admin))
	}
	// The baseline is taken with the client connections and the
	// connections to the nodes open, and the fan-out workers gone.
	warmCtx := metadata.AppendToOutgoingContext(testkit.Context(t), "nodes", strings.Join(c.ips, ","))
	for _, mc := range clients {
		if _, err := readStream(warmCtx, mc, small); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(7 * time.Second) // idle workers exit after 5 s
	baseGoroutines := scrape(t, c.metrics[0], "go_goroutines")

	// Workers start no stream after the end; the streams themselves carry
	// no deadline, so none is cut short by the soak's end.
	end := time.Now().Add(d)
	nodesCtx := metadata.AppendToOutgoingContext(context.Background(), "nodes", strings.Join(c.ips, ","))
	var calls, failures atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	for w := range workers {
		mc := clients[w%conns]
		wg.Go(func() {
			for time.Now().Before(end) {
				n, err := readStream(nodesCtx, mc, small)
				calls.Add(1)
				if err != nil || n != 3*len(data) {
					failures.Add(1)
					firstErr.CompareAndSwap(nil, fmt.Sprintf("%d bytes: %v", n, err))
				}
			}
		})
	}

	warm := time.Minute
	if d < 2*warm {
		warm = d / 4
	}
	time.Sleep(warm) // the load runs on its own; this only places a measurement
	rssWarm := procStatus(t, c.procs[0].cmd.Process.Pid, "VmRSS")
	loadGoroutines := scrape(t, c.metrics[0], "go_goroutines")
	time.Sleep(time.Until(end))
	rssEnd := procStatus(t, c.procs[0].cmd.Process.Pid, "VmRSS")
	wg.Wait()
	// Idle fan-out workers exit after 5 s: goroutines settle within
	// seconds.
	var after float64
	settled := testkit.Eventually(30*time.Second, func() bool {
		after = scrape(t, c.metrics[0], "go_goroutines")
		return after <= baseGoroutines+2
	})
	growth := float64(rssEnd-rssWarm) / float64(rssWarm)
	t.Logf("soak of %s: %d streamed fan-outs by %d workers (%d failed); gateway RSS %.1f MiB after %s, %.1f MiB at the end (%+.1f %%); goroutines %.0f before, %.0f under load, %.0f after",
		d, calls.Load(), workers, failures.Load(), float64(rssWarm)/(1<<20), warm, float64(rssEnd)/(1<<20), 100*growth, baseGoroutines, loadGoroutines, after)
	if failures.Load() > 0 {
		t.Errorf("%d fan-outs failed; first: %v", failures.Load(), firstErr.Load())
	}
	if growth > 0.10 {
		t.Errorf("gateway RSS grew %.1f %% under steady load, want under 10 %%", 100*growth)
	}
	if !settled {
		t.Errorf("goroutines %.0f after the load, %.0f before: something was left behind", after, baseGoroutines)
	}
}

// readStream reads a streamed fan-out of Read to the end and returns the
// bytes of the entries that are not errors.
func readStream(ctx context.Context, mc machine.MachineServiceClient, path string) (int, error) {
	s, err := mc.Read(ctx, &machine.ReadRequest{Path: path}, grpc.WaitForReady(true))
	if err != nil {
		return 0, err
	}
	n := 0
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		if e := m.Metadata.GetError(); e != "" {
			return n, errors.New(e)
		}
		n += len(m.Bytes)
	}
}
