package inventory

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
)

// members is a cluster source driven by the test: each call of report
// hands the source a full list of members, as a watch does.
type members struct {
	report chan []Node
}

func (m *members) watch(ctx context.Context, _ ClusterSource, set func([]Node)) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case nodes := <-m.report:
			set(nodes)
		}
	}
}

func startCluster(t *testing.T) (*Inventory, *members, *eventLog) {
	t.Helper()
	m := &members{report: make(chan []Node)}
	log := &eventLog{}
	inv, err := New(Config{Cluster: &ClusterSource{}}, nil, log.add, WithMembers(m.watch))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(inv.Close)
	return inv, m, log
}

type eventLog struct {
	mu     sync.Mutex
	events []Event
	n      atomic.Int64
}

func (l *eventLog) add(e Event) {
	l.mu.Lock()
	l.events = append(l.events, e)
	l.mu.Unlock()
	l.n.Add(1)
}

func (l *eventLog) last() Event {
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.events) == 0 {
		return Event{}
	}
	return l.events[len(l.events)-1]
}

func nodesOf(n int, prefix string) []Node {
	out := make([]Node, n)
	for i := range out {
		out[i] = Node{Name: fmt.Sprintf("%s-%d", prefix, i), Address: fmt.Sprintf("10.1.%d.%d", i>>8&255, i&255)}
	}
	return out
}

// TestClusterSourceCoalescesBursts: a node republishing its members 600
// times in a burst makes a handful of inventories, not 600, and the last
// one is what stays.
func TestClusterSourceCoalescesBursts(t *testing.T) {
	inv, m, log := startCluster(t)
	for i := 1; i <= 600; i++ {
		m.report <- nodesOf(i, "m")
	}
	requireEventually(t, "the last list", func() bool { return inv.Set().Len() == 600 })
	if n := log.n.Load(); n > 20 {
		t.Errorf("600 reports published %d inventories", n)
	}
}

// TestClusterSourceBounds: two members claiming one name resolve to the
// same one whatever order they come in; a member named as one address and
// reached at another is left out; more than MaxMembers fail the source,
// which keeps its last members.
func TestClusterSourceBounds(t *testing.T) {
	inv, m, log := startCluster(t)
	a, b := Node{Name: "node-2", Address: "127.0.70.5"}, Node{Name: "node-2", Address: "127.0.70.3"}
	for _, list := range [][]Node{{a, b}, {b, a}, {a, b}} {
		m.report <- list
		requireEventually(t, "node-2", func() bool { n, ok := inv.Set().Lookup("node-2"); return ok && n.Address == "127.0.70.3" })
	}
	m.report <- []Node{{Name: "127.0.70.12", Address: "127.0.70.66"}, {Name: "node-3", Address: "127.0.70.13"}}
	requireEventually(t, "node-3", func() bool { _, ok := inv.Set().Lookup("node-3"); return ok })
	if n, ok := inv.Set().Lookup("127.0.70.12"); ok {
		t.Errorf("a member named 127.0.70.12 and reached at %s is in the inventory", n.Address)
	}
	m.report <- nodesOf(MaxMembers+1, "flood")
	requireEventually(t, "the refusal of a flood", func() bool {
		e := log.last()
		return e.Err != nil && strings.Contains(e.Err.Error(), "more than the 10000 it holds")
	})
	if _, ok := inv.Set().Lookup("node-3"); !ok || inv.Set().Len() != 1 {
		t.Errorf("after a flood: %d nodes", inv.Set().Len())
	}
}
