package gateway

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"strconv"
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
	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/pki"
)

// TestStaticInventoryReloads: the inventory of the config file is applied
// with the rest of it on a reload, for calls that start afterwards.
func TestStaticInventoryReloads(t *testing.T) {
	tg := startGateway(t, func(c *Config) {
		c.Inventory.Nodes = []inventory.Node{{Name: "self", Address: "127.0.0.1", Role: "controlplane"}}
	})
	mc := machine.NewMachineServiceClient(tg.client("admin", certs.RoleAdmin))
	version := func(nodes string) ([]string, error) {
		ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "nodes", nodes), 10*time.Second)
		defer cancel()
		resp, err := mc.Version(ctx, &emptypb.Empty{})
		var got []string
		for _, m := range resp.GetMessages() {
			got = append(got, m.GetMetadata().GetHostname())
		}
		return got, err
	}
	if got, err := version("@controlplane"); err != nil || strings.Join(got, ",") != "self" {
		t.Fatalf("@controlplane = %v, %v", got, err)
	}
	if _, err := version("@workers"); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "group @workers has no nodes") {
		t.Fatalf("@workers before the reload: %v", err)
	}

	next := tg.cfg
	next.Inventory.Nodes = []inventory.Node{
		{Name: "self", Address: "127.0.0.1", Role: "controlplane"},
		{Name: "also-self", Address: "node-1", Labels: map[string]string{"zone": "z1"}},
	}
	if err := tg.gw.Reload(next); err != nil {
		t.Fatal(err)
	}
	if got, err := version("@zone=z1,@controlplane"); err != nil || strings.Join(got, ",") != "also-self,self" {
		t.Fatalf("after the reload: %v, %v", got, err)
	}

	// /nodes lists the inventory's nodes with their role and labels.
	code, body := tg.get("/nodes?format=json")
	var page nodesPage
	if code != 200 || json.Unmarshal([]byte(body), &page) != nil {
		t.Fatalf("/nodes: %d %s", code, body)
	}
	var listed []string
	for _, n := range page.Nodes {
		if inv := n.Inventory; inv != nil {
			listed = append(listed, fmt.Sprintf("%s %s %s %s %v", n.Node, inv.Role, inv.Address, n.Connection, inv.Labels))
		}
	}
	if want := "also-self worker node-1 local map[zone:z1]|self controlplane 127.0.0.1 local map[]"; strings.Join(listed, "|") != want {
		t.Errorf("/nodes inventory:\n got %s\nwant %s", strings.Join(listed, "|"), want)
	}

	// A reload whose inventory does not validate changes nothing.
	bad := next
	bad.Inventory.Nodes = []inventory.Node{{Name: "@oops"}}
	if err := tg.gw.Reload(bad); err == nil || !strings.Contains(err.Error(), "cannot start with @") {
		t.Fatalf("bad inventory reload: %v", err)
	}
	if got, err := version("@all"); err != nil || strings.Join(got, ",") != "also-self,self" {
		t.Fatalf("after the refused reload: %v, %v", got, err)
	}
}

// TestNodePageIsBounded: /nodes comes in pages whatever the inventory's
// size, and names callers make up do not mint rows.
func TestNodePageIsBounded(t *testing.T) {
	const size = 1200
	tg := startGateway(t, func(c *Config) {
		for i := range size {
			c.Inventory.Nodes = append(c.Inventory.Nodes, inventory.Node{Name: fmt.Sprintf("n-%04d", i), Address: fmt.Sprintf("127.1.%d.%d", i/250, 1+i%250)})
		}
	})
	mc := machine.NewMachineServiceClient(tg.client("admin", certs.RoleAdmin))
	var made []string
	for i := range 50 {
		made = append(made, fmt.Sprintf("made-up-%d", i))
	}
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "nodes", strings.Join(made, ",")), 10*time.Second)
	defer cancel()
	if resp, err := mc.Version(ctx, &emptypb.Empty{}); err != nil || len(resp.GetMessages()) != 50 {
		t.Fatalf("made-up names: %v, %v", resp, err)
	}

	seen := map[string]bool{}
	pages := 0
	for after := ""; ; pages++ {
		code, body := tg.get("/nodes?format=json&limit=500&after=" + url.QueryEscape(after))
		if code != http.StatusOK {
			t.Fatalf("/nodes: %d %s", code, body)
		}
		var page nodesPage
		if err := json.Unmarshal([]byte(body), &page); err != nil {
			t.Fatal(err)
		}
		if len(page.Nodes) > 500 {
			t.Fatalf("a page of %d nodes", len(page.Nodes))
		}
		for _, n := range page.Nodes {
			if seen[n.Node] {
				t.Fatalf("%s on two pages", n.Node)
			}
			seen[n.Node] = true
		}
		if page.Next == "" {
			break
		}
		after = page.Next
	}
	if pages != 2 || !seen["n-0000"] || !seen["n-1199"] || !seen[director.UnknownNodeKey] || seen["made-up-7"] {
		t.Errorf("%d pages after the first, %d nodes; want all %d inventory nodes and one row for the made-up names", pages, len(seen), size)
	}
	if code, _ := tg.get("/nodes?limit=100000"); code != http.StatusBadRequest {
		t.Errorf("a page over the bound: %d", code)
	}
}

// TestClusterInventorySource: with inventory.cluster the gateway learns the
// nodes from the members its local node knows (the agent's real resource
// API, over its socket): the first member at once, one that joins and one
// that leaves as the watch reports them, each with its role and address,
// and the source's labels.
func TestClusterInventorySource(t *testing.T) {
	tg := startGateway(t, func(c *Config) {
		c.Inventory.Cluster = &inventory.ClusterSource{Labels: map[string]string{"from": "cluster"}}
	})
	nodes := func() string {
		var out []string
		for _, n := range tg.gw.inv.Set().Nodes() {
			out = append(out, fmt.Sprintf("%s=%s/%s/%s", n.Name, n.Address, n.Role, n.Labels["from"]))
		}
		return strings.Join(out, ",")
	}
	want := "node-1=127.0.0.1/controlplane/cluster"
	if !testkit.Eventually(10*time.Second, func() bool { return nodes() == want }) {
		t.Fatalf("inventory %q, want %q", nodes(), want)
	}
	if err := tg.agentSrv.SetMembers([]testbackend.Member{
		{Hostname: "node-1", Addresses: []string{"127.0.0.1"}, ControlPlane: true},
		{Hostname: "node-7", Addresses: []string{"127.0.0.7"}},
	}); err != nil {
		t.Fatal(err)
	}
	want = "node-1=127.0.0.1/controlplane/cluster,node-7=127.0.0.7/worker/cluster"
	if !testkit.Eventually(10*time.Second, func() bool { return nodes() == want }) {
		t.Fatalf("after a join: %q, want %q", nodes(), want)
	}
	if err := tg.agentSrv.SetMembers([]testbackend.Member{{Hostname: "node-7", Addresses: []string{"127.0.0.7"}}}); err != nil {
		t.Fatal(err)
	}
	want = "node-7=127.0.0.7/worker/cluster"
	if !testkit.Eventually(10*time.Second, func() bool { return nodes() == want }) {
		t.Fatalf("after a leave: %q, want %q", nodes(), want)
	}
}

// TestClusterInventoryThroughANode: an apid that fronts a cluster it is not
// part of (inventory.cluster.through) learns the members from the node the
// config names, over that node's apid with the forwarding identity and the
// reader's role, and follows a join there.
func TestClusterInventoryThroughANode(t *testing.T) {
	member := startGateway(t, nil) // node-1 at 127.0.0.1, its agent knows the members
	_, port, err := net.SplitHostPort(member.addr)
	if err != nil {
		t.Fatal(err)
	}
	front := startGateway(t, func(c *Config) {
		// One cluster: the front apid's certificates from the member's CA.
		crt, key, err := member.ca.IssueNode("front", []string{"front", "node-1"}, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour, pki.KeyECDSA)
		if err != nil {
			t.Fatal(err)
		}
		fwdCrt, fwdKey, err := member.ca.IssueForwarding("front", time.Hour, pki.KeyECDSA)
		if err != nil {
			t.Fatal(err)
		}
		c.TLS.CA, c.TLS.Cert, c.TLS.Key = member.write("ca.crt", member.ca.CertPEM), member.write("front.crt", crt), member.write("front.key", key)
		c.TLS.ClientCert, c.TLS.ClientKey = member.write("front-client.crt", fwdCrt), member.write("front-client.key", fwdKey)
		c.Nodes.Port, _ = strconv.Atoi(port)
		c.Inventory.Cluster = &inventory.ClusterSource{Through: "127.0.0.1"}
	})
	// The front gateway's own agent never learns node-7: only the member's does.
	if err := member.agentSrv.SetMembers([]testbackend.Member{
		{Hostname: "node-1", Addresses: []string{"127.0.0.1"}, ControlPlane: true},
		{Hostname: "node-7", Addresses: []string{"127.0.0.7"}},
	}); err != nil {
		t.Fatal(err)
	}
	nodes := func() string {
		var out []string
		for _, n := range front.gw.inv.Set().Nodes() {
			out = append(out, n.Name+"="+n.Address+"/"+n.Role)
		}
		return strings.Join(out, ",")
	}
	want := "node-1=127.0.0.1/controlplane,node-7=127.0.0.7/worker"
	if !testkit.Eventually(10*time.Second, func() bool { return nodes() == want }) {
		t.Fatalf("inventory through 127.0.0.1: %q, want %q\n%s", nodes(), want, front.logs.String())
	}
}

// TestClusterSourceThroughIsChecked: a port or a URL where a node is wanted
// is refused at load, naming the key.
func TestClusterSourceThroughIsChecked(t *testing.T) {
	for _, bad := range []string{"10.0.0.2:50000", "https://node-2", "node 2"} {
		err := inventory.Config{Cluster: &inventory.ClusterSource{Through: bad}}.Validate()
		if err == nil || !strings.Contains(err.Error(), "inventory.cluster.through") {
			t.Errorf("through %q: %v", bad, err)
		}
	}
	if err := (inventory.Config{Cluster: &inventory.ClusterSource{Through: "cp-1.example.org"}}).Validate(); err != nil {
		t.Errorf("a DNS name: %v", err)
	}
}
