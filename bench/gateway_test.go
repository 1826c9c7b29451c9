package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/gateway"
	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testpki"
	"github.com/apid/apid/pki"
)

// spanCounter is an OTLP/gRPC trace receiver that counts what it is sent.
type spanCounter struct {
	collectortrace.UnimplementedTraceServiceServer
	spans atomic.Int64
}

func (s *spanCounter) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	for _, rs := range req.ResourceSpans {
		for _, ss := range rs.ScopeSpans {
			s.spans.Add(int64(len(ss.Spans)))
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

// gatewayFleet is whole gateways running in this process, one per node,
// on consecutive loopback addresses and one port, each with its own local
// backend; the audit log is on (info level) and discarded.
type gatewayFleet struct {
	ips  []string
	port int
	ca   *pki.CA
	dir  string
}

// fleetOptions shape a gatewayFleet.
type fleetOptions struct {
	nodes   int
	firstIP [4]byte // node i is firstIP + i
	// backend returns the local backend address of node i (default: a
	// test backend on a unix socket).
	backend func(i int, name string) string
	// tracing, when set, is the OTLP receiver every gateway exports to.
	tracing string
}

func startGatewayFleet(tb testing.TB, o fleetOptions) *gatewayFleet {
	tb.Helper()
	f := &gatewayFleet{dir: tb.TempDir()}
	var err error
	if f.ca, err = pki.NewCA("bench", time.Hour, pki.KeyECDSA); err != nil {
		tb.Fatal(err)
	}
	caFile := f.write(tb, "ca.crt", f.ca.CertPEM)
	for i := range o.nodes {
		ip := o.firstIP
		ip[3] += byte(i)
		f.ips = append(f.ips, net.IP(ip[:]).String())
	}
	f.port = sharedPort(tb, f.ips)
	level := new(slog.LevelVar)
	log := gateway.NewLogger(discard{}, level, "json")
	for i, ip := range f.ips {
		name := fmt.Sprintf("node-%d", i+1)
		files := testpki.WriteNode(tb, f.ca, f.dir, name, net.ParseIP(ip))
		cfg := gateway.Default()
		cfg.TLS.CA, cfg.TLS.Cert, cfg.TLS.Key = caFile, files.Cert, files.Key
		cfg.TLS.ClientCert, cfg.TLS.ClientKey = files.ClientCert, files.ClientKey
		if o.backend != nil {
			cfg.Backend = o.backend(i, name)
		} else {
			cfg.Backend = f.agent(tb, name)
		}
		cfg.Nodes.Port = f.port
		cfg.Routing.SelfNames = []string{ip}
		cfg.AdminListen = ""
		cfg.DrainDelay = 0
		// A benchmark loop is one identity calling as fast as it can.
		cfg.Limits.CallsPerSecondPerIdentity, cfg.Limits.CallBurstPerIdentity = 1e9, 1e9
		cfg.Limits.ConcurrentCallsPerIdentity = 1 << 20
		cfg.Tracing = gateway.TracingConfig{Endpoint: o.tracing, Insecure: true, SampleRatio: 1}
		gw, err := gateway.New(cfg, log)
		if err != nil {
			tb.Fatal(err)
		}
		lis, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(f.port)))
		if err != nil {
			tb.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		served := make(chan struct{})
		go func() {
			_ = gw.Serve(ctx, lis)
			close(served)
		}()
		tb.Cleanup(func() {
			cancel()
			<-served
			gw.Close()
		})
	}
	return f
}

func (f *gatewayFleet) write(tb testing.TB, name string, data []byte) string {
	tb.Helper()
	path := filepath.Join(f.dir, name)
	if err := pki.WriteFile(path, data, 0o600, true); err != nil {
		tb.Fatal(err)
	}
	return path
}

// agent runs a test backend on a unix socket, as a node's local agent, and
// returns its address.
func (f *gatewayFleet) agent(tb testing.TB, name string) string {
	tb.Helper()
	sock := filepath.Join(f.dir, name+".sock")
	lis, err := net.Listen("unix", sock)
	if err != nil {
		tb.Fatal(err)
	}
	b := testbackend.New(name, testbackend.Behaviour{})
	go func() { _ = b.Serve(lis) }()
	tb.Cleanup(b.Stop)
	return "unix://" + sock
}

// clientTLS is an os:admin client's TLS configuration for the fleet.
func (f *gatewayFleet) clientTLS(tb testing.TB) *tls.Config {
	tb.Helper()
	crt, key, err := f.ca.IssueClient("bench", []string{certs.RoleAdmin}, time.Hour, pki.KeyECDSA)
	if err != nil {
		tb.Fatal(err)
	}
	pair, err := tls.X509KeyPair(crt, key)
	if err != nil {
		tb.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(f.ca.CertPEM)
	return &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}}
}

// startGateways runs n gateways with test backends on 127.0.66.1 and up,
// tracing to an OTLP receiver when traced, and returns a client of the
// first, the node addresses and the receiver.
func startGateways(tb testing.TB, n int, traced bool) (machine.MachineServiceClient, []string, *spanCounter) {
	tb.Helper()
	counter := &spanCounter{}
	var endpoint string
	if traced {
		endpoint = serveOn(tb, "127.0.66.100:0", func(s *grpc.Server) { collectortrace.RegisterTraceServiceServer(s, counter) })
	}
	f := startGatewayFleet(tb, fleetOptions{nodes: n, firstIP: [4]byte{127, 0, 66, 1}, tracing: endpoint})
	cc, err := grpc.NewClient(net.JoinHostPort(f.ips[0], fmt.Sprint(f.port)), grpc.WithTransportCredentials(credentials.NewTLS(f.clientTLS(tb))))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cc.Close() })
	return machine.NewMachineServiceClient(cc), f.ips, counter
}

// sharedPort is a TCP port free on every one of ips.
func sharedPort(tb testing.TB, ips []string) int {
	tb.Helper()
	for try := 0; try < 50; try++ {
		l, err := net.Listen("tcp", ips[0]+":0")
		if err != nil {
			tb.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		ok := true
		open := []net.Listener{l}
		for _, ip := range ips[1:] {
			o, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
			if err != nil {
				ok = false
				break
			}
			open = append(open, o)
		}
		for _, o := range open {
			o.Close()
		}
		if ok {
			return port
		}
	}
	tb.Fatal("no port free on every address")
	return 0
}

// serveOn runs a gRPC server on addr until the benchmark ends.
func serveOn(tb testing.TB, addr string, register func(*grpc.Server)) string {
	tb.Helper()
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		tb.Fatal(err)
	}
	s := grpc.NewServer()
	register(s)
	go func() { _ = s.Serve(lis) }()
	tb.Cleanup(s.Stop)
	return lis.Addr().String()
}

type discard struct{}

func (discard) Write(p []byte) (int, error) { return len(p), nil }

// BenchmarkGatewayFanOut measures whole gateways (TLS, interceptors, audit
// log, metrics, node statistics): Version fanned out by one gateway to
// three nodes, itself and two other gateways, with tracing off and on
// (every call sampled and exported to an OTLP receiver on loopback).
// Compare tracing=on with tracing=off of the same run.
func BenchmarkGatewayFanOut(b *testing.B) {
	for _, tracing := range []string{"off", "on"} {
		b.Run("tracing="+tracing, func(b *testing.B) {
			c, ips, counter := startGateways(b, 3, tracing == "on")
			ctx := metadata.AppendToOutgoingContext(context.Background(), "nodes", strings.Join(ips, ","))
			if _, err := c.Version(ctx, &emptypb.Empty{}); err != nil {
				b.Fatal(err)
			}
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				resp, err := c.Version(ctx, &emptypb.Empty{})
				if err != nil || len(resp.Messages) != 3 {
					b.Fatalf("fan-out: %v, %v", resp, err)
				}
			}
			b.StopTimer()
			if tracing == "on" && counter.spans.Load() == 0 {
				// Spans are batched; at least the first batch is out by now
				// on any run longer than the SDK's 5 s delay.
				b.Logf("no span received yet (a short run: the SDK batches every 5 s)")
			}
		})
	}
}

// BenchmarkGatewayOneToOne measures whole gateways on the path talosctl
// v1.14 takes: Version with node set, from one client connection through
// the first gateway to the second, 32 callers at once. For profiles of
// apid's share of a one-to-one call (the node's apid is in the profile too:
// it answers as the local route).
func BenchmarkGatewayOneToOne(b *testing.B) {
	c, ips, _ := startGateways(b, 2, false)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "node", ips[1])
	if _, err := c.Version(ctx, &emptypb.Empty{}); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	b.SetParallelism(16) // 32 callers on 2 cores
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			if _, err := c.Version(ctx, &emptypb.Empty{}); err != nil {
				b.Error(err)
				return
			}
		}
	})
}
