package test

import (
	"context"
	"encoding/hex"
	"fmt"
	"net"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// otlpReceiver is an OTLP/gRPC trace receiver: the collector's TraceService
// on a loopback port, keeping every span it is sent with the instance that
// sent it.
type otlpReceiver struct {
	collectortrace.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []receivedSpan
}

type receivedSpan struct {
	*tracepb.Span
	instance string
}

func (r *otlpReceiver) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rs := range req.ResourceSpans {
		instance := ""
		for _, a := range rs.GetResource().GetAttributes() {
			if a.Key == "service.instance.id" {
				instance = a.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.ScopeSpans {
			for _, s := range ss.Spans {
				r.spans = append(r.spans, receivedSpan{Span: s, instance: instance})
			}
		}
	}
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

func (r *otlpReceiver) trace(id []byte) []receivedSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []receivedSpan
	for _, s := range r.spans {
		if string(s.TraceId) == string(id) {
			out = append(out, s)
		}
	}
	return out
}

func startReceiver(t *testing.T, ip string) (*otlpReceiver, string) {
	t.Helper()
	lis, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		t.Fatal(err)
	}
	r := &otlpReceiver{}
	srv := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(srv, r)
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return r, lis.Addr().String()
}

// TestTraceOfAFanOut sends a fan-out to three nodes, each an apid process
// exporting to one OTLP receiver, with the caller's traceparent, and checks
// the trace: the gateway's server span under the caller's, a node span per
// node under it, and, under the node spans of the other two nodes, their
// apids' server spans.
func TestTraceOfAFanOut(t *testing.T) {
	// Spans reach the receiver within 200 ms instead of the SDK's 5 s.
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
	recv, addr := startReceiver(t, "127.0.64.1")
	c := startMemCluster(t, 64, 3, fmt.Sprintf("tracing:\n  endpoint: %q\n  insecure: true\n", addr))

	traceID := "4bf92f3577b34da6a3ce929d0e0e4736"
	ctx := metadata.AppendToOutgoingContext(testkit.Context(t),
		"traceparent", "00-"+traceID+"-00f067aa0ba902b7-01", "nodes", strings.Join(c.ips, ","))
	resp, err := machine.NewMachineServiceClient(c.dial(t, 0, c.admin)).Version(ctx, &emptypb.Empty{})
	if err != nil || len(resp.Messages) != 3 {
		t.Fatalf("fan-out: %v, %v", resp, err)
	}

	id, _ := hex.DecodeString(traceID)
	var spans []receivedSpan
	byID := map[string]receivedSpan{}
	var gateway receivedSpan
	nodeSpans := map[string]receivedSpan{}
	remote := map[string]bool{}
	complete := func() bool {
		spans = recv.trace(id)
		byID, nodeSpans, remote, gateway = map[string]receivedSpan{}, map[string]receivedSpan{}, map[string]bool{}, receivedSpan{}
		for _, s := range spans {
			byID[string(s.SpanId)] = s
		}
		for _, s := range spans {
			if s.Kind == tracepb.Span_SPAN_KIND_SERVER && s.instance == c.ips[0] && hex.EncodeToString(s.ParentSpanId) == "00f067aa0ba902b7" {
				gateway = s
			}
		}
		if gateway.Span == nil {
			return false
		}
		for _, s := range spans {
			if strings.HasPrefix(s.Name, "apid.node ") && string(s.ParentSpanId) == string(gateway.SpanId) {
				nodeSpans[strings.TrimPrefix(s.Name, "apid.node ")] = s
			}
		}
		// A remote apid's server span, two levels under a node span (the
		// gRPC client span between them).
		for _, s := range spans {
			if s.Kind != tracepb.Span_SPAN_KIND_SERVER || s.instance == c.ips[0] {
				continue
			}
			if client, ok := byID[string(s.ParentSpanId)]; ok {
				if n, ok := byID[string(client.ParentSpanId)]; ok && strings.HasPrefix(n.Name, "apid.node ") && n.Name == "apid.node "+s.instance {
					remote[s.instance] = true
				}
			}
		}
		return len(nodeSpans) == 3 && len(remote) == 2
	}
	if !testkit.Eventually(20*time.Second, complete) {
		t.Fatalf("trace incomplete after 20 s: gateway span %v, node spans %d, remote apids %v\n%s",
			gateway.Span != nil, len(nodeSpans), remote, tree(spans))
	}
	for _, ip := range c.ips {
		s, ok := nodeSpans[ip]
		if !ok {
			t.Fatalf("no node span for %s", ip)
		}
		var node, code string
		for _, a := range s.Attributes {
			switch a.Key {
			case "apid.node":
				node = a.GetValue().GetStringValue()
			case "rpc.grpc.status_code":
				code = a.GetValue().GetStringValue()
			}
		}
		if node != ip || code != "OK" {
			t.Errorf("node span of %s: apid.node %q, code %q", ip, node, code)
		}
	}
	t.Logf("trace %s, %d spans:\n%s", traceID, len(spans), tree(spans))
}

// tree draws spans as an indented tree, by parent.
func tree(spans []receivedSpan) string {
	children := map[string][]receivedSpan{}
	ids := map[string]bool{}
	for _, s := range spans {
		ids[string(s.SpanId)] = true
	}
	var roots []receivedSpan
	for _, s := range spans {
		if ids[string(s.ParentSpanId)] {
			children[string(s.ParentSpanId)] = append(children[string(s.ParentSpanId)], s)
		} else {
			roots = append(roots, s)
		}
	}
	var b strings.Builder
	var walk func(s receivedSpan, depth int)
	walk = func(s receivedSpan, depth int) {
		fmt.Fprintf(&b, "%s%s [%s, %s] %.2f ms\n", strings.Repeat("  ", depth), s.Name,
			strings.TrimPrefix(s.Kind.String(), "SPAN_KIND_"), s.instance, float64(s.EndTimeUnixNano-s.StartTimeUnixNano)/1e6)
		kids := children[string(s.SpanId)]
		sort.Slice(kids, func(i, j int) bool { return kids[i].StartTimeUnixNano < kids[j].StartTimeUnixNano })
		for _, k := range kids {
			walk(k, depth+1)
		}
	}
	for _, r := range roots {
		walk(r, 0)
	}
	return b.String()
}
