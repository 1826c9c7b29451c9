package director

import (
	"fmt"
	"strconv"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/proxy"
)

func inventoryRouter(t *testing.T, cfg Config, inv inventory.Config) testRouter {
	t.Helper()
	i, err := inventory.New(inv, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(i.Close)
	return newInventoryRouter(t, cfg, i)
}

var testInventory = inventory.Config{Nodes: []inventory.Node{
	{Name: "cp-1", Address: "127.0.0.11", Role: "controlplane", Labels: map[string]string{"zone": "eu-1"}},
	{Name: "cp-2", Address: "127.0.0.12", Role: "controlplane", Labels: map[string]string{"zone": "eu-2"}},
	{Name: "cp-3", Address: "127.0.0.13", Role: "controlplane", Labels: map[string]string{"zone": "eu-1"}},
	{Name: "w-1", Address: "127.0.0.21", Port: 50123, Identity: "worker-1.certs.test"},
}}

// dests lists, per backend, its stamp and where it goes ("local" or
// host:port as identity).
func dests(t *testing.T, r testRouter, md metadata.MD) []string {
	t.Helper()
	rt, err := r.Route(callerContext([]string{certs.RoleAdmin}, md), mVersion)
	if err != nil {
		t.Fatalf("Route(%v): %v", md, err)
	}
	var out []string
	for _, b := range rt.Backends {
		if l, ok := b.(*Local); ok {
			out = append(out, l.name+"=local")
			continue
		}
		bb := b.(*Remote)
		switch {
		case bb.fail != nil:
			out = append(out, bb.name+"="+status.Code(bb.fail).String())
		default:
			out = append(out, bb.name+"="+bb.dest.Host+":"+itoa(bb.dest.Port)+" as "+bb.dest.ServerName)
		}
	}
	return out
}

func itoa(p int) string {
	if p == 0 {
		return "default"
	}
	return strconv.Itoa(p)
}

func TestGroupsExpandToInventoryNodes(t *testing.T) {
	r := inventoryRouter(t, Config{SelfNames: []string{"127.0.0.11"}}, testInventory)
	for _, tc := range []struct {
		nodes string
		want  string
	}{
		{"@controlplane", "cp-1=local|cp-2=127.0.0.12:default as cp-2|cp-3=127.0.0.13:default as cp-3"},
		{"@workers", "w-1=127.0.0.21:50123 as worker-1.certs.test"},
		{"@zone=eu-1", "cp-1=local|cp-3=127.0.0.13:default as cp-3"},
		// Mixed with names; duplicates collapse onto the first spelling.
		{"cp-2,@zone=eu-1,127.0.0.13,CP-1", "cp-2=127.0.0.12:default as cp-2|cp-1=local|cp-3=127.0.0.13:default as cp-3"},
		// An address the inventory knows is that node, verified as it.
		{"127.0.0.12", "127.0.0.12=127.0.0.12:default as cp-2"},
		// An address it does not know is dialled and verified as itself.
		{"127.0.0.99", "127.0.0.99=127.0.0.99:default as 127.0.0.99"},
		// A name it does not know is that node's NOT_FOUND, not a lookup.
		{"cp-9,@workers", "cp-9=NotFound|w-1=127.0.0.21:50123 as worker-1.certs.test"},
	} {
		got := strings.Join(dests(t, r, metadata.Pairs(KeyNodes, tc.nodes)), "|")
		if got != tc.want {
			t.Errorf("nodes %s:\n got %s\nwant %s", tc.nodes, got, tc.want)
		}
	}
}

func TestGroupErrors(t *testing.T) {
	r := inventoryRouter(t, Config{MaxNodes: 3}, testInventory)
	for _, tc := range []struct {
		md   metadata.MD
		want string
	}{
		{metadata.Pairs(KeyNodes, "@controlplanes"), "unknown group @controlplanes: known groups are @all, @controlplane, @workers, @zone=eu-1, @zone=eu-2"},
		{metadata.Pairs(KeyNodes, "@zone=eu-9"), "unknown group @zone=eu-9"},
		// The expansion counts toward maxNodes (3 here).
		{metadata.Pairs(KeyNodes, "@all"), "more than 3 nodes in one request"},
		{metadata.Pairs(KeyNodes, "w-1,@controlplane"), "more than 3 nodes"},
		{metadata.Pairs(KeyNode, "@all"), "more than 3 nodes"},
		{metadata.Pairs(KeyNodes, "@ zone"), "want @ and a group name"},
	} {
		_, err := r.Route(callerContext([]string{certs.RoleAdmin}, tc.md), mVersion)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(status.Convert(err).Message(), tc.want) {
			t.Errorf("%v: %v, want InvalidArgument %q", tc.md, err, tc.want)
		}
	}
	// A group of one node may stand where one node is expected.
	if got := dests(t, r, metadata.Pairs(KeyNode, "@workers")); strings.Join(got, "") != "w-1=127.0.0.21:50123 as worker-1.certs.test" {
		t.Errorf("node @workers: %v", got)
	}
	// A multiplexing client sends each -n value as node: a group of
	// several is their fan-out, stamped with their names.
	rt, err := r.Route(callerContext([]string{certs.RoleAdmin}, metadata.Pairs(KeyNode, "@controlplane")), mVersion)
	if err != nil || rt.Mode != proxy.OneToMany || len(rt.Backends) != 3 || rt.Backends[0].Name() != "cp-1" {
		t.Errorf("node @controlplane: %+v, %v; want the fan-out to cp-1, cp-2, cp-3", rt, err)
	}
	// Three control-plane nodes fit maxNodes exactly.
	if got := dests(t, r, metadata.Pairs(KeyNodes, "@controlplane,cp-1")); len(got) != 3 {
		t.Errorf("@controlplane,cp-1: %v", got)
	}
}

func TestUnknownNamesWithoutAnInventory(t *testing.T) {
	// No inventory: names are dialled as written, as before.
	r := newTestRouter(t, Config{})
	if got := strings.Join(dests(t, r, metadata.Pairs(KeyNodes, "node-a.example.org")), ""); got != "node-a.example.org=node-a.example.org:default as node-a.example.org" {
		t.Errorf("without inventory: %s", got)
	}
	if _, err := r.Route(callerContext([]string{certs.RoleAdmin}, metadata.Pairs(KeyNodes, "@all")), mVersion); status.Code(err) != codes.InvalidArgument {
		t.Errorf("@all without inventory: %v", err)
	}
	// An inventory that allows resolving: unknown names are dialled too.
	cfg := testInventory
	cfg.ResolveUnknown = true
	r = inventoryRouter(t, Config{}, cfg)
	if got := strings.Join(dests(t, r, metadata.Pairs(KeyNodes, "other.example.org")), ""); got != "other.example.org=other.example.org:default as other.example.org" {
		t.Errorf("resolveUnknown: %s", got)
	}
}

func TestOneToOneUnknownNameIsNotFound(t *testing.T) {
	r := inventoryRouter(t, Config{}, testInventory)
	rt, err := r.Route(callerContext([]string{certs.RoleAdmin}, metadata.Pairs(KeyNode, "cp-9")), mVersion)
	if err != nil {
		t.Fatal(err)
	}
	_, _, _, err = rt.Backends[0].Connect(t.Context(), mVersion)
	if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), `node "cp-9" is not in the inventory`) {
		t.Fatalf("Connect: %v", err)
	}
}

// BenchmarkRouteNodes compares routing a fan-out to 100 nodes named by a
// group with naming them by address, and by inventory name: what the
// inventory adds to a call before any node is contacted.
func BenchmarkRouteNodes(b *testing.B) {
	t := &testing.T{}
	var nodes []inventory.Node
	var addrs, names []string
	for i := range 100 {
		n := inventory.Node{Name: fmt.Sprintf("n-%03d", i), Address: fmt.Sprintf("127.0.%d.%d", 1+i/200, 1+i%200), Role: "worker"}
		nodes = append(nodes, n)
		addrs = append(addrs, n.Address)
		names = append(names, n.Name)
	}
	pool := NewPool(PoolConfig{Port: 50000})
	defer pool.Close()
	policy, err := auth.NewPolicy(nil, false)
	if err != nil {
		b.Fatal(err)
	}
	inv, err := inventory.New(inventory.Config{Nodes: nodes}, nil, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer inv.Close()
	r := testRouter{Router: NewRouter(Config{}, Deps{Local: unusedConn{t}, Nodes: pool, Inventory: inv}), authz: auth.NewAuthorizer(policy, nil)}
	for _, tc := range []struct {
		name  string
		nodes []string
	}{{"addresses", addrs}, {"names", names}, {"group", []string{"@workers"}}} {
		b.Run(tc.name, func(b *testing.B) {
			ctx := callerContext([]string{certs.RoleAdmin}, metadata.MD{KeyNodes: tc.nodes})
			b.ReportAllocs()
			for b.Loop() {
				rt, err := r.Route(ctx, mVersion)
				if err != nil || len(rt.Backends) != 100 {
					b.Fatalf("%v, %d backends", err, len(rt.Backends))
				}
			}
		})
	}
}
