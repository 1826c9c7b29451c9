package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talos "github.com/siderolabs/talos/pkg/machinery/client"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/pki"
)

// Whole-gateway comparisons with Talos's wiring (minutes each): `make
// bench-one` and `make bench-fanout` run them.
const (
	oneToOneEnv = "APID_BENCH_ONE"
	fanOutEnv   = "APID_BENCH_FANOUT"
)

// gatewayPair is apid and the Talos-wired gateway, each a process of its
// own, in front of the same fleet of nodes, with one official client each.
type gatewayPair struct {
	fleet       *gatewayFleet
	apid, talos *gatewayProcess
	ac, tc      *talos.Client
}

func startGatewayPair(t *testing.T, nodes int, firstIP [4]byte) *gatewayPair {
	t.Helper()
	f := startGatewayFleet(t, fleetOptions{nodes: nodes, firstIP: firstIP,
		backend: func(_ int, name string) string { return testbackend.Start(t, name, testbackend.Behaviour{}).Addr }})
	p := &gatewayPair{fleet: f, apid: startGatewayProcess(t, f, gatewayBinary(t))}
	p.talos = startTalosGatewayProcess(t, f, testbackend.Start(t, "talos-gateway", testbackend.Behaviour{}).Addr)
	for _, g := range []struct {
		addr string
		c    **talos.Client
	}{{p.apid.addr, &p.ac}, {p.talos.addr, &p.tc}} {
		c, err := talos.New(context.Background(), talos.WithEndpoints(g.addr), talos.WithTLSConfig(f.clientTLS(t)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		*g.c = c
	}
	return p
}

// concurrentSample is one window of callers calling back to back.
type concurrentSample struct {
	callsPerSec, p50, p99, cpuPerCall float64 // ms for latencies, µs of gateway CPU
	writesPerCall                     float64 // the gateway's write system calls
}

// measureConcurrent runs callers goroutines calling call back to back for
// window; g, when set, is the gateway whose CPU is read.
func measureConcurrent(tb testing.TB, g *gatewayProcess, callers int, window time.Duration, call func(ctx context.Context, caller, i int) error) concurrentSample {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), window+time.Minute)
	defer cancel()
	var cpu0 time.Duration
	var writes0 float64
	if g != nil {
		cpu0, writes0 = g.cpu(tb), g.writes(tb)
	}
	var (
		mu     sync.Mutex
		lat    []time.Duration
		failed atomic.Value
		wg     sync.WaitGroup
	)
	start := time.Now()
	for c := range callers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for i := 0; time.Since(start) < window; i++ {
				t0 := time.Now()
				if err := call(ctx, c, i); err != nil {
					failed.Store(err)
					break
				}
				mine = append(mine, time.Since(t0))
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if err, _ := failed.Load().(error); err != nil {
		tb.Fatalf("call failed: %v", err)
	}
	s := concurrentSample{callsPerSec: float64(len(lat)) / elapsed.Seconds()}
	slices.Sort(lat)
	s.p50 = float64(lat[len(lat)/2].Microseconds()) / 1000
	s.p99 = float64(lat[min(len(lat)-1, len(lat)*99/100)].Microseconds()) / 1000
	if g != nil {
		s.cpuPerCall = float64((g.cpu(tb) - cpu0).Microseconds()) / float64(len(lat))
		s.writesPerCall = (g.writes(tb) - writes0) / float64(len(lat))
	}
	return s
}

// benchRounds and benchWindow: APID_BENCH_ROUNDS (default 7) interleaved
// windows of 2 s.
func benchRounds() (int, time.Duration) {
	rounds := 7
	if v, err := strconv.Atoi(os.Getenv("APID_BENCH_ROUNDS")); err == nil && v > 0 {
		rounds = v
	}
	return rounds, 2 * time.Second
}

// interleaved measures each variant once per round, in turn, and returns
// each one's samples.
func interleaved(rounds int, variants []func() concurrentSample) [][]concurrentSample {
	out := make([][]concurrentSample, len(variants))
	for range rounds {
		for i, v := range variants {
			out[i] = append(out[i], v())
		}
	}
	return out
}

func medianOf(ss []concurrentSample, f func(concurrentSample) float64) float64 {
	var xs []float64
	for _, s := range ss {
		xs = append(xs, f(s))
	}
	return median(xs)
}

// TestOneToOneCalls: the path talosctl v1.14 takes for everything, one
// `node` call per node. callers goroutines share one connection to the
// gateway and call Version on the three nodes in turn, through apid, through
// the Talos-wired siderolabs/grpc-proxy gateway, and directly to the nodes
// (one connection each), rounds interleaved; gateway CPU per call is read
// from /proc. Medians and the ratios apid ÷ Talos.
func TestOneToOneCalls(t *testing.T) {
	if os.Getenv(oneToOneEnv) == "" {
		t.Skipf("set %s=1 (make bench-one) to run the one-to-one comparison", oneToOneEnv)
	}
	p := startGatewayPair(t, 3, [4]byte{127, 0, 72, 1})
	ips := p.fleet.ips
	var direct []machine.MachineServiceClient
	for _, ip := range ips {
		cc, err := grpc.NewClient(net.JoinHostPort(ip, strconv.Itoa(p.fleet.port)), grpc.WithTransportCredentials(credentials.NewTLS(p.fleet.clientTLS(t))))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cc.Close() })
		direct = append(direct, machine.NewMachineServiceClient(cc))
	}
	callers := 32
	if v, err := strconv.Atoi(os.Getenv("APID_BENCH_CALLERS")); err == nil && v > 0 {
		callers = v
	}
	via := func(c *talos.Client) func(ctx context.Context, caller, i int) error {
		return func(ctx context.Context, caller, i int) error {
			_, err := c.MachineClient.Version(metadata.AppendToOutgoingContext(ctx, "node", ips[(caller+i)%len(ips)]), &emptypb.Empty{})
			return err
		}
	}
	rounds, window := benchRounds()
	res := interleaved(rounds, []func() concurrentSample{
		func() concurrentSample { return measureConcurrent(t, p.apid, callers, window, via(p.ac)) },
		func() concurrentSample { return measureConcurrent(t, p.talos, callers, window, via(p.tc)) },
		func() concurrentSample {
			return measureConcurrent(t, nil, callers, window, func(ctx context.Context, caller, i int) error {
				_, err := direct[(caller+i)%len(direct)].Version(ctx, &emptypb.Empty{})
				return err
			})
		},
	})
	t.Logf("one-to-one Version, %d callers on one connection, %d interleaved windows of %s, medians:\n%s",
		callers, rounds, window, comparisonTable(res, []string{"apid", "Talos wiring (siderolabs/grpc-proxy)", "direct to the node"}))
	if out := os.Getenv("APID_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(comparisonTable(res, []string{"apid", "Talos wiring (siderolabs/grpc-proxy)", "direct to the node"})), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// comparisonTable prints each variant's medians, then apid ÷ Talos (the
// first two variants).
func comparisonTable(res [][]concurrentSample, names []string) string {
	var b strings.Builder
	b.WriteString("| via | calls/s | p50 ms | p99 ms | gateway CPU µs/call | gateway writes/call |\n|---|---|---|---|---|---|\n")
	var m [][5]float64
	for i, ss := range res {
		row := [5]float64{
			medianOf(ss, func(s concurrentSample) float64 { return s.callsPerSec }),
			medianOf(ss, func(s concurrentSample) float64 { return s.p50 }),
			medianOf(ss, func(s concurrentSample) float64 { return s.p99 }),
			medianOf(ss, func(s concurrentSample) float64 { return s.cpuPerCall }),
			medianOf(ss, func(s concurrentSample) float64 { return s.writesPerCall }),
		}
		m = append(m, row)
		cpu, writes := fmt.Sprintf("%.0f", row[3]), fmt.Sprintf("%.2f", row[4])
		if row[3] == 0 {
			cpu, writes = "—", "—"
		}
		fmt.Fprintf(&b, "| %s | %.0f | %.2f | %.2f | %s | %s |\n", names[i], row[0], row[1], row[2], cpu, writes)
	}
	fmt.Fprintf(&b, "| **apid ÷ Talos** | **%.2f×** | %.2f× | %.2f× | **%.2f×** | %.2f× |\n", m[0][0]/m[1][0], m[0][1]/m[1][1], m[0][2]/m[1][2], m[0][3]/m[1][3], m[0][4]/m[1][4])
	if len(m) > 2 {
		fmt.Fprintf(&b, "| apid ÷ direct | %.2f× | %.2f× | %.2f× | | |\n", m[0][0]/m[2][0], m[0][1]/m[2][1], m[0][2]/m[2][2])
	}
	return b.String()
}

// startNodeFleet runs n plain nodes: each a test MachineService behind
// mutual TLS on its own loopback address (127.0.73.1 and up, 250 to a
// /24), one port for all, as a Talos node's apid answers a forwarded
// call. Lighter than whole gateways, so that a fleet of 1,000 fits.
func startNodeFleet(t *testing.T, n int) *gatewayFleet {
	t.Helper()
	f := &gatewayFleet{dir: t.TempDir()}
	var err error
	if f.ca, err = pki.NewCA("bench", time.Hour, pki.KeyECDSA); err != nil {
		t.Fatal(err)
	}
	f.write(t, "ca.crt", f.ca.CertPEM)
	for i := range n {
		f.ips = append(f.ips, fmt.Sprintf("127.0.%d.%d", 73+i/250, 1+i%250))
	}
	f.port = sharedPort(t, f.ips)
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(f.ca.CertPEM)
	for i, ip := range f.ips {
		crt, key, err := f.ca.IssueNode(fmt.Sprintf("node-%d", i+1), nil, []net.IP{net.ParseIP(ip)}, time.Hour, pki.KeyECDSA)
		if err != nil {
			t.Fatal(err)
		}
		pair, err := tls.X509KeyPair(crt, key)
		if err != nil {
			t.Fatal(err)
		}
		lis, err := net.Listen("tcp", net.JoinHostPort(ip, strconv.Itoa(f.port)))
		if err != nil {
			t.Fatal(err)
		}
		s := testbackend.New(fmt.Sprintf("node-%d", i+1), testbackend.Behaviour{})
		go func() {
			_ = s.Serve(tls.NewListener(lis, &tls.Config{Certificates: []tls.Certificate{pair}, ClientCAs: roots,
				ClientAuth: tls.RequireAndVerifyClientCert, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13}))
		}()
		t.Cleanup(s.Stop)
	}
	return f
}

// TestFanOutCalls: Version fanned out to every node of 20 and 100 (and,
// with APID_BENCH_SIZES=1000, 1,000) through apid and through the
// Talos-wired gateway, rounds interleaved, gateway CPU per call from /proc.
func TestFanOutCalls(t *testing.T) {
	if os.Getenv(fanOutEnv) == "" {
		t.Skipf("set %s=1 (make bench-fanout) to run the fan-out comparison", fanOutEnv)
	}
	sizes := []int{20, 100}
	if v := os.Getenv("APID_BENCH_SIZES"); v != "" {
		sizes = nil
		for _, s := range strings.Split(v, ",") {
			if n, err := strconv.Atoi(s); err == nil && n > 1 && n <= 1000 {
				sizes = append(sizes, n)
			}
		}
	}
	callers := 2
	if v, err := strconv.Atoi(os.Getenv("APID_BENCH_CALLERS")); err == nil && v > 0 {
		callers = v
	}
	rounds, window := benchRounds()
	var report strings.Builder
	bin := gatewayBinary(t)
	for _, n := range sizes {
		f := startNodeFleet(t, n)
		apid := startGatewayProcess(t, f, bin)
		talosGw := startTalosGatewayProcess(t, f, testbackend.Start(t, "talos-gateway", testbackend.Behaviour{}).Addr)
		var clients []*talos.Client
		for _, addr := range []string{apid.addr, talosGw.addr} {
			c, err := talos.New(context.Background(), talos.WithEndpoints(addr), talos.WithTLSConfig(f.clientTLS(t)))
			if err != nil {
				t.Fatal(err)
			}
			clients = append(clients, c)
		}
		fan := func(c *talos.Client) func(ctx context.Context, _, _ int) error {
			return func(ctx context.Context, _, _ int) error {
				resp, err := c.MachineClient.Version(talos.WithNodes(ctx, f.ips...), &emptypb.Empty{})
				if err != nil {
					return err
				}
				if len(resp.GetMessages()) != n {
					return fmt.Errorf("%d replies of %d nodes", len(resp.GetMessages()), n)
				}
				for _, m := range resp.GetMessages() {
					if m.GetMetadata().GetError() != "" {
						return fmt.Errorf("node %s: %s", m.GetMetadata().GetHostname(), m.GetMetadata().GetError())
					}
				}
				return nil
			}
		}
		res := interleaved(rounds, []func() concurrentSample{
			func() concurrentSample { return measureConcurrent(t, apid, callers, window, fan(clients[0])) },
			func() concurrentSample { return measureConcurrent(t, talosGw, callers, window, fan(clients[1])) },
		})
		fmt.Fprintf(&report, "\n%d nodes, Version with nodes: all, %d callers:\n\n%s", n, callers,
			comparisonTable(res, []string{"apid", "Talos wiring (siderolabs/grpc-proxy)"}))
		for _, c := range clients {
			c.Close()
		}
	}
	t.Logf("%d interleaved windows of %s per gateway, medians:\n%s", rounds, window, report.String())
	if out := os.Getenv("APID_BENCH_OUT"); out != "" {
		if err := os.WriteFile(out, []byte(report.String()), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
