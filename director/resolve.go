package director

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/proxy"
)

// Inventory is what routing asks of the node inventory: the nodes now, and
// whether names outside it may be looked up in DNS.
type Inventory interface {
	Set() *inventory.Set
	ResolveUnknown() bool
}

func (r *Router) inventory() (*inventory.Set, bool) {
	if r.d.Inventory == nil {
		return nil, true
	}
	return r.d.Inventory.Set(), r.d.Inventory.ResolveUnknown()
}

// node is one destination of a call, resolved.
type node struct {
	stamp string // what its replies are stamped with: as the caller wrote it, or the inventory name for a group's member
	dest  Dest   // where it is reached; dest.Node also keys ejection
	self  bool   // served by the local agent
	err   error  // it cannot be reached at all (a name nobody knows)
}

// resolver turns the targets of one call into nodes.
type resolver struct {
	rs      *rules
	set     *inventory.Set
	resolve bool // names outside the inventory may be looked up
}

func (r *Router) resolver(rs *rules) resolver {
	set, resolve := r.inventory()
	return resolver{rs: rs, set: set, resolve: resolve}
}

// expand resolves targets (names, addresses and groups, parsed and
// de-duplicated as written) into at most max nodes, collapsing those that
// turn out to be the same node.
func (v resolver) expand(targets []string) ([]node, error) {
	out := make([]node, 0, len(targets))
	seen := make(map[string]bool, len(targets))
	add := func(n node) error {
		if seen[n.dest.Node] {
			return nil
		}
		if len(out) == v.rs.max {
			return fmt.Errorf("more than %d nodes in one request (groups count by their nodes)", v.rs.max)
		}
		seen[n.dest.Node] = true
		out = append(out, n)
		return nil
	}
	for _, t := range targets {
		if !inventory.IsGroup(t) {
			if err := add(v.target(t)); err != nil {
				return nil, err
			}
			continue
		}
		members, err := v.set.Expand(t)
		if err != nil {
			return nil, err
		}
		if len(members) == 0 {
			return nil, fmt.Errorf("group %s has no nodes now (the inventory lists %d; groups: %s)", t, v.set.Len(), v.set.KnownGroups())
		}
		for _, m := range members {
			if err := add(v.member(m.Name, m)); err != nil {
				return nil, err
			}
		}
	}
	return out, nil
}

// target resolves one name or address as the caller wrote it.
func (v resolver) target(t string) node {
	if m, ok := v.set.Lookup(t); ok {
		return v.member(t, m)
	}
	n := node{stamp: t, dest: DestOf(t)}
	n.self = v.rs.self[n.dest.Node]
	if _, err := netip.ParseAddr(n.dest.Host); err != nil && !n.self && !v.resolve {
		n.err = status.Errorf(codes.NotFound, "node %q is not in the inventory and is not an IP address", t)
	}
	return n
}

// member is inventory node m, stamped as stamp.
func (v resolver) member(stamp string, m inventory.Node) node {
	// Keyed by its name: a target outside the inventory never has the
	// name of one inside (Lookup would have found it), and a connection
	// made to the name before the inventory listed it is replaced, its
	// destination being different.
	return node{
		stamp: stamp,
		dest:  Dest{Node: inventory.Key(m.Name), Host: m.Address, Port: m.Port, ServerName: m.Identity},
		self:  v.rs.self[canonical(m.Name)] || v.rs.self[canonical(m.Address)],
	}
}

// backendOf is the proxy.Backend of node n: the local agent when n is
// this node, else n's apid.
func (r *Router) backendOf(rs *rules, n node, local, remote metadata.MD, s share) proxy.Backend {
	if n.self {
		l := r.local(n.stamp, n.dest, local)
		l.share = s
		return l
	}
	if why := outside(rs.networks, n.dest.Host); why != "" && n.err == nil {
		n.err = status.Errorf(codes.PermissionDenied, "node %s: %s", n.stamp, why)
	}
	return &Remote{name: n.stamp, dest: n.dest, fail: n.err, md: remote, nodes: r.d.Nodes, ej: r.ej, share: s}
}

// ErrNoCaller is returned by Dial for a context without an authorized
// caller.
var ErrNoCaller = errors.New("no authorized caller in the context")

// Dial connects apid's own services (the cluster health check) to one
// node the way a call with `node: target` would be routed, on behalf of
// the caller in ctx: with its roles, never more. It returns the context
// to call with, the connection and its release, which must be told how
// the call ended: a node that keeps failing is ejected, and then refused
// at once, as in any fan-out. target may be a group of exactly one node.
func (r *Router) Dial(ctx context.Context, target string) (context.Context, grpc.ClientConnInterface, func(error), error) {
	return r.dial(ctx, target, true)
}

// DialEjected is Dial for a caller whose point is to learn whether a node
// answers (the disruption budget, watching a rebooted node come back): an
// ejected node is tried all the same, and its answer restores it.
func (r *Router) DialEjected(ctx context.Context, target string) (context.Context, grpc.ClientConnInterface, func(error), error) {
	return r.dial(ctx, target, false)
}

func (r *Router) dial(ctx context.Context, target string, refuseEjected bool) (context.Context, grpc.ClientConnInterface, func(error), error) {
	caller, ok := auth.CallerFrom(ctx)
	if !ok {
		return nil, nil, nil, ErrNoCaller
	}
	rs := r.rules.Load()
	n, err := r.resolver(rs).one(target)
	if err != nil {
		return nil, nil, nil, status.Error(codes.InvalidArgument, err.Error())
	}
	if rs.localOnly && !n.self {
		return nil, nil, nil, errNoForwarding
	}
	out := rs.outgoing(metadata.MD{}, caller.Roles)
	b := r.backendOf(rs, n, out, forwarded(out, metadata.MD{}), share{})
	if rb, ok := b.(*Remote); ok {
		rb.mayRefuse = refuseEjected
		// The caller's service sets each attempt's deadline itself: a
		// node that misses it did not answer in time.
		rb.ownDeadline = true
	}
	callCtx, cc, release, err := b.Connect(ctx, "")
	if err != nil {
		return nil, nil, nil, err
	}
	return callCtx, cc, func(callErr error) {
		if rb, ok := b.(*Remote); ok {
			st := status.Convert(callErr)
			rb.Report(st.Code(), st.Message())
		}
		if release != nil {
			release()
		}
	}, nil
}

// CheckTargets returns the status a proxied call with ctx's node or nodes
// metadata would fail with, or that the node it names would answer
// (NOT_FOUND for a name nobody knows): for apid's own services, which
// serve whatever node is named but should not pass over a mistake.
func (r *Router) CheckTargets(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	rs := r.rules.Load()
	nodes, _, err := r.destinations(rs, md)
	if err != nil {
		return err
	}
	if rs.localOnly && !allSelf(nodes) {
		return errNoForwarding
	}
	for _, n := range nodes {
		if n.err != nil {
			return n.err
		}
	}
	return nil
}

// destinations resolves the routing metadata of a call: no node (none
// named: the local agent), the one node `node` names, or the nodes `nodes`
// names (fanOut), as a gRPC status on error.
func (r *Router) destinations(rs *rules, md metadata.MD) (nodes []node, fanOut bool, err error) {
	one, many := md[KeyNode], md[KeyNodes]
	switch {
	case len(one) > 0 && len(many) > 0:
		return nil, false, status.Error(codes.InvalidArgument, "both node and nodes metadata are set: use one")
	case len(one) > 1:
		return nil, false, status.Errorf(codes.InvalidArgument, "node metadata must be single-valued: it holds %d values (use nodes for several)", len(one))
	case len(one) == 1 && inventory.IsGroup(strings.TrimSpace(one[0])):
		// A multiplexing client (talosctl since v1.14) sends each -n value
		// as node: a group of several nodes is served as their fan-out,
		// each reply stamped with its node's name.
		t, err := parseItem(one[0])
		if err != nil {
			return nil, false, status.Error(codes.InvalidArgument, err.Error())
		}
		nodes, err := r.resolver(rs).expand([]string{t})
		if err != nil {
			return nil, false, status.Error(codes.InvalidArgument, err.Error())
		}
		return nodes, len(nodes) > 1, nil
	case len(one) == 1:
		n, err := r.resolver(rs).one(one[0])
		if err != nil {
			return nil, false, status.Error(codes.InvalidArgument, err.Error())
		}
		return []node{n}, false, nil
	case len(many) > 0:
		targets, err := ParseTargets(many, rs.max)
		if err != nil {
			return nil, false, status.Error(codes.InvalidArgument, err.Error())
		}
		resolved, err := r.resolver(rs).expand(targets)
		if err != nil {
			return nil, false, status.Error(codes.InvalidArgument, err.Error())
		}
		return resolved, true, nil
	}
	return nil, false, nil
}

// one resolves the target of a one-to-one call: a name, an address, or a
// group of exactly one node.
func (v resolver) one(target string) (node, error) {
	t, err := parseItem(target)
	if err != nil {
		return node{}, err
	}
	nodes, err := v.expand([]string{t})
	if err != nil {
		return node{}, err
	}
	if len(nodes) != 1 {
		names := make([]string, len(nodes))
		for i, n := range nodes {
			names[i] = n.stamp
		}
		return node{}, fmt.Errorf("node %s names %d nodes (%s): send it as nodes to fan out", t, len(nodes), strings.Join(names, ", "))
	}
	return nodes[0], nil
}
