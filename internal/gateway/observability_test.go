package gateway

import (
	"crypto/tls"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/director"
	"github.com/apid/apid/internal/testkit"
)

// closedPort returns a port on 127.0.0.1 nothing listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	return port
}

// families returns the metric families a /metrics page declares.
func families(page string) map[string]bool {
	out := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^# TYPE (\S+) `).FindAllStringSubmatch(page, -1) {
		out[m[1]] = true
	}
	return out
}

// TestObservability makes a fan-out with a dead node, a one-to-one call,
// calls of made-up methods and two reloads, then checks the audit line,
// every metric the README documents, every metric the Grafana dashboard
// queries, that made-up methods add one series, and /nodes.
func TestObservability(t *testing.T) {
	tg := startGateway(t, func(c *Config) { c.Nodes.Port = closedPort(t) })
	ctx := testkit.Context(t)
	cc := tg.client("admin", certs.RoleAdmin)
	mc := machine.NewMachineServiceClient(cc)
	resp, err := mc.Version(metadata.AppendToOutgoingContext(ctx, "nodes", "127.0.0.1,127.0.0.2"), &emptypb.Empty{})
	if err != nil || len(resp.Messages) != 2 || resp.Messages[1].Metadata.GetError() == "" {
		t.Fatalf("fan-out with a dead node: %v, %v", resp, err)
	}
	if _, err := mc.Version(metadata.AppendToOutgoingContext(ctx, "node", "127.0.0.1"), &emptypb.Empty{}); err != nil {
		t.Fatal(err)
	}
	for i := range 30 {
		err := cc.Invoke(ctx, fmt.Sprintf("/random%d.Service/Method%d", i, i), &emptypb.Empty{}, &emptypb.Empty{})
		if status.Code(err) != codes.Unimplemented {
			t.Fatalf("made-up method: %v", err)
		}
	}
	// A client without a certificate: the handshake fails, is counted and
	// logged.
	if conn, err := tls.Dial("tcp", tg.addr, &tls.Config{InsecureSkipVerify: true, NextProtos: []string{"h2"}}); err == nil {
		_, _ = conn.Read(make([]byte, 1)) // TLS 1.3: the refusal comes as an alert on the first read
		conn.Close()
	}
	// The server counts the failure as its handshake returns, which may be
	// just after the client has read the alert.
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(tg.logs.String(), "TLS handshake refused") && time.Now().Before(deadline); {
		time.Sleep(10 * time.Millisecond)
	}

	next := tg.gw.Config()
	next.Routing.NodeTimeout = 7e9
	if err := tg.gw.Reload(next); err != nil {
		t.Fatal(err)
	}
	next.LogFormat = "xml"
	if err := tg.gw.Reload(next); err == nil {
		t.Fatal("an invalid reload was accepted")
	}

	// The audit line of the fan-out, with every key.
	var audit map[string]any
	for _, line := range strings.Split(tg.logs.String(), "\n") {
		var m map[string]any
		if json.Unmarshal([]byte(line), &m) == nil && m["msg"] == "call" && m["mode"] == "fan-out" {
			audit = m
			break
		}
	}
	if audit == nil {
		t.Fatalf("no JSON audit line of the fan-out in:\n%s", tg.logs.String())
	}
	for _, k := range []string{"method", "mode", "nodes", "failed", "peer", "roles", "remote", "code", "duration_ms", "bytes_in", "bytes_out"} {
		if _, ok := audit[k]; !ok {
			t.Errorf("audit line lacks %q: %v", k, audit)
		}
	}
	if nodes, _ := audit["nodes"].(map[string]any); nodes["count"] != 2.0 {
		t.Errorf("audit nodes = %v, want count 2", audit["nodes"])
	}
	if failed, _ := audit["failed"].(map[string]any); failed["127.0.0.2"] != "Unavailable" {
		t.Errorf("audit failed = %v, want 127.0.0.2: Unavailable", audit["failed"])
	}
	if audit["peer"] != "admin" || audit["code"] != "OK" || audit["bytes_out"].(float64) == 0 {
		t.Errorf("audit line %v", audit)
	}
	if !strings.Contains(tg.logs.String(), "TLS handshake refused") {
		t.Error("the failed handshake was not logged")
	}
	if strings.Contains(tg.logs.String(), "BEGIN") {
		t.Error("key material in the log")
	}

	code, page := tg.get("/metrics")
	if code != 200 {
		t.Fatalf("/metrics: %d", code)
	}
	exported := families(page)

	// Every metric the README documents is exported.
	readme, err := os.ReadFile("../../README.md")
	if err != nil {
		t.Fatal(err)
	}
	table := regexp.MustCompile(`(?s)<!-- metrics -->(.*)<!-- /metrics -->`).FindSubmatch(readme)
	if table == nil {
		t.Fatal("README.md has no metrics table")
	}
	documented := regexp.MustCompile("(?m)^\\| `([a-z_]+)`").FindAllSubmatch(table[1], -1)
	if len(documented) < 15 {
		t.Fatalf("README metrics table lists %d metrics", len(documented))
	}
	for _, m := range documented {
		if !exported[string(m[1])] {
			t.Errorf("README documents %s, which /metrics does not export", m[1])
		}
	}
	// ... and every apid metric exported is documented.
	for name := range exported {
		if strings.HasPrefix(name, "apid_") || strings.HasPrefix(name, "grpc_") {
			if !strings.Contains(string(table[1]), "`"+name+"`") {
				t.Errorf("%s is exported but not in the README's table", name)
			}
		}
	}

	// Every metric the dashboard queries is exported.
	dash, err := os.ReadFile("../../deploy/grafana/apid.json")
	if err != nil {
		t.Fatal(err)
	}
	var board struct {
		Panels []struct {
			Title   string
			Targets []struct{ Expr string }
		}
	}
	if err := json.Unmarshal(dash, &board); err != nil {
		t.Fatal(err)
	}
	queried := 0
	for _, p := range board.Panels {
		for _, target := range p.Targets {
			for _, name := range regexp.MustCompile(`\b(?:apid|grpc_server)_[a-z_]+\b`).FindAllString(target.Expr, -1) {
				base := regexp.MustCompile(`_(bucket|sum|count)$`).ReplaceAllString(name, "")
				if !exported[name] && !exported[base] {
					t.Errorf("dashboard panel %q queries %s, which apid does not export", p.Title, name)
				}
				queried++
			}
		}
	}
	if queried < 10 {
		t.Fatalf("the dashboard queries %d metrics", queried)
	}

	// Made-up methods share one series.
	for _, want := range []string{
		`grpc_server_handled_total{grpc_code="Unimplemented",grpc_method="unknown",grpc_service="unknown",grpc_type="bidi_stream"} 30`, // a method apid does not know is relayed as a stream both ways
		`grpc_server_handled_total{grpc_code="OK",grpc_method="Version",grpc_service="machine.MachineService",grpc_type="unary"} 2`,
		`apid_fanout_node_results_total{code="Unavailable",kind="unary"} 1`,
		// A node that never answered is not a label value of its own.
		`apid_node_calls_total{code="Unavailable",node="unanswered"} 1`,
		`apid_node_calls_total{code="OK",node="127.0.0.1"} 2`,
		`apid_reloads_total{result="success",what="config"} 1`,
		`apid_reloads_total{result="failure",what="config"} 1`,
		`apid_certificate_expiry_seconds{kind="serving",subject="CN=node-1"}`,
		`apid_certificate_expiry_seconds{kind="forwarding",subject="CN=node-1,O=os:impersonator"}`,
		`apid_handshake_failures_total 1`,
	} {
		if !strings.Contains(page, want) {
			t.Errorf("/metrics lacks %s\n%s", want, regexp.MustCompile(`(?m)^grpc_server_handled_total.*$`).FindAllString(page, -1))
		}
	}
	if strings.Contains(page, "random") {
		t.Error("a made-up method name became a label value")
	}

	// The node page.
	code, body := tg.get("/nodes?format=json")
	var nodes nodesPage
	if code != 200 || json.Unmarshal([]byte(body), &nodes) != nil {
		t.Fatalf("/nodes?format=json: %d %s", code, body)
	}
	seen := map[string]NodeStatus{}
	for _, n := range nodes.Nodes {
		seen[n.Node] = n
	}
	if n := seen["127.0.0.2"]; n.LastError == nil || n.LastError.Code != "Unavailable" || n.Calls["Unavailable"] != 1 {
		t.Errorf("/nodes on the dead node: %+v", n)
	}
	if n := seen["127.0.0.1"]; n.Connection != "local" || n.Calls["OK"] != 2 || n.LatencyMs == nil {
		t.Errorf("/nodes on this node: %+v", n)
	}
	if code, text := tg.get("/nodes"); code != 200 || !strings.Contains(text, "NODE") || !strings.Contains(text, "127.0.0.2") {
		t.Errorf("/nodes as text: %d\n%s", code, text)
	}
}

// TestEjection: a node that refuses three fan-outs in a row is ejected;
// the next fan-out gets its entry at once saying so, the log, /nodes and
// the metrics show it, and the healthy node's replies are whole.
func TestEjection(t *testing.T) {
	tg := startGateway(t, func(c *Config) {
		c.Nodes.Port = closedPort(t)
		c.Routing.Ejection = director.EjectionConfig{ConsecutiveFailures: 3, BaseTime: time.Minute, MaxTime: time.Minute, MaxPercent: 50}
	})
	mc := machine.NewMachineServiceClient(tg.client("admin", certs.RoleAdmin))
	ctx := metadata.AppendToOutgoingContext(testkit.Context(t), "nodes", "127.0.0.1,127.0.0.3")
	var last *machine.VersionResponse
	for i := range 4 {
		resp, err := mc.Version(ctx, &emptypb.Empty{})
		if err != nil || len(resp.Messages) != 2 || resp.Messages[0].Metadata.GetError() != "" {
			t.Fatalf("fan-out %d: %v, %v", i+1, resp, err)
		}
		last = resp
	}
	entry := last.Messages[1].Metadata
	if !strings.Contains(entry.GetError(), "ejected since") || entry.GetStatus().GetCode() != int32(codes.Unavailable) {
		t.Fatalf("4th fan-out's entry for the refusing node: %v", entry)
	}
	if !strings.Contains(tg.logs.String(), `"msg":"node ejected"`) {
		t.Errorf("ejection not logged:\n%s", tg.logs.String())
	}
	_, page := tg.get("/metrics")
	for _, want := range []string{"apid_nodes_ejected 1", "apid_node_ejections_total 1"} {
		if !strings.Contains(page, want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	_, body := tg.get("/nodes?format=json")
	var nodes nodesPage
	if err := json.Unmarshal([]byte(body), &nodes); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes.Nodes {
		if n.Node == "127.0.0.3" && (n.Ejected == nil || n.Ejected.Failures != 3) {
			t.Errorf("/nodes on the ejected node: %+v", n)
		}
	}
	// One-to-one to the ejected node fails at once too.
	_, err := mc.Version(metadata.AppendToOutgoingContext(testkit.Context(t), "node", "127.0.0.3"), &emptypb.Empty{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "ejected") {
		t.Fatalf("one-to-one to an ejected node: %v", err)
	}
}
