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

	"github.com/apid/apid/agent"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/gateway"
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

// startGateways runs n whole gateways in this process, each with its
// example agent, on 127.0.66.1 and up (one port), with tracing exported to
// an OTLP receiver when traced. The audit log is on (info level) and
// discarded. It returns a client of the first gateway and the node names.
func startGateways(tb testing.TB, n int, traced bool) (machine.MachineServiceClient, []string, *spanCounter) {
	tb.Helper()
	dir := tb.TempDir()
	ca, err := pki.NewCA("bench", time.Hour, pki.KeyECDSA)
	if err != nil {
		tb.Fatal(err)
	}
	write := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		if err := pki.WriteFile(path, data, 0o600, true); err != nil {
			tb.Fatal(err)
		}
		return path
	}
	caFile := write("ca.crt", ca.CertPEM)
	ips := make([]string, n)
	for i := range ips {
		ips[i] = fmt.Sprintf("127.0.66.%d", i+1)
	}
	port := sharedPort(tb, ips)

	counter := &spanCounter{}
	var endpoint string
	if traced {
		endpoint = serveOn(tb, "127.0.66.100:0", func(s *grpc.Server) { collectortrace.RegisterTraceServiceServer(s, counter) })
	}
	level := new(slog.LevelVar)
	log := gateway.NewLogger(discard{}, level, "json")
	for i, ip := range ips {
		name := fmt.Sprintf("node-%d", i+1)
		crt, key, err := ca.IssueNode(name, nil, []net.IP{net.ParseIP(ip)}, time.Hour, pki.KeyECDSA)
		if err != nil {
			tb.Fatal(err)
		}
		sock := filepath.Join(dir, name+".sock")
		agentLis, err := agent.Listen("unix://" + sock)
		if err != nil {
			tb.Fatal(err)
		}
		agentSrv := grpc.NewServer()
		agent.New(agent.Config{Hostname: name}).Register(agentSrv)
		go func() { _ = agentSrv.Serve(agentLis) }()
		tb.Cleanup(agentSrv.Stop)

		cfg := gateway.Default()
		cfg.CA, cfg.Cert, cfg.Key = caFile, write(name+".crt", crt), write(name+".key", key)
		cfg.Backend = "unix://" + sock
		cfg.RemotePort = port
		cfg.SelfNames = []string{ip}
		cfg.AdminListen = ""
		cfg.DrainDelay = 0
		// A benchmark loop is one identity calling as fast as it can.
		cfg.Limits.CallsPerSecondPerIdentity, cfg.Limits.CallBurstPerIdentity = 1e9, 1e9
		cfg.Tracing = gateway.TracingConfig{Endpoint: endpoint, Insecure: true, SampleRatio: 1}
		gw, err := gateway.New(cfg, log)
		if err != nil {
			tb.Fatal(err)
		}
		lis, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
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

	crt, key, err := ca.IssueClient("bench", []string{certs.RoleAdmin}, time.Hour, pki.KeyECDSA)
	if err != nil {
		tb.Fatal(err)
	}
	pair, err := tls.X509KeyPair(crt, key)
	if err != nil {
		tb.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.CertPEM)
	cc, err := grpc.NewClient(net.JoinHostPort(ips[0], fmt.Sprint(port)), grpc.WithTransportCredentials(credentials.NewTLS(
		&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}})))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { cc.Close() })
	return machine.NewMachineServiceClient(cc), ips, counter
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
