package disruption

import "time"

// View is what the budget knows of one node, for the node page.
type View struct {
	// Active are the disruptions admitted whose node is not back yet,
	// this gateway's and (shared budget) the others'.
	Active []Disruption `json:"active,omitempty"`
	// Held are the calls waiting for this node's turn, in arrival order.
	Held []Disruption `json:"held,omitempty"`
	// Unavailable says why the node counts as down when it was seen so.
	Unavailable string `json:"unavailable,omitempty"`
}

// Disruption is one admitted or held disruptive call.
type Disruption struct {
	Method  string    `json:"method"`
	Caller  string    `json:"caller"`
	Since   time.Time `json:"since"`
	Gateway string    `json:"gateway,omitempty"` // another gateway's
	Forced  bool      `json:"forced,omitempty"`
	HeldBy  string    `json:"heldBy,omitempty"`
}

// Snapshot describes every node the budget has something to say of.
func (b *Budget) Snapshot() map[string]View {
	b.mu.Lock()
	defer b.mu.Unlock()
	out := map[string]View{}
	for name, n := range b.nodes {
		v := out[name]
		for _, s := range n.slots {
			v.Active = append(v.Active, Disruption{Method: s.method, Caller: s.caller, Since: s.since, Forced: s.forced})
		}
		if !n.seen.at.IsZero() && !n.seen.ready {
			v.Unavailable = n.seen.why
		}
		if len(v.Active) > 0 || v.Unavailable != "" {
			out[name] = v
		}
	}
	for name, rs := range b.remote {
		v := out[name]
		for _, r := range rs {
			v.Active = append(v.Active, Disruption{Method: r.Method, Caller: r.Caller, Since: r.Since, Gateway: r.Gateway, Forced: r.Forced})
		}
		out[name] = v
	}
	for _, w := range b.queue {
		v := out[w.node]
		v.Held = append(v.Held, Disruption{Method: w.method, Caller: w.caller, Since: w.since, HeldBy: w.why})
		out[w.node] = v
	}
	return out
}
