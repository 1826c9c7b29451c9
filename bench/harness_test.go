package bench

import (
	"context"
	"fmt"
	"net"
	"os"
	"runtime"
	"runtime/metrics"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	mwitkow "github.com/mwitkow/grpc-proxy/proxy"
	siderolabs "github.com/siderolabs/grpc-proxy/proxy"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/aggregate"
	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/proxy"
)

// Every benchmark stops what it started; a goroutine left behind by a
// server, a connection or one of the proxies fails the run.
func TestMain(m *testing.M) {
	if cfg := os.Getenv(nodeEnv); cfg != "" { // this process is a node of BenchmarkNodeTransport
		if err := runNode(cfg); err != nil {
			fmt.Fprintln(os.Stderr, "node:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	if cfg := os.Getenv(talosGatewayEnv); cfg != "" { // this process is the Talos-wired gateway
		if err := runTalosGateway(cfg); err != nil {
			fmt.Fprintln(os.Stderr, "talos gateway:", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	// Idle fan-out workers exit on their own after a few seconds.
	goleak.VerifyTestMain(m, goleak.IgnoreTopFunction("github.com/apid/apid/proxy.(*workers).loop"))
}

// The variants, named as they appear after via= in benchmark names.
const (
	viaDirect     = "direct"     // client → backend
	viaApid       = "apid"       // client → apid's proxy.Handler → backend(s)
	viaMwitkow    = "mwitkow"    // client → mwitkow/grpc-proxy → backend
	viaSiderolabs = "siderolabs" // client → siderolabs/grpc-proxy → backend(s)
)

const dmesgMethod = "/machine.MachineService/Dmesg"

// serve runs a gRPC server built with opts on a fresh loopback port until
// the benchmark or test ends and returns its address.
func serve(tb testing.TB, opts ...grpc.ServerOption) string {
	tb.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		tb.Fatal(err)
	}
	srv := grpc.NewServer(opts...)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(lis)
	}()
	tb.Cleanup(func() {
		srv.Stop()
		<-done
	})
	return lis.Addr().String()
}

// dial returns a plain-text connection to addr, closed when tb ends.
func dial(tb testing.TB, addr string, opts ...grpc.DialOption) *grpc.ClientConn {
	tb.Helper()
	cc, err := grpc.NewClient(addr, append([]grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}, opts...)...)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cc.Close() })
	return cc
}

// dialForSiderolabs dials a backend the way Talos's apid does for
// siderolabs/grpc-proxy: the proxy's raw codec is the connection's default,
// because that proxy opens its backend streams without a codec option.
func dialForSiderolabs(tb testing.TB, addr string) *grpc.ClientConn {
	return dial(tb, addr, grpc.WithDefaultCallOptions(grpc.ForceCodecV2(siderolabs.Codec())))
}

// client returns a MachineService client of the server at addr.
func client(tb testing.TB, addr string) machine.MachineServiceClient {
	return machine.NewMachineServiceClient(dial(tb, addr))
}

// apidBackend is a backend of apid's proxy: a name and a ready connection.
type apidBackend struct {
	name string
	conn grpc.ClientConnInterface
}

func (b apidBackend) Name() string { return b.name }

func (b apidBackend) Connect(ctx context.Context, _ string) (context.Context, grpc.ClientConnInterface, func(), error) {
	return ctx, b.conn, nil, nil
}

// fixedDirector sends every call to the same backends, as one-to-one or
// one-to-many; Dmesg is the only streamed method the benchmarks call.
type fixedDirector struct {
	backends  []proxy.Backend
	oneToMany bool
}

func (d fixedDirector) Route(_ context.Context, method string) (proxy.Route, error) {
	kind := proxy.Unary
	if method == dmesgMethod {
		kind = proxy.ServerStream
	}
	mode := proxy.OneToOne
	if d.oneToMany {
		mode = proxy.OneToMany
	}
	return proxy.Route{Backends: d.backends, Mode: mode, Kind: kind}, nil
}

// startApid serves apid's proxy handler in front of backends and returns
// its address.
func startApid(tb testing.TB, oneToMany bool, backends ...proxy.Backend) string {
	h := proxy.NewHandler(fixedDirector{backends: backends, oneToMany: oneToMany}, proxy.Options{})
	return serve(tb, grpc.ForceServerCodecV2(proxy.Codec()), grpc.UnknownServiceHandler(h.StreamHandler()))
}

// startMwitkow serves mwitkow/grpc-proxy in front of one backend. That proxy
// needs no codec: it relays each message as the unknown fields of an Empty.
func startMwitkow(tb testing.TB, backend grpc.ClientConnInterface) string {
	director := func(ctx context.Context, _ string) (context.Context, grpc.ClientConnInterface, error) {
		return ctx, backend, nil
	}
	return serve(tb, grpc.UnknownServiceHandler(mwitkow.TransparentHandler(director)))
}

// siderolabsBackend is a backend of siderolabs/grpc-proxy that stamps and
// reports errors as Talos's apid does. The bytes it appends are built with
// the aggregate package, the same code apid's proxy uses, so that the
// comparison is about how the two proxies move and merge frames.
type siderolabsBackend struct {
	name string
	conn *grpc.ClientConn
}

func (b *siderolabsBackend) String() string { return b.name }

func (b *siderolabsBackend) GetConnection(ctx context.Context, _ string) (context.Context, *grpc.ClientConn, error) {
	return ctx, b.conn, nil
}

// AppendInfo stamps a reply with the backend's name: every entry of a unary
// reply, or the one streamed message, gets a field-1 common.Metadata.
func (b *siderolabsBackend) AppendInfo(streaming bool, resp []byte) ([]byte, error) {
	if streaming {
		return aggregate.StampMessage(nil, resp, b.name)
	}
	return aggregate.StampReply(nil, resp, b.name)
}

// BuildError turns the backend's failure into an error entry for its name.
func (b *siderolabsBackend) BuildError(streaming bool, err error) ([]byte, error) {
	st := status.Convert(err)
	if streaming {
		return aggregate.AppendErrorMessage(nil, b.name, st.Code(), st.Message()), nil
	}
	return aggregate.AppendErrorReply(nil, b.name, st.Code(), st.Message()), nil
}

// startSiderolabs serves siderolabs/grpc-proxy in front of backends, set up
// as its documentation asks: its codec forced on the server, and Dmesg
// declared as streamed so that one-to-many does not merge it.
func startSiderolabs(tb testing.TB, mode siderolabs.Mode, backends ...siderolabs.Backend) string {
	director := func(context.Context, string) (siderolabs.Mode, []siderolabs.Backend, error) {
		return mode, backends, nil
	}
	streamed := siderolabs.WithStreamedDetector(func(method string) bool { return method == dmesgMethod })
	return serve(tb, grpc.ForceServerCodecV2(siderolabs.Codec()),
		grpc.UnknownServiceHandler(siderolabs.TransparentHandler(director, streamed)))
}

// oneToOne returns a client of the variant via in front of the backend at
// addr. Each proxy gets a connection of its own to the backend.
func oneToOne(tb testing.TB, via, addr string) machine.MachineServiceClient {
	tb.Helper()
	switch via {
	case viaDirect:
		return client(tb, addr)
	case viaApid:
		return client(tb, startApid(tb, false, apidBackend{name: "node", conn: dial(tb, addr)}))
	case viaMwitkow:
		return client(tb, startMwitkow(tb, dial(tb, addr)))
	case viaSiderolabs:
		return client(tb, startSiderolabs(tb, siderolabs.One2One, &siderolabsBackend{name: "node", conn: dialForSiderolabs(tb, addr)}))
	}
	tb.Fatalf("no one-to-one variant %q", via)
	return nil
}

// fleet is the set of test backends a one-to-many call reaches.
type fleet struct {
	servers []*testbackend.Server
	size    int // number of backends the proxy sees
}

// maxFleetServers caps the gRPC servers behind one fleet; past it, several
// backends (each with its own client connection) share a server.
const maxFleetServers = 100

// sharedFleetServers is how many servers carry a fleet larger than
// maxFleetServers.
const sharedFleetServers = 50

// startFleet starts the servers for n backends with behaviour b: one server
// per backend up to maxFleetServers, otherwise sharedFleetServers servers
// shared round-robin. Each backend still dials its own connection, so the
// proxy sees n distinct backends and n TCP connections either way.
func startFleet(tb testing.TB, n int, b testbackend.Behaviour) *fleet {
	tb.Helper()
	servers := n
	if n > maxFleetServers {
		servers = sharedFleetServers
	}
	f := &fleet{size: n}
	for i := range servers {
		f.servers = append(f.servers, testbackend.Start(tb, fmt.Sprintf("server-%d", i), b))
	}
	return f
}

// backendName is the name the proxies stamp on backend i's replies.
func backendName(i int) string { return fmt.Sprintf("node-%d", i) }

// addr is the address backend i dials.
func (f *fleet) addr(i int) string { return f.servers[i%len(f.servers)].Addr }

// oneToMany returns a client of the variant via that fans every call out to
// the whole fleet over freshly dialled connections.
func (f *fleet) oneToMany(tb testing.TB, via string) machine.MachineServiceClient {
	tb.Helper()
	switch via {
	case viaApid:
		backends := make([]proxy.Backend, f.size)
		for i := range backends {
			backends[i] = apidBackend{name: backendName(i), conn: dial(tb, f.addr(i))}
		}
		return client(tb, startApid(tb, true, backends...))
	case viaSiderolabs:
		backends := make([]siderolabs.Backend, f.size)
		for i := range backends {
			backends[i] = &siderolabsBackend{name: backendName(i), conn: dialForSiderolabs(tb, f.addr(i))}
		}
		return client(tb, startSiderolabs(tb, siderolabs.One2Many, backends...))
	}
	tb.Fatalf("no one-to-many variant %q", via)
	return nil
}

// scope runs the cleanups registered through it when close is called
// rather than when the test or benchmark ends, so that a fixture can be
// shared by the rounds of one sub-benchmark and released before the next.
type scope struct {
	testing.TB
	cleanups []func()
}

func (s *scope) Cleanup(f func()) { s.cleanups = append(s.cleanups, f) }

// close runs the cleanups, last registered first.
func (s *scope) close() {
	for i := len(s.cleanups) - 1; i >= 0; i-- {
		s.cleanups[i]()
	}
	s.cleanups = nil
}

// benchContext is the context of a benchmark's calls: cancelled when it
// ends and without a deadline, so no variant pays for timers per call.
func benchContext(tb testing.TB) context.Context {
	ctx, cancel := context.WithCancel(context.Background())
	tb.Cleanup(cancel)
	return ctx
}

// runCalls runs call b.N times from callers goroutines sharing one client
// connection, timing only the calls. With one caller the calls are
// sequential, so ns/op is the latency; with more, ns/op is the wall time
// divided by b.N, the inverse of throughput.
func runCalls(b *testing.B, callers int, call func() error) {
	b.Helper()
	b.ResetTimer()
	if callers == 1 {
		for range b.N {
			if err := call(); err != nil {
				b.Fatal(err)
			}
		}
		b.StopTimer()
		return
	}
	var next atomic.Int64
	var failure atomic.Pointer[error]
	var wg sync.WaitGroup
	for range callers {
		wg.Go(func() {
			for next.Add(1) <= int64(b.N) {
				if err := call(); err != nil {
					failure.CompareAndSwap(nil, &err)
					return
				}
			}
		})
	}
	wg.Wait()
	b.StopTimer()
	if err := failure.Load(); err != nil {
		b.Fatal(*err)
	}
}

// reportCallRate adds the calls per second of the timed part of b.
func reportCallRate(b *testing.B) {
	if s := b.Elapsed().Seconds(); s > 0 {
		b.ReportMetric(float64(b.N)/s, "calls/s")
	}
}

// heapObjectsMetric is the heap memory taken by objects, live or not yet
// swept. runtime/metrics reads it without stopping the world, so it can be
// sampled while calls run.
const heapObjectsMetric = "/memory/classes/heap/objects:bytes"

// collectGarbage runs the collector twice: objects parked in sync.Pools
// survive the first cycle and are dropped by the second.
func collectGarbage() {
	runtime.GC()
	runtime.GC()
}

// heapPeak samples the heap while a benchmark runs and reports how far it
// rose above the live heap measured when it started.
type heapPeak struct {
	base uint64
	peak atomic.Uint64
	stop chan struct{}
	done chan struct{}
}

func heapObjects(s []metrics.Sample) uint64 {
	metrics.Read(s)
	return s[0].Value.Uint64()
}

// watchHeap collects garbage, notes the live heap and samples the heap
// every millisecond until growth is called.
func watchHeap() *heapPeak {
	collectGarbage()
	s := []metrics.Sample{{Name: heapObjectsMetric}}
	w := &heapPeak{base: heapObjects(s), stop: make(chan struct{}), done: make(chan struct{})}
	w.peak.Store(w.base)
	go func() {
		defer close(w.done)
		s := []metrics.Sample{{Name: heapObjectsMetric}}
		t := time.NewTicker(time.Millisecond)
		defer t.Stop()
		for {
			select {
			case <-w.stop:
				return
			case <-t.C:
				if v := heapObjects(s); v > w.peak.Load() {
					w.peak.Store(v)
				}
			}
		}
	}()
	return w
}

// report stops sampling and adds two metrics to b: heap-B, the peak heap
// above the live heap at the start, and retained-B, how much more the live
// heap holds at the end than at the start (what the calls leaked, if any).
func (w *heapPeak) report(b *testing.B) {
	close(w.stop)
	<-w.done
	b.ReportMetric(float64(w.peak.Load()-w.base), "heap-B")
	collectGarbage()
	live := heapObjects([]metrics.Sample{{Name: heapObjectsMetric}})
	b.ReportMetric(float64(live)-float64(w.base), "retained-B")
}
