package director

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/limits"
	"github.com/apid/apid/proxy"
)

// heldAt records the node the budget is asked about.
type heldAt struct{ node []string }

func (h *heldAt) Disruptive(m string) bool { return m == mReboot }
func (h *heldAt) Hold(_ context.Context, _ string, node string, _ bool, _ []byte) (func(proxy.Outcome), error) {
	h.node = append(h.node, node)
	return nil, nil
}
func (h *heldAt) Forwarded(context.Context) error { return nil }

// TestHeldCountsTheNodeNotTheName: a disruptive call is counted against
// the node it reaches, whatever the caller called it: this gateway's own
// node by its inventory name (a self name the inventory does not list
// must not slip past the control plane's budget), another by its
// inventory name; other calls are not held at all.
func TestHeldCountsTheNodeNotTheName(t *testing.T) {
	inv, err := inventory.New(inventory.Config{Nodes: []inventory.Node{
		{Name: "cp-1", Address: "127.0.0.1", Role: inventory.RoleControlPlane},
		{Name: "cp-2", Address: "127.0.0.2", Role: inventory.RoleControlPlane},
	}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer inv.Close()
	pool := NewPool(PoolConfig{Port: 50000})
	defer pool.Close()
	policy, err := auth.NewPolicy(nil, false)
	if err != nil {
		t.Fatal(err)
	}
	budget := &heldAt{}
	r := testRouter{Router: NewRouter(Config{SelfNames: []string{"cp-1.example.internal", "127.0.0.1"}},
		Deps{Local: unusedConn{t}, Nodes: pool, Inventory: inv, Budget: budget, Admission: limits.New(limits.DefaultConfig(), time.Second, nil)}),
		authz: auth.NewAuthorizer(policy, nil)}
	for _, c := range []struct {
		md   metadata.MD
		want []string
	}{
		{nil, []string{"cp-1"}},
		{metadata.MD{KeyNode: {"cp-1.example.internal"}}, []string{"cp-1"}},
		{metadata.MD{KeyNode: {"127.0.0.2"}}, []string{"cp-2"}},
		{metadata.MD{KeyNodes: {"@controlplane"}}, []string{"cp-1", "cp-2"}},
	} {
		budget.node = nil
		route, err := r.Route(callerContext([]string{certs.RoleAdmin}, c.md), mReboot)
		if err != nil {
			t.Fatal(err)
		}
		for _, b := range route.Backends {
			g, ok := b.(proxy.Gated)
			if !ok {
				t.Fatalf("%v: backend %s not held", c.md, b.Name())
			}
			if _, err := g.Await(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
		}
		if len(budget.node) != len(c.want) {
			t.Fatalf("%v: held %v, want %v", c.md, budget.node, c.want)
		}
		for i := range c.want {
			if budget.node[i] != c.want[i] {
				t.Errorf("%v: held %v, want %v", c.md, budget.node, c.want)
			}
		}
	}
	route, err := r.Route(callerContext([]string{certs.RoleAdmin}, nil), mVersion)
	if err != nil {
		t.Fatal(err)
	}
	if _, ok := route.Backends[0].(proxy.Gated); ok {
		t.Error("Version held")
	}
}
