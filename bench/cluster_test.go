package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talos "github.com/siderolabs/talos/pkg/machinery/client"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testpki"
)

// The cluster-wide comparison is long (minutes) and starts a gateway
// process: `make bench-cluster` runs it.
const clusterEnv = "APID_BENCH_CLUSTER"

// gatewayProcess is an apid serve process in front of a fleet: the gateway
// whose cost is measured, in a process of its own so that the client's and
// the nodes' work is not counted.
type gatewayProcess struct {
	cmd   *exec.Cmd
	addr  string
	admin string
}

// startGatewayProcess runs apid serve (built without the race detector)
// on 127.0.69.1 with the fleet's CA and the fleet's port as remotePort.
func startGatewayProcess(tb testing.TB, f *gatewayFleet, bin string) *gatewayProcess {
	tb.Helper()
	const ip = "127.0.69.1"
	files := testpki.WriteNode(tb, f.ca, f.dir, "gateway", net.ParseIP(ip))
	backend := testbackend.Start(tb, "gateway", testbackend.Behaviour{})
	port := sharedPort(tb, []string{ip})
	admin := net.JoinHostPort("127.0.69.2", strconv.Itoa(sharedPort(tb, []string{"127.0.69.2"})))
	cfg := f.write(tb, "gateway.yaml", []byte(fmt.Sprintf(`ca: %q
cert: %q
key: %q
clientCert: %q
clientKey: %q
listen: %q
adminListen: %q
backend: %q
remotePort: %d
drainDelay: 0s
logLevel: info
limits:
  concurrentCallsPerIdentity: 100000
  callsPerSecondPerIdentity: 1000000
  callBurstPerIdentity: 1000000
`, filepath.Join(f.dir, "ca.crt"), files.Cert, files.Key, files.ClientCert, files.ClientKey,
		net.JoinHostPort(ip, strconv.Itoa(port)), admin, backend.Addr, f.port)))
	cmd := startProcess(tb, exec.Command(bin, "serve", "-config", cfg), "apid serving")
	// The admin endpoint starts with Serve, just after that line.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		resp, err := http.Get("http://" + admin + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if time.Now().After(deadline) {
			tb.Fatalf("gateway not ready within 10 s: %v", err)
		}
	}
	return &gatewayProcess{cmd: cmd, addr: net.JoinHostPort(ip, strconv.Itoa(port)), admin: admin}
}

// gatewayBinary is the apid measured: built here (plain, as released), or
// APID_BENCH_BIN's, to compare two versions.
func gatewayBinary(tb testing.TB) string {
	tb.Helper()
	bin := os.Getenv("APID_BENCH_BIN")
	if bin == "" {
		bin = filepath.Join(tb.TempDir(), "apid")
		if out, err := exec.Command("go", "build", "-tags", "nodemo", "-o", bin, "../cmd/apid").CombinedOutput(); err != nil {
			tb.Fatalf("build apid: %v\n%s", err, out)
		}
	}
	return bin
}

// cpu is the process's user and system CPU time so far.
func (g *gatewayProcess) cpu(tb testing.TB) time.Duration {
	tb.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", g.cmd.Process.Pid))
	if err != nil {
		tb.Fatal(err)
	}
	// Fields after the command name (which may hold spaces) in parentheses.
	fields := strings.Fields(string(data[strings.LastIndexByte(string(data), ')')+2:]))
	utime, _ := strconv.ParseInt(fields[11], 10, 64)
	stime, _ := strconv.ParseInt(fields[12], 10, 64)
	const ticksPerSecond = 100 // USER_HZ on Linux
	return time.Duration(utime+stime) * time.Second / ticksPerSecond
}

// writes is how many write system calls the process has made so far
// (syscw of /proc/PID/io): sockets, pipes and files alike.
func (g *gatewayProcess) writes(tb testing.TB) float64 {
	tb.Helper()
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", g.cmd.Process.Pid))
	if err != nil {
		tb.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "syscw: "); ok {
			n, _ := strconv.ParseFloat(v, 64)
			return n
		}
	}
	tb.Fatalf("no syscw in /proc/%d/io", g.cmd.Process.Pid)
	return 0
}

// allocated is the bytes the process's Go heap has allocated so far.
func (g *gatewayProcess) allocated(tb testing.TB) float64 {
	tb.Helper()
	if g.admin == "" { // a gateway without metrics
		return 0
	}
	resp, err := http.Get("http://" + g.admin + "/metrics")
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "go_memstats_alloc_bytes_total "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	tb.Fatal("no go_memstats_alloc_bytes_total")
	return 0
}

// clusterCall is one cluster-wide call: it returns how many nodes answered
// and how many failed.
type clusterCall func(ctx context.Context) (ok, failed int, err error)

// clusterFanOutVersion is Version with nodes: every node, one call.
func clusterFanOutVersion(c *talos.Client, nodes []string) clusterCall {
	return func(ctx context.Context) (int, int, error) {
		resp, err := c.MachineClient.Version(metadata.AppendToOutgoingContext(ctx, "nodes", strings.Join(nodes, ",")), &emptypb.Empty{})
		if err != nil {
			return 0, 0, err
		}
		ok, failed := 0, 0
		for _, m := range resp.Messages {
			if m.Metadata.GetError() != "" {
				failed++
			} else {
				ok++
			}
		}
		return ok, failed, nil
	}
}

// multiplexVersion is Version as talosctl calls a cluster now: one
// concurrent call per node, each with node: X, through the same endpoint.
// perNode, when set, is a deadline the client puts on each call.
func multiplexVersion(c *talos.Client, nodes []string, perNode time.Duration) clusterCall {
	return func(ctx context.Context) (int, int, error) {
		var mu sync.Mutex
		ok, failed := 0, 0
		var g errgroup.Group
		for _, n := range nodes {
			g.Go(func() error {
				cctx := ctx
				if perNode > 0 {
					var cancel context.CancelFunc
					cctx, cancel = context.WithTimeout(ctx, perNode)
					defer cancel()
				}
				_, err := c.MachineClient.Version(metadata.AppendToOutgoingContext(cctx, "node", n), &emptypb.Empty{})
				mu.Lock()
				defer mu.Unlock()
				if err != nil {
					failed++
				} else {
					ok++
				}
				return nil
			})
		}
		err := g.Wait()
		return ok, failed, err
	}
}

// fanOutDmesg reads a streamed fan-out to the end.
func fanOutDmesg(c *talos.Client, nodes []string) clusterCall {
	return func(ctx context.Context) (int, int, error) {
		s, err := c.MachineClient.Dmesg(metadata.AppendToOutgoingContext(ctx, "nodes", strings.Join(nodes, ",")), &machine.DmesgRequest{})
		if err != nil {
			return 0, 0, err
		}
		n, err := drain(s)
		return n, 0, err
	}
}

// multiplexDmesg opens one Dmesg stream per node and reads them all.
func multiplexDmesg(c *talos.Client, nodes []string) clusterCall {
	return func(ctx context.Context) (int, int, error) {
		var mu sync.Mutex
		total := 0
		var g errgroup.Group
		for _, node := range nodes {
			g.Go(func() error {
				s, err := c.MachineClient.Dmesg(metadata.AppendToOutgoingContext(ctx, "node", node), &machine.DmesgRequest{})
				if err != nil {
					return err
				}
				n, err := drain(s)
				mu.Lock()
				total += n
				mu.Unlock()
				return err
			})
		}
		err := g.Wait()
		return total, 0, err
	}
}

func drain(s machine.MachineService_DmesgClient) (int, error) {
	n := 0
	for {
		if _, err := s.Recv(); err != nil {
			if errors.Is(err, io.EOF) {
				return n, nil
			}
			return n, err
		}
		n++
	}
}

// sample is one style's figures over one window of closed-loop calls.
type sample struct {
	callsPerSec, p50, p99, cpuPerCall, allocPerCall float64
}

// measure runs call back to back for window and returns the figures.
func measure(tb testing.TB, g *gatewayProcess, call clusterCall, window time.Duration, wantOK int) sample {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), window+time.Minute)
	defer cancel()
	cpu0, alloc0 := g.cpu(tb), g.allocated(tb)
	var lat []time.Duration
	start := time.Now()
	for time.Since(start) < window {
		t0 := time.Now()
		ok, _, err := call(ctx)
		lat = append(lat, time.Since(t0))
		if err != nil || ok != wantOK {
			tb.Fatalf("cluster-wide call: %d answers, want %d: %v", ok, wantOK, err)
		}
	}
	elapsed := time.Since(start)
	cpu, alloc := g.cpu(tb)-cpu0, g.allocated(tb)-alloc0
	slices.Sort(lat)
	n := float64(len(lat))
	return sample{
		callsPerSec:  n / elapsed.Seconds(),
		p50:          float64(lat[len(lat)/2].Microseconds()) / 1000,
		p99:          float64(lat[min(len(lat)-1, int(0.99*n))].Microseconds()) / 1000,
		cpuPerCall:   float64(cpu.Microseconds()) / n,
		allocPerCall: alloc / n / 1024,
	}
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// TestClusterWideCalls compares, through one gateway process, a
// cluster-wide call made as a server-side fan-out (one call, nodes: all)
// with the same call made by client-side multiplexing as talosctl does
// (one concurrent call per node with node: X), at 3, 50 and 200 nodes,
// for Version and a streamed Dmesg. The styles alternate window by window
// so that load changes hit both alike; medians of the windows are
// reported with the ratio fan-out / multiplexing. Then one node of 50
// answers after 2 s.
func TestClusterWideCalls(t *testing.T) {
	if os.Getenv(clusterEnv) == "" {
		t.Skipf("set %s=1 (make bench-cluster) to run the cluster-wide comparison", clusterEnv)
	}
	bin := gatewayBinary(t)
	rounds, window := 5, 2*time.Second
	if v, err := strconv.Atoi(os.Getenv("APID_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	const dmesgLines = 10
	var report, slowReport strings.Builder
	fmt.Fprintf(&report, "| nodes | call | style | calls/s | p50 ms | p99 ms | gateway CPU µs/call | gateway KiB alloc/call |\n|---|---|---|---|---|---|---|---|\n")
	sizes := []int{3, 50, 200}
	if v := os.Getenv("APID_BENCH_SIZES"); v != "" { // e.g. 50, to compare builds quickly
		sizes = nil
		for _, f := range strings.Split(v, ",") {
			if n, err := strconv.Atoi(f); err == nil && n > 1 {
				sizes = append(sizes, n)
			}
		}
	}
	for _, size := range sizes {
		var slow *testbackend.Server
		f := startGatewayFleet(t, fleetOptions{nodes: size, firstIP: [4]byte{127, 0, 70, 1},
			backend: func(i int, name string) string {
				b := testbackend.Start(t, name, testbackend.Behaviour{StreamMessages: dmesgLines})
				if i == size-1 {
					slow = b
				}
				return b.Addr
			}})
		g := startGatewayProcess(t, f, bin)
		c, err := talos.New(context.Background(), talos.WithEndpoints(g.addr), talos.WithTLSConfig(f.clientTLS(t)))
		if err != nil {
			t.Fatal(err)
		}
		for _, cw := range []struct {
			call          string
			fanOut, multi clusterCall
			want          int
		}{
			{"Version", clusterFanOutVersion(c, f.ips), multiplexVersion(c, f.ips, 0), size},
			{"Dmesg", fanOutDmesg(c, f.ips), multiplexDmesg(c, f.ips), size * dmesgLines},
		} {
			var fan, mux []sample
			for range rounds {
				fan = append(fan, measure(t, g, cw.fanOut, window, cw.want))
				mux = append(mux, measure(t, g, cw.multi, window, cw.want))
			}
			pick := func(ss []sample, f func(sample) float64) float64 {
				var xs []float64
				for _, s := range ss {
					xs = append(xs, f(s))
				}
				return median(xs)
			}
			var row [2][5]float64
			for i, ss := range [][]sample{fan, mux} {
				row[i] = [5]float64{
					pick(ss, func(s sample) float64 { return s.callsPerSec }),
					pick(ss, func(s sample) float64 { return s.p50 }),
					pick(ss, func(s sample) float64 { return s.p99 }),
					pick(ss, func(s sample) float64 { return s.cpuPerCall }),
					pick(ss, func(s sample) float64 { return s.allocPerCall }),
				}
			}
			for i, style := range []string{"server-side fan-out", "client multiplexing"} {
				fmt.Fprintf(&report, "| %d | %s | %s | %.0f | %.2f | %.2f | %.0f | %.0f |\n", size, cw.call, style,
					row[i][0], row[i][1], row[i][2], row[i][3], row[i][4])
			}
			fmt.Fprintf(&report, "| %d | %s | **fan-out / multiplexing** | **%.2f×** | %.2f× | %.2f× | **%.2f×** | %.2f× |\n", size, cw.call,
				row[0][0]/row[1][0], row[0][1]/row[1][1], row[0][2]/row[1][2], row[0][3]/row[1][3], row[0][4]/row[1][4])
		}

		if size == 50 {
			slowNode(t, &slowReport, c, f.ips, slow)
		}
		c.Close()
	}
	report.WriteString(slowReport.String())
	t.Logf("%d interleaved windows of %s per style, medians:\n%s", rounds, window, report.String())
	if out := os.Getenv("APID_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(report.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// slowNode makes one of the nodes answer after 2 s and times one
// cluster-wide Version each way: fan-out with a per-node deadline of
// 500 ms, multiplexing without deadlines (as talosctl) and with the client
// setting 500 ms on each call itself.
func slowNode(t *testing.T, report *strings.Builder, c *talos.Client, nodes []string, slow *testbackend.Server) {
	slow.Set(testbackend.Behaviour{Delay: 2 * time.Second, StreamMessages: 10})
	defer slow.Set(testbackend.Behaviour{StreamMessages: 10})
	ctx := context.Background()
	timed := func(call clusterCall, ctx context.Context) (time.Duration, int, int, error) {
		start := time.Now()
		ok, failed, err := call(ctx)
		return time.Since(start), ok, failed, err
	}
	fanCtx := metadata.AppendToOutgoingContext(ctx, "apid-node-timeout", "500ms")
	d, ok, failed, err := timed(clusterFanOutVersion(c, nodes), fanCtx)
	if err != nil || ok != len(nodes)-1 || failed != 1 {
		t.Fatalf("fan-out with a slow node: %d ok, %d failed, %v", ok, failed, err)
	}
	if d > 600*time.Millisecond {
		t.Errorf("fan-out with a 500 ms node deadline took %s, want at most 600 ms", d)
	}
	resp, err := c.MachineClient.Version(metadata.AppendToOutgoingContext(fanCtx, "nodes", strings.Join(nodes, ",")), &emptypb.Empty{})
	if err == nil {
		for _, m := range resp.Messages {
			if m.Metadata.GetError() != "" && m.Metadata.GetStatus().GetCode() != int32(codes.DeadlineExceeded) {
				t.Errorf("slow node's entry: %v, want DEADLINE_EXCEEDED", m.Metadata)
			}
		}
	}
	dm, okm, _, errm := timed(multiplexVersion(c, nodes, 0), ctx)
	dd, okd, faild, errd := timed(multiplexVersion(c, nodes, 500*time.Millisecond), ctx)
	if errm != nil || errd != nil || status.Code(errm) != codes.OK {
		t.Fatalf("multiplexing with a slow node: %v, %v", errm, errd)
	}
	fmt.Fprintf(report, "\nOne of %d nodes answers after 2 s:\n\n| style | time | answers | failed |\n|---|---|---|---|\n", len(nodes))
	fmt.Fprintf(report, "| server-side fan-out, apid-node-timeout 500ms | %d ms | %d | %d (DEADLINE_EXCEEDED entry) |\n", d.Milliseconds(), ok, failed)
	fmt.Fprintf(report, "| client multiplexing, no deadline (talosctl) | %d ms | %d | 0 |\n", dm.Milliseconds(), okm)
	fmt.Fprintf(report, "| client multiplexing, 500 ms deadline per call set by the client | %d ms | %d | %d |\n", dd.Milliseconds(), okd, faild)
}
