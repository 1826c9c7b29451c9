package test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// testZone is an authoritative DNS server on loopback, in this process,
// whose records the test sets.
type testZone struct {
	mu      sync.Mutex
	records []dns.RR
}

func (z *testZone) set(rrs ...string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.records = nil
	for _, s := range rrs {
		rr, err := dns.NewRR(s)
		if err != nil {
			panic(err)
		}
		z.records = append(z.records, rr)
	}
}

func (z *testZone) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	z.mu.Lock()
	defer z.mu.Unlock()
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	q := r.Question[0]
	for _, rr := range z.records {
		if strings.EqualFold(rr.Header().Name, q.Name) && rr.Header().Rrtype == q.Qtype {
			m.Answer = append(m.Answer, rr)
		}
	}
	_ = w.WriteMsg(m)
}

func startZone(t *testing.T) (*testZone, string) {
	t.Helper()
	z := &testZone{}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	srv := &dns.Server{PacketConn: pc, Handler: z, NotifyStartedFunc: func() { close(started) }}
	go func() { _ = srv.ActivateAndServe() }()
	<-started
	t.Cleanup(func() { _ = srv.Shutdown() })
	return z, pc.LocalAddr().String()
}

// TestInventorySources runs three apid processes whose inventory comes from
// a watched file and from a DNS server on loopback, and checks names,
// groups, their changes, and that a node must prove the identity the
// inventory gives it.
func TestInventorySources(t *testing.T) {
	zone, server := startZone(t)
	dir := t.TempDir()
	nodesFile := filepath.Join(dir, "nodes.yaml")
	ips := []string{"127.0.82.11", "127.0.82.12", "127.0.82.13"}
	writeNodes := func(body string) {
		t.Helper()
		tmp := nodesFile + ".new"
		if err := os.WriteFile(tmp, []byte("nodes:\n"+body), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, nodesFile); err != nil {
			t.Fatal(err)
		}
	}
	// The certificates are node-1..3's (apid gen node -name node-i -ip IP):
	// inventory names differ from them on purpose; identities do not.
	writeNodes(fmt.Sprintf("- {name: alpha, address: %s, identity: node-1, role: controlplane}\n"+
		"- {name: beta, address: %s, identity: node-2, role: controlplane}\n", ips[0], ips[1]))
	zone.set("_apid._tcp.apid.test. 1 IN SRV 0 0 1 node-3.", "node-3. 1 IN A "+ips[2])

	c := startMemClusterOn(t, ips, fmt.Sprintf("inventory:\n  files: [%q]\n  dns: [{name: _apid._tcp.apid.test, labels: {from: dns}}]\n  dnsServer: %q\n",
		nodesFile, server), func(port int) {
		// The SRV record carries the port, known only now.
		zone.set(fmt.Sprintf("_apid._tcp.apid.test. 1 IN SRV 0 0 %d node-3.", port), "node-3. 1 IN A "+ips[2])
	})
	mc := machine.NewMachineServiceClient(c.dial(t, 0, c.admin))
	version := func(nodes ...string) []string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		var kv []string
		for _, n := range nodes {
			kv = append(kv, "nodes", n)
		}
		resp, err := mc.Version(metadata.AppendToOutgoingContext(ctx, kv...), &emptypb.Empty{})
		if err != nil {
			t.Fatalf("nodes %v: %v", nodes, err)
		}
		var got []string
		for _, m := range resp.GetMessages() {
			e := m.GetMetadata().GetHostname()
			if err := m.GetMetadata().GetError(); err != "" {
				e += ": " + err
			}
			got = append(got, e)
		}
		return got
	}
	waitNodes := func(want string, nodes ...string) {
		t.Helper()
		var got []string
		if !testkit.Eventually(15*time.Second, func() bool {
			got = version(nodes...)
			return strings.Join(got, ",") == want
		}) {
			t.Fatalf("nodes %v: %q, want %q", nodes, got, want)
		}
	}

	waitNodes("alpha,beta", "@controlplane")
	waitNodes("node-3", "@from=dns")
	waitNodes("alpha,beta,node-3", "@all")

	// The file changes: a node joins; the apid processes see it without a
	// reload.
	writeNodes(fmt.Sprintf("- {name: alpha, address: %s, identity: node-1, role: controlplane}\n"+
		"- {name: beta, address: %s, identity: node-2, role: controlplane}\n"+
		"- {name: gamma, address: %s, identity: node-3, role: controlplane}\n", ips[0], ips[1], ips[2]))
	waitNodes("alpha,beta,gamma", "@controlplane")

	// A node whose certificate does not carry the identity the inventory
	// gives it is refused: its entry is an error, the others answer.
	writeNodes(fmt.Sprintf("- {name: alpha, address: %s, identity: node-1, role: controlplane}\n"+
		"- {name: liar, address: %s, identity: node-1, role: controlplane}\n", ips[0], ips[1]))
	var got []string
	if !testkit.Eventually(15*time.Second, func() bool {
		got = version("@controlplane")
		return len(got) == 2 && got[0] == "alpha" && strings.HasPrefix(got[1], "liar: ")
	}) {
		t.Fatalf("@controlplane with a liar: %q", got)
	}
	if !strings.Contains(got[1], "certificate") {
		t.Errorf("the liar's entry does not say why: %q", got[1])
	}

	// DNS changes on the record's TTL (1 s): node-3 leaves the SRV set,
	// and with it the only node labelled from=dns.
	zone.set()
	if !testkit.Eventually(15*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "nodes", "@from=dns"), 10*time.Second)
		defer cancel()
		_, err := mc.Version(ctx, &emptypb.Empty{})
		return status.Code(err) == codes.InvalidArgument && strings.Contains(err.Error(), "unknown group @from=dns")
	}) {
		t.Fatal("@from=dns still known after its records went")
	}
}
