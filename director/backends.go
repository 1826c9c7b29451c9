package director

import (
	"context"
	"fmt"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"

	"github.com/apid/apid/proxy"
)

// The proxy finds Keyed and Reporter by type assertion: a signature that
// drifted would silently turn statistics and ejection off, so the compiler
// holds them here.
var (
	_ proxy.Backend  = (*Local)(nil)
	_ proxy.Keyed    = (*Local)(nil)
	_ proxy.Backend  = (*Remote)(nil)
	_ proxy.Keyed    = (*Remote)(nil)
	_ proxy.Reporter = (*Remote)(nil)
	_ proxy.Director = (*Router)(nil)
)

// share is a caller's share of one node's connection, admitted by the
// limits when the backend connects.
type share struct {
	admit  Admission // nil: unbounded
	caller string
	stream bool
}

func (s share) acquire(node string) (release func(), err error) {
	if s.admit == nil {
		return func() {}, nil
	}
	return s.admit.AdmitNode(s.caller, node, s.stream)
}

// Local is the local node agent as one destination of one call: a call
// naming no node, a forwarded one, or one naming this node itself.
type Local struct {
	name string // what replies are stamped with; empty when no node was named
	node string // the node's inventory key, for statistics; empty when none was named
	md   metadata.MD
	conn grpc.ClientConnInterface
	share
}

func (r *Router) local(name string, d Dest, md metadata.MD) *Local {
	return &Local{name: name, node: d.Node, md: md, conn: r.d.Local}
}

// Name implements proxy.Backend.
func (b *Local) Name() string { return b.name }

// Key implements proxy.Keyed: a named node by its inventory key; the
// unnamed local agent by nothing.
func (b *Local) Key() string {
	if b.node != "" {
		return b.node
	}
	return canonical(b.name)
}

// Connect implements proxy.Backend.
func (b *Local) Connect(ctx context.Context, _ string) (context.Context, grpc.ClientConnInterface, func(), error) {
	node := b.Key()
	if node == "" {
		node = "(local)"
	}
	release, err := b.acquire(node)
	if err != nil {
		return nil, nil, nil, err
	}
	return metadata.NewOutgoingContext(ctx, b.md), b.conn, release, nil
}

// Remote is another node's apid as one destination of one call, reached
// through the node connections.
type Remote struct {
	name  string // what replies are stamped with
	md    metadata.MD
	nodes Nodes
	dest  Dest     // where the node is reached
	fail  error    // why it cannot be (a name nobody knows)
	ej    *ejector // the record of failing nodes, keyed by dest.Node
	share

	mayRefuse bool // an ejected node is refused at once
	refused   bool // it was, or the pool refused: the outcome says nothing about the node
	// ownDeadline: the deadline this node's part runs under is apid's own
	// nodeTimeout, so missing it says the node did not answer in time. A
	// deadline the caller chose (its own, or a shortened node timeout)
	// says nothing about the node.
	ownDeadline bool
}

// Name implements proxy.Backend.
func (b *Remote) Name() string { return b.name }

// UnknownNodeKey is the one key under which statistics count calls to
// names nobody knows: names a caller makes up must not mint rows on the
// node page or series in the metrics.
const UnknownNodeKey = "(unknown)"

// Key implements proxy.Keyed: statistics know a node by where it is
// reached (its inventory name), whatever the caller called it.
func (b *Remote) Key() string {
	if b.fail != nil {
		return UnknownNodeKey
	}
	if b.dest.Node != "" {
		return b.dest.Node
	}
	return canonical(b.name)
}

// Connect implements proxy.Backend. A pooled connection, and the caller's
// share of the node, stay counted in use until the proxy releases them.
func (b *Remote) Connect(ctx context.Context, _ string) (context.Context, grpc.ClientConnInterface, func(), error) {
	if b.fail != nil {
		b.refused = true
		return nil, nil, nil, b.fail
	}
	if b.mayRefuse {
		if e, ok := b.ej.ejected(b.dest); ok {
			b.refused = true
			return nil, nil, nil, refusal(e, b.ej.now())
		}
	}
	shared, err := b.acquire(b.Key())
	if err != nil {
		b.refused = true // the caller's bound, not the node's doing
		return nil, nil, nil, err
	}
	cc, release, err := b.nodes.ConnTo(b.dest)
	if err != nil {
		shared()
		b.refused = true // the pool's own refusal (full, a bad name)
		return nil, nil, nil, err
	}
	return metadata.NewOutgoingContext(ctx, b.md), cc, func() { release(); shared() }, nil
}

// Report implements proxy.Reporter: remote nodes' outcomes feed ejection.
func (b *Remote) Report(code codes.Code, message string) {
	if b.ej == nil || b.refused {
		return
	}
	if code == codes.DeadlineExceeded && !b.ownDeadline {
		// A deadline of the caller's says nothing of the node, unless the
		// node has not completed a connection for longer than an attempt
		// may take: then it is failing, whatever deadlines callers pick.
		if d, stuck := b.unestablished(); stuck {
			code, message = codes.Unavailable, fmt.Sprintf("no connection established for %s: %s", d.Round(time.Second), message)
		} else {
			code = codes.Canceled
		}
	}
	b.ej.report(b.dest, code, message)
}

// unestablished says how long the node has gone without a connection, when
// longer than an attempt may take.
func (b *Remote) unestablished() (time.Duration, bool) {
	if b.nodes == nil {
		return 0, false
	}
	return b.nodes.Unestablished(b.dest.Node)
}

// The proxy finds Gated by type assertion too.
var (
	_ proxy.Gated    = heldLocal{}
	_ proxy.Gated    = heldRemote{}
	_ proxy.Keyed    = heldRemote{}
	_ proxy.Reporter = heldRemote{}
)

// gate is a call's turn at the disruption budget for one node.
type gate struct {
	budget Budget
	method string
	target string // the node's inventory key (or address): what the budget counts
	self   bool
}

// held wraps b so that its part of a disruptive call waits for the
// budget; any other call's backend is returned as it is. The budget counts
// the call against b's node: this gateway's own by its inventory name
// (whatever name the caller used), another by its key.
func (r *Router) held(rs *rules, fullMethod string, b proxy.Backend, self bool) proxy.Backend {
	if !r.holds(fullMethod) {
		return b
	}
	node := proxy.KeyOf(b)
	if self {
		node = rs.selfNode(r.d.Inventory)
	}
	g := gate{budget: r.d.Budget, method: fullMethod, target: node, self: self}
	switch b := b.(type) {
	case *Local:
		return heldLocal{Local: b, gate: g}
	case *Remote:
		if b.fail != nil {
			return b // nobody knows the name: refused when connected, never held
		}
		return heldRemote{Remote: b, gate: g}
	}
	return b
}

// holds reports whether calls of fullMethod are held for the budget.
func (r *Router) holds(fullMethod string) bool {
	return r.d.Budget != nil && r.d.Budget.Disruptive(fullMethod)
}

// heldLocal is the local node as the destination of a disruptive call.
type heldLocal struct {
	*Local
	gate
}

// Await implements proxy.Gated.
func (h heldLocal) Await(ctx context.Context, request []byte) (func(proxy.Outcome), error) {
	return h.budget.Hold(ctx, h.method, h.target, h.self, request)
}

// heldRemote is another node as the destination of a disruptive call.
type heldRemote struct {
	*Remote
	gate
}

// Await implements proxy.Gated. A call the budget refused says nothing of
// the node.
func (h heldRemote) Await(ctx context.Context, request []byte) (func(proxy.Outcome), error) {
	end, err := h.budget.Hold(ctx, h.method, h.target, h.self, request)
	if err != nil {
		h.refused = true
	}
	return end, err
}

// LocalAgent reports whether b is the local agent reached with no node
// named (held for the disruption budget or not).
func LocalAgent(b proxy.Backend) bool {
	switch l := b.(type) {
	case *Local:
		return l.name == ""
	case heldLocal:
		return l.name == ""
	}
	return false
}
