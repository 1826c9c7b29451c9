package gateway

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"testing"

	grpcprom "github.com/grpc-ecosystem/go-grpc-middleware/providers/prometheus"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

type nopStream struct{ grpc.ServerStream }

func (nopStream) Context() context.Context { return context.Background() }
func (nopStream) SendMsg(any) error        { return nil }
func (nopStream) RecvMsg(any) error        { return nil }

// TestCallMetricsMatchTheProvider: the same calls through apid's call
// metrics and through go-grpc-middleware's Prometheus provider give the
// same series with the same counts (histograms compared by count).
func TestCallMetricsMatchTheProvider(t *testing.T) {
	buckets := prometheus.ExponentialBuckets(0.0005, 4, 10)
	ours := newCallMetrics(buckets)
	theirs := grpcprom.NewServerMetrics(grpcprom.WithServerHandlingTimeHistogram(grpcprom.WithHistogramBuckets(buckets)))
	ourUnary, theirUnary := ours.unaryInterceptor(func(m string) string { return m }), theirs.UnaryServerInterceptor()
	theirStream := theirs.StreamServerInterceptor()

	for _, code := range []codes.Code{codes.OK, codes.OK, codes.NotFound} {
		h := func(context.Context, any) (any, error) {
			if code == codes.OK {
				return "reply", nil
			}
			return nil, status.Error(code, "no")
		}
		info := &grpc.UnaryServerInfo{FullMethod: "/grpc.health.v1.Health/Check"}
		_, _ = ourUnary(context.Background(), "req", info, h)
		_, _ = theirUnary(context.Background(), "req", info, h)
	}
	streams := []struct {
		info       grpc.StreamServerInfo
		recv, sent int
		code       codes.Code
	}{
		{grpc.StreamServerInfo{FullMethod: "/machine.MachineService/Logs", IsServerStream: true}, 1, 5, codes.OK},
		{grpc.StreamServerInfo{FullMethod: "/machine.MachineService/EtcdRecover", IsClientStream: true}, 4, 1, codes.Unavailable},
		{grpc.StreamServerInfo{FullMethod: "/unknown/unknown", IsClientStream: true, IsServerStream: true}, 2, 2, codes.Unimplemented},
	}
	for _, s := range streams {
		h := func(_ any, ss grpc.ServerStream) error {
			for range s.recv {
				_ = ss.RecvMsg(nil)
			}
			for range s.sent {
				_ = ss.SendMsg(nil)
			}
			return status.Error(s.code, "end")
		}
		_ = ours.of(s.info.FullMethod, streamType(&s.info)).stream(nil, nopStream{}, h)
		_ = theirStream(nil, nopStream{}, &s.info, h)
	}
	// The proxy's way: every method a bidirectional stream, a unary one
	// counted as unary.
	_ = ours.of("/machine.MachineService/Version", typeUnary).unary(func() error { return nil })
	_, _ = theirUnary(context.Background(), nil, &grpc.UnaryServerInfo{FullMethod: "/machine.MachineService/Version"},
		func(context.Context, any) (any, error) { return nil, nil })

	dump := func(c prometheus.Collector) []string {
		reg := prometheus.NewRegistry()
		reg.MustRegister(c)
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		var out []string
		for _, f := range families {
			for _, m := range f.GetMetric() {
				var labels []string
				for _, l := range m.GetLabel() {
					labels = append(labels, l.GetName()+"="+l.GetValue())
				}
				v := m.GetCounter().GetValue()
				if h := m.GetHistogram(); h != nil {
					v = float64(h.GetSampleCount())
				}
				out = append(out, fmt.Sprintf("%s{%s} %v", f.GetName(), strings.Join(labels, ","), v))
			}
		}
		slices.Sort(out)
		return out
	}
	got, want := dump(ours), dump(theirs)
	if !slices.Equal(got, want) {
		t.Errorf("apid's series:\n%s\nthe provider's:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	if len(got) < 20 {
		t.Errorf("only %d series", len(got))
	}

	// Where apid differs on purpose: a code outside gRPC's 17 (a node made
	// it up) is counted as Unknown, not as a series of its own.
	_, _ = ourUnary(context.Background(), "req", &grpc.UnaryServerInfo{FullMethod: "/grpc.health.v1.Health/Check"},
		func(context.Context, any) (any, error) { return nil, status.Error(codes.Code(42), "made up") })
	after := dump(ours)
	if !slices.Contains(after, "grpc_server_handled_total{grpc_code=Unknown,grpc_method=Check,grpc_service=grpc.health.v1.Health,grpc_type=unary} 1") ||
		slices.ContainsFunc(after, func(s string) bool { return strings.Contains(s, "Code(42)") }) {
		t.Errorf("code 42 not counted as Unknown:\n%s", strings.Join(after, "\n"))
	}
}
