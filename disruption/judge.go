package disruption

import (
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/apid/apid/inventory"
)

// view is the inventory as one dispatch judges it: each budget's members.
type view struct {
	inv     *inventory.Set
	groups  []group
	members [][]string // per group, sorted
	cp      []string   // the control plane: etcd's voting members
}

func (b *Budget) view(cfg Config) view {
	v := view{inv: b.o.Inventory(), groups: cfg.groups()}
	v.members = make([][]string, len(v.groups))
	for i, g := range v.groups {
		nodes, err := v.inv.Expand(g.name)
		if err != nil {
			continue // a label nobody carries (yet): an empty group
		}
		for _, n := range nodes {
			v.members[i] = append(v.members[i], n.Name)
		}
	}
	if nodes, err := v.inv.Expand(inventory.GroupControlPlane); err == nil {
		for _, n := range nodes {
			v.cp = append(v.cp, n.Name)
		}
	}
	return v
}

// share reports whether nodes a and b are in one budget.
func (v view) share(a, b string) bool {
	for _, m := range v.members {
		if slices.Contains(m, a) && slices.Contains(m, b) {
			return true
		}
	}
	return false
}

// unavailable reports whether node is down for the budget: a disruption of
// it not over, or seen down or not ready (b.mu held).
func (b *Budget) unavailable(node string) bool {
	if len(b.remote[node]) > 0 {
		return true // another gateway took it down
	}
	n := b.nodes[node]
	return n != nil && (len(n.slots) > 0 || (!n.seen.at.IsZero() && !n.seen.ready))
}

// downAlready reports whether node is down for certain enough to be
// disrupted again whatever the budget (b.mu held): a disruption of it not
// over, or two probes in a row that found it down or not ready. One
// failed probe is enough to count it as down for the others (the safe
// side) but not to let a second disruption through (a blip on a healthy
// control-plane node must not cost etcd its quorum).
func (b *Budget) downAlready(node string) bool {
	if len(b.remote[node]) > 0 {
		return true
	}
	n := b.nodes[node]
	return n != nil && (len(n.slots) > 0 || n.seen.streak >= 2)
}

// state says why node is unavailable, for a person (b.mu held).
func (b *Budget) state(node string) string {
	n := b.nodes[node]
	if n != nil && len(n.slots) > 0 {
		return node + " is " + n.slots[0].what()
	}
	if r := b.remote[node]; len(r) > 0 {
		return node + " is " + r[0].what()
	}
	if n == nil {
		return node + " is available"
	}
	return node + " is " + n.seen.why
}

// dispatch admits the held calls that fit now, in arrival order per budget
// (b.mu held).
func (b *Budget) dispatch() {
	if len(b.queue) == 0 {
		return
	}
	cfg := b.Applied()
	v := b.view(cfg)
	pending := b.queue
	var blocked []*waiter
	kept := make([]*waiter, 0, len(pending))
	for _, w := range pending {
		if w.slot != nil || w.err != nil {
			continue
		}
		if !cfg.Enabled {
			b.admit(w)
			continue
		}
		if w.why = b.judge(v, w, blocked, pending); w.why == "" {
			if b.shared == nil {
				b.admit(w)
				continue
			}
			// The other gateways have their say: the call's goroutine
			// asks etcd; those behind it in its groups wait for that.
			w.candidate, w.why = true, "held: being admitted through the budget shared in etcd"
			select {
			case w.maybe <- struct{}{}:
			default:
			}
		}
		blocked = append(blocked, w)
		kept = append(kept, w)
	}
	b.queue = kept
}

// judge says what holds w, or "" when it may go (b.mu held). blocked are
// the calls ahead of it that wait; pending every call held before this
// dispatch.
func (b *Budget) judge(v view, w *waiter, blocked, pending []*waiter) string {
	if b.downAlready(w.node) {
		return "" // down already: counted once, and fixing it is the point
	}
	for _, o := range blocked {
		// The gateway's own node yields to the calls behind it.
		if !o.self && o.node != w.node && v.share(o.node, w.node) {
			return fmt.Sprintf("held: waiting for its turn behind %s (held since %s); %s", o.node,
				o.since.UTC().Format("15:04:05"), strings.TrimPrefix(o.why, "held: "))
		}
	}
	for i, g := range v.groups {
		if !slices.Contains(v.members[i], w.node) {
			continue
		}
		var down []string
		for _, m := range v.members[i] {
			if m != w.node && b.unavailable(m) {
				down = append(down, m)
			}
		}
		if limit := g.max.Of(len(v.members[i])); len(down)+1 > limit {
			return fmt.Sprintf("held: %s; %s would be %s down (maxUnavailable %s: %s)",
				b.states(down), w.node, ordinal(len(down)+1, g.name), g.name, g.max)
		}
	}
	if slices.Contains(v.cp, w.node) {
		var down []string
		for _, m := range v.cp {
			if m != w.node && b.unavailable(m) {
				down = append(down, m)
			}
		}
		healthy, quorum := len(v.cp)-len(down), len(v.cp)/2+1
		if healthy-1 < quorum {
			return fmt.Sprintf("held: %s; taking %s down would leave etcd %d of %d members, below its quorum of %d",
				b.states(down), w.node, healthy-1, len(v.cp), quorum)
		}
	}
	if w.self {
		if wait := selfGrace - b.o.Now().Sub(w.since); wait > 0 {
			// talosctl sends each node's call on a goroutine of its own:
			// the others of one command arrive within moments.
			return fmt.Sprintf("held: %s is the node this gateway runs on, which goes last in its group: waiting %s for calls sent with this one",
				w.node, selfGrace)
		}
		for _, o := range pending {
			if o != w && !o.self && o.slot == nil && o.err == nil && v.share(o.node, w.node) {
				return fmt.Sprintf("held: %s is the node this gateway runs on, which goes last in its group: %s is waiting", w.node, o.node)
			}
		}
	}
	return ""
}

// selfGrace is how long a disruption of the gateway's own node waits for
// disruptions of other nodes sent with it, which go first.
const selfGrace = time.Second

// states describes the unavailable nodes (b.mu held).
func (b *Budget) states(nodes []string) string {
	if len(nodes) == 0 {
		return "no node is down"
	}
	out := make([]string, 0, min(len(nodes), 5))
	for _, n := range nodes[:min(len(nodes), 5)] {
		out = append(out, b.state(n))
	}
	if len(nodes) > 5 {
		out = append(out, fmt.Sprintf("and %d more", len(nodes)-5))
	}
	return strings.Join(out, ", ")
}

// ordinal names the n-th node down of a group: "the second controlplane
// node".
func ordinal(n int, group string) string {
	words := []string{"", "the first", "the second", "the third", "the fourth", "the fifth"}
	w := fmt.Sprintf("number %d of", n)
	if n < len(words) {
		w = words[n]
	}
	return w + " " + group + " node"
}
