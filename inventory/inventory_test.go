package inventory

import (
	"errors"
	"fmt"
	"strings"
	"testing"
)

func names(nodes []Node) string {
	var s []string
	for _, n := range nodes {
		s = append(s, n.Name)
	}
	return strings.Join(s, ",")
}

func demoSet(t *testing.T) *Set {
	t.Helper()
	s, err := NewSet([]Node{
		{Name: "cp-1", Address: "127.0.0.11", Role: "controlplane", Labels: map[string]string{"zone": "eu-1"}},
		{Name: "cp-2", Address: "127.0.0.12", Role: "controlplane", Labels: map[string]string{"zone": "eu-2"}},
		{Name: "w-1", Address: "127.0.0.21", Labels: map[string]string{"zone": "eu-1"}},
		{Name: "w-2.example.org", Identity: "w2.certs.example.org"},
	})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestGroups(t *testing.T) {
	s := demoSet(t)
	for group, want := range map[string]string{
		"@all":          "cp-1,cp-2,w-1,w-2.example.org",
		"@controlplane": "cp-1,cp-2",
		"@workers":      "w-1,w-2.example.org",
		"@zone=eu-1":    "cp-1,w-1",
		"zone=eu-2":     "cp-2",
	} {
		got, err := s.Expand(group)
		if err != nil || names(got) != want {
			t.Errorf("Expand(%q) = %q, %v; want %q", group, names(got), err, want)
		}
	}
	for _, bad := range []string{"@controlplanes", "@zone=eu-9", "@zone", "@"} {
		_, err := s.Expand(bad)
		if !errors.Is(err, ErrUnknownGroup) {
			t.Errorf("Expand(%q): %v, want ErrUnknownGroup", bad, err)
			continue
		}
		if !strings.Contains(err.Error(), "@all, @controlplane, @workers, @zone=eu-1, @zone=eu-2") {
			t.Errorf("Expand(%q): %v does not list the known groups", bad, err)
		}
	}
}

func TestLookupByNameAndAddress(t *testing.T) {
	s := demoSet(t)
	for target, want := range map[string]string{
		"cp-1": "cp-1", "CP-1": "cp-1", "127.0.0.11": "cp-1", "::ffff:127.0.0.12": "cp-2",
		"w-2.example.org": "w-2.example.org",
	} {
		n, ok := s.Lookup(target)
		if !ok || n.Name != want {
			t.Errorf("Lookup(%q) = %q, %v; want %q", target, n.Name, ok, want)
		}
	}
	if n, ok := s.Lookup("w-2.example.org"); !ok || n.Address != "w-2.example.org" || n.Identity != "w2.certs.example.org" || n.Role != "worker" {
		t.Errorf("defaults: %+v", n)
	}
	if _, ok := s.Lookup("cp-3"); ok {
		t.Error("cp-3 found")
	}
	var empty *Set
	if _, ok := empty.Lookup("cp-1"); ok || empty.Len() != 0 {
		t.Error("nil set finds nodes")
	}
}

func TestInvalidNodes(t *testing.T) {
	for _, tc := range []struct {
		node Node
		want string
	}{
		{Node{}, "needs a name"},
		{Node{Name: "@cp"}, "cannot start with @"},
		{Node{Name: "a b"}, "DNS name or an IP"},
		{Node{Name: "n", Address: "10.0.0.1:50000"}, "no port"},
		{Node{Name: "n", Role: "master"}, `role "master"`},
		{Node{Name: "n", Port: 70000}, "port 70000"},
		{Node{Name: "n", Labels: map[string]string{"zone": "eu 1"}}, "label"},
		{Node{Name: "n", Identity: "*.example.org"}, "identity"},
	} {
		err := tc.node.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.node, err, tc.want)
		}
	}
	s, err := NewSet([]Node{{Name: "a"}, {Name: "A"}, {Name: "b", Role: "boss"}, {Name: "c"}})
	if err == nil || !strings.Contains(err.Error(), "listed twice") || !strings.Contains(err.Error(), "boss") {
		t.Errorf("err = %v", err)
	}
	if names(s.Nodes()) != "a,c" {
		t.Errorf("kept %q, want a,c", names(s.Nodes()))
	}

	// A node named by an address (a DNS A record) that an earlier node is
	// reached at stays that earlier node.
	s, err = NewSet([]Node{{Name: "cp-1", Address: "10.0.0.2"}, {Name: "10.0.0.2", Identity: "other"}, {Name: "10.0.0.3"}})
	if err == nil || !strings.Contains(err.Error(), `node "10.0.0.2" is the address of node "cp-1"`) {
		t.Errorf("err = %v", err)
	}
	if n, _ := s.Lookup("10.0.0.2"); n.Name != "cp-1" || names(s.Nodes()) != "10.0.0.3,cp-1" {
		t.Errorf("10.0.0.2 is %q; nodes %s", n.Name, names(s.Nodes()))
	}
}

// manyLabels is an inventory of n nodes with two labels each.
func manyLabels(tb testing.TB, n int) *Set {
	tb.Helper()
	nodes := make([]Node, n)
	for i := range nodes {
		nodes[i] = Node{Name: fmt.Sprintf("n-%d", i), Address: fmt.Sprintf("10.%d.%d.%d", i>>16&255, i>>8&255, i&255),
			Labels: map[string]string{"rack": fmt.Sprintf("r-%d", i), "slot": fmt.Sprintf("s-%d", i)}}
	}
	s, err := NewSet(nodes)
	if err != nil {
		tb.Fatal(err)
	}
	return s
}

// TestUnknownGroupCostsLittle: the groups an unknown group's refusal lists
// are built once per inventory, so a caller naming made-up groups costs
// the same few allocations whatever the inventory's size.
func TestUnknownGroupCostsLittle(t *testing.T) {
	s := manyLabels(t, 10000)
	_, err := s.Expand("@nope")
	if !errors.Is(err, ErrUnknownGroup) || !strings.Contains(err.Error(), "@all, @controlplane, @workers, @rack=r-0") || !strings.Contains(err.Error(), "and 19980 more label selectors") {
		t.Fatalf("unknown group: %v", err)
	}
	if allocs := testing.AllocsPerRun(20, func() { _, _ = s.Expand("@nope") }); allocs > 8 {
		t.Errorf("an unknown group costs %.0f allocations with 20,000 label selectors, want a few", allocs)
	}
}

// BenchmarkUnknownGroup: the refusal of an unknown group, against an
// inventory of 10,000 nodes with two labels each.
func BenchmarkUnknownGroup(b *testing.B) {
	s := manyLabels(b, 10000)
	b.ReportAllocs()
	for b.Loop() {
		_, _ = s.Expand("@nope")
	}
}
