package director

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/limits"
	"github.com/apid/apid/proxy"
)

// Metadata keys that route a call. (The keys through which one apid speaks
// for its caller to the next, auth.KeyRole and auth.KeyProxyFrom, are
// package auth's.)
const (
	KeyNode  = "node"  // one target: proxy one-to-one
	KeyNodes = "nodes" // several targets: fan out
	// KeyNodeTimeout lets a client shorten the per-node deadline of a
	// fan-out call (a Go duration such as "2s"); it can never lengthen it.
	KeyNodeTimeout = "apid-node-timeout"
)

const reflectionPrefix = "/grpc.reflection."

// DefaultForwardKeys are the client metadata keys passed on to the next hop:
// the official client's context and runtime keys and W3C trace context.
var DefaultForwardKeys = []string{"context", "runtime", "traceparent", "tracestate"}

// ReservedKey reports whether a metadata key is apid's own (routing,
// identity, deadlines) or a transport pseudo-header or gRPC-reserved key.
// Such keys are never copied from a caller to the next hop, whatever the
// configuration says.
func ReservedKey(k string) bool {
	k = strings.ToLower(k)
	switch k {
	case KeyNode, KeyNodes, auth.KeyProxyFrom, auth.KeyRole, KeyNodeTimeout:
		return true
	}
	// apid-: apid's own keys (the node timeout, the disruption budget's).
	return strings.HasPrefix(k, ":") || strings.HasPrefix(k, "grpc-") || strings.HasPrefix(k, "apid-")
}

// Router is the Director of apid: it implements proxy.Director. It is the
// routing section: built from its Config, given the next one on a reload
// (Apply), with its metrics (ejections) and its end (Close).
type Router struct {
	d       Deps
	rules   atomic.Pointer[rules]
	applied atomic.Pointer[Config]
	ej      *ejector
	// Nodes ejected and restored since start.
	ejected, restored atomic.Int64
}

// Nodes is what routing needs of the connections to other nodes (the
// Pool).
type Nodes interface {
	// ConnTo lends a connection to d until release.
	ConnTo(d Dest) (conn grpc.ClientConnInterface, release func(), err error)
	// Unestablished says how long node has had no connection established,
	// when longer than an attempt may take.
	Unestablished(node string) (time.Duration, bool)
	// SetNetworks bounds the addresses dialled (nodeNetworks; nil: any).
	SetNetworks(networks []netip.Prefix)
}

// Admission is what routing asks of the limits before it spends: a
// caller's share of one node, and metadata worth parsing.
type Admission interface {
	AdmitNode(id, node string, stream bool) (release func(), err error)
	AdmitMetadata(limits.MetadataSize) error
}

// Budget holds calls that would take a node down until the node's turn
// (the disruption section).
type Budget interface {
	// Disruptive reports whether calls of fullMethod may take their node
	// down: only those are held.
	Disruptive(fullMethod string) bool
	// Hold waits for the call of fullMethod with request to node (self:
	// this gateway's own) to fit the budget, for the caller in ctx; end
	// is told how the call ended.
	Hold(ctx context.Context, fullMethod, node string, self bool, request []byte) (end func(proxy.Outcome), err error)
	// Forwarded vets a call another apid forwarded, which is never held
	// here.
	Forwarded(ctx context.Context) error
}

// Deps are what routing uses and does not own.
type Deps struct {
	// Local is the connection to the local node agent.
	Local grpc.ClientConnInterface
	// Nodes reaches other nodes' apid.
	Nodes Nodes
	// Inventory resolves names and groups; nil: names are dialled as
	// written and groups are unknown.
	Inventory Inventory
	// Admission bounds callers' shares of nodes and metadata; nil: none.
	Admission Admission
	// Log hears of ejections and restorations; nil: discarded.
	Log *slog.Logger
	// Budget holds disruptive calls; nil: none is held.
	Budget Budget
}

// rules are a Config made ready for routing; SetConfig swaps them whole,
// so one call sees one configuration.
type rules struct {
	self              map[string]bool
	selfNames         []string       // as configured, in order
	networks          []netip.Prefix // nil: any address
	reply             map[string]bool
	localOnly         bool
	forward           []string
	kinds             methodKinds
	max               int
	timeout           time.Duration
	maxEjectedPercent int
}

// NewRouter returns the routing section for cfg (already validated).
func NewRouter(cfg Config, d Deps) *Router {
	if d.Log == nil {
		d.Log = slog.New(slog.DiscardHandler)
	}
	r := &Router{d: d}
	r.ej = newEjector(r.ejection)
	r.SetConfig(cfg)
	return r
}

// ejection logs and counts a node ejected (ejected true) or restored.
func (r *Router) ejection(e Ejection, ejected bool) {
	if ejected {
		r.ejected.Add(1)
		r.d.Log.Warn("node ejected", "node", e.Node, "failures", e.Failures, "ejections_in_a_row", e.Ejections,
			"until", e.Until.UTC().Format(time.RFC3339Nano), "last_error", e.LastError)
		return
	}
	r.restored.Add(1)
	r.d.Log.Info("node restored", "node", e.Node, "ejected_since", e.Since.UTC().Format(time.RFC3339Nano))
}

// Ejections lists the nodes ejected now.
func (r *Router) Ejections() []Ejection { return r.ej.snapshot() }

// SetConfig makes calls that start from now on routed by cfg; running
// calls keep the configuration they started with.
func (r *Router) SetConfig(cfg Config) {
	rs := &rules{
		self:    make(map[string]bool, len(cfg.SelfNames)),
		forward: append(slices.Clone(DefaultForwardKeys), cfg.ForwardKeys...),
		kinds:   newMethodKinds(cfg.Unary, cfg.ServerStreaming, cfg.ClientStreaming, cfg.BidiStreaming),
		max:     cfg.MaxNodes,
		timeout: cfg.NodeTimeout,

		localOnly:         cfg.LocalOnly,
		maxEjectedPercent: cfg.Ejection.MaxPercent,
	}
	if rs.max <= 0 {
		rs.max = DefaultConfig().MaxNodes
	}
	rs.forward = slices.DeleteFunc(rs.forward, func(k string) bool { return ReservedKey(k) })
	for i, k := range rs.forward {
		rs.forward[i] = strings.ToLower(k)
	}
	for _, n := range cfg.SelfNames {
		rs.self[canonical(n)] = true
	}
	rs.selfNames = slices.Clone(cfg.SelfNames)
	for _, n := range cfg.NodeNetworks {
		if p, err := netip.ParsePrefix(n); err == nil { // Validate refused the others
			rs.networks = append(rs.networks, p.Masked())
		}
	}
	r.d.Nodes.SetNetworks(rs.networks)
	rs.reply = make(map[string]bool, len(cfg.ReplyKeys))
	for _, k := range cfg.ReplyKeys {
		rs.reply[strings.ToLower(k)] = true
	}
	r.ej.setConfig(cfg.Ejection)
	r.rules.Store(rs)
	r.applied.Store(&cfg)
}

// Route implements proxy.Director. It routes only calls that package auth
// authorized (whose caller is in ctx) and fails closed on any other, so a
// server assembled without the authorizer serves nothing.
func (r *Router) Route(ctx context.Context, fullMethod string) (proxy.Route, error) {
	caller, ok := auth.CallerFrom(ctx)
	if !ok {
		return proxy.Route{}, status.Error(codes.Internal, "call reached routing without authorization")
	}
	md, _ := metadata.FromIncomingContext(ctx)
	rs := r.rules.Load()
	if r.d.Admission != nil {
		if err := r.d.Admission.AdmitMetadata(rs.sizes(md)); err != nil {
			return proxy.Route{}, err
		}
	}
	out := rs.outgoing(md, caller.Roles)
	if caller.Forwarded && r.d.Budget != nil && r.d.Budget.Disruptive(fullMethod) {
		if err := r.d.Budget.Forwarded(ctx); err != nil {
			return proxy.Route{}, err
		}
	}
	if caller.Forwarded || strings.HasPrefix(fullMethod, reflectionPrefix) {
		// Forwarded calls are this node's to serve (which also stops loops).
		// Reflection describes the API, which every node shares, and is a
		// bidirectional stream that cannot fan out, so tools that send
		// their nodes header with it still work.
		return oneToOne(r.local("", Dest{}, out), rs.kinds.kind(fullMethod)), nil
	}

	resolved, fanOut, err := r.destinations(rs, md)
	kind := rs.kinds.kind(fullMethod)
	share := share{admit: r.d.Admission, caller: caller.Subject, stream: kind != proxy.Unary}
	switch {
	case err != nil:
		return proxy.Route{}, err
	case rs.localOnly && !allSelf(resolved):
		return proxy.Route{}, errNoForwarding
	case len(resolved) == 0:
		l := r.local("", Dest{}, out)
		l.share = share
		return oneToOne(r.held(rs, fullMethod, l, true), kind), nil
	case !fanOut:
		b := r.backendOf(rs, resolved[0], out, forwarded(out, md), share)
		if rb, ok := b.(*Remote); ok {
			rb.mayRefuse = true // one node: fail fast while it is ejected
		}
		return oneToOne(r.held(rs, fullMethod, b, resolved[0].self), kind), nil
	}
	if err := rs.mayFanOut(fullMethod, md, resolved); err != nil {
		return proxy.Route{}, err
	}
	timeout, err := rs.nodeTimeout(md)
	if err != nil {
		return proxy.Route{}, err
	}
	backends := make([]proxy.Backend, len(resolved))
	remote := forwarded(out, md) // shared by every remote backend: read-only from here on
	skippable := len(resolved) * rs.maxEjectedPercent / 100
	// The node deadline is apid's own unless the client shortened it or
	// the call's own deadline comes first.
	own := timeout > 0 && timeout == rs.timeout
	if d, ok := ctx.Deadline(); ok && time.Until(d) <= timeout {
		own = false
	}
	holds := r.holds(fullMethod) // asked once, not per node
	for i, n := range resolved {
		b := r.backendOf(rs, n, out, remote, share)
		if rb, ok := b.(*Remote); ok {
			rb.ownDeadline = own
			if skippable > 0 && r.ej.peek(n.dest) {
				// At most maxPercent of the nodes are skipped as
				// ejected; the rest are tried whatever their record.
				rb.mayRefuse = true
				skippable--
			}
		}
		if holds {
			backends[i] = r.held(rs, fullMethod, b, n.self)
		} else {
			backends[i] = b
		}
	}
	return proxy.Route{Backends: backends, Mode: proxy.OneToMany, Kind: kind, NodeTimeout: timeout}, nil
}

// mayFanOut refuses a fan-out of a method whose replies cannot be merged
// (Talos's words first), and a group of several nodes for a method
// talosctl sends to one node only.
func (rs *rules) mayFanOut(fullMethod string, md metadata.MD, nodes []node) error {
	if !rs.kinds.method(fullMethod).Known {
		return status.Errorf(codes.InvalidArgument, "one-2-many proxying is not supported for method %s: apid does not know it (it is not in the Talos API apid was built with, nor in unaryMethods, serverStreamingMethods, clientStreamingMethods or bidiStreamingMethods), so it cannot tell how to stamp and merge its replies: call each node with node, or declare the method if its replies carry common.Metadata", fullMethod)
	}
	if !rs.kinds.method(fullMethod).Stamped {
		if group := groupIn(md); group != "" && len(md[KeyNode]) > 0 {
			// A multiplexing client (talosctl v1.13's get, image and
			// upgrade, every command since v1.14) sent the group as one
			// node: it labels the replies of one call as one node, so the
			// group's nodes must be listed for it to call each. Talos's
			// words first, then the list to type.
			return status.Errorf(codes.InvalidArgument, "one-2-many proxying is not supported for method %s\n%s names %d nodes: list them, as in talosctl -n %s",
				fullMethod, group, len(nodes), stampList(nodes, ",", 10))
		}
		return status.Errorf(codes.InvalidArgument, "one-2-many proxying is not supported for method %s: its replies carry no common.Metadata to stamp and merge (the Talos API fans out machine.MachineService, cluster.ClusterService, inspect.InspectService, storage.StorageService and time.TimeService); name one node with node, or call each node", fullMethod)
	}
	command, single := singleNodeMethods[fullMethod]
	if !single || len(nodes) < 2 {
		return nil
	}
	group := groupIn(md)
	if group == "" {
		return nil
	}
	if command == "read" {
		// talosctl reboot, shutdown, upgrade and reset follow each node
		// themselves (--wait, the default) and read its boot ID, one node
		// a call: the person typed the command, not this read.
		return status.Errorf(codes.InvalidArgument, "talosctl read works on one node, and %s names %d (%s)\ntalosctl follows each node of reboot, shutdown, upgrade and reset itself, so list them: talosctl -n %s <command>, or add --wait=false",
			group, len(nodes), stampList(nodes, ", ", 10), stampList(nodes, ",", 10))
	}
	return status.Errorf(codes.InvalidArgument, "talosctl %s works on one node, and %s names %d (%s): name one, as in talosctl -n %s %s",
		command, group, len(nodes), stampList(nodes, ", ", 10), nodes[0].stamp, command)
}

// groupIn returns the first group the routing metadata names, if any. It
// runs only when a call is about to be refused, and allocates nothing.
func groupIn(md metadata.MD) string {
	for _, key := range [...]string{KeyNode, KeyNodes} {
		for _, v := range md[key] {
			for item := range strings.SplitSeq(v, ",") {
				if g := strings.TrimSpace(item); inventory.IsGroup(g) {
					return g
				}
			}
		}
	}
	return ""
}

// stampList joins the names of at most max nodes with sep, an ellipsis
// standing for the rest.
func stampList(nodes []node, sep string, max int) string {
	names := make([]string, 0, min(len(nodes), max)+1)
	for _, n := range nodes[:min(len(nodes), max)] {
		names = append(names, n.stamp)
	}
	if len(nodes) > max {
		names = append(names, "…")
	}
	return strings.Join(names, sep)
}

// errNoForwarding refuses, in Talos's words, a call a local-only node
// would have to forward.
var errNoForwarding = status.Error(codes.PermissionDenied, "no request forwarding: this apid serves only its own node (localOnly)")

func allSelf(nodes []node) bool {
	for _, n := range nodes {
		if !n.self {
			return false
		}
	}
	return true
}

// outside reports why host may not be dialled under the node networks,
// or "" when it may (a name is checked once resolved, when it is dialled).
func outside(networks []netip.Prefix, host string) string {
	if len(networks) == 0 {
		return ""
	}
	ip, err := netip.ParseAddr(host)
	if err != nil {
		return ""
	}
	ip = ip.Unmap()
	for _, n := range networks {
		if n.Contains(ip) {
			return ""
		}
	}
	return fmt.Sprintf("address %s is outside the networks nodes live in (nodeNetworks)", ip)
}

// ReplyKey reports whether a header or trailer key of the nodes' replies
// reaches the client of a fan-out (proxy.Options.ReplyKey).
func (r *Router) ReplyKey(key string) bool { return r.rules.Load().reply[key] }

// sizes measures what the routing metadata and the forwarded keys of a
// call would make apid parse and forward (the limits judge it).
func (rs *rules) sizes(md metadata.MD) limits.MetadataSize {
	var m limits.MetadataSize
	for _, k := range [...]string{KeyNode, KeyNodes} {
		for _, v := range md[k] {
			m.Nodes += len(v)
		}
	}
	for _, k := range rs.forward {
		size := 0
		for _, v := range md[k] {
			size += len(v)
		}
		if size > m.ForwardBytes {
			m.ForwardKey, m.ForwardBytes = k, size
		}
	}
	return m
}

// Kind returns the shape of a method as the router knows it now.
func (r *Router) Kind(fullMethod string) proxy.Kind { return r.rules.Load().kinds.kind(fullMethod) }

// nodeTimeout is the configured per-node deadline, shortened by the
// client's KeyNodeTimeout if it sent one.
func (rs *rules) nodeTimeout(md metadata.MD) (time.Duration, error) {
	v := md[KeyNodeTimeout]
	if len(v) == 0 {
		return rs.timeout, nil
	}
	d, err := time.ParseDuration(v[0])
	if err != nil || d <= 0 || len(v) > 1 {
		return 0, status.Errorf(codes.InvalidArgument, "%s: want one positive duration such as 2s", KeyNodeTimeout)
	}
	if rs.timeout > 0 && rs.timeout < d {
		return rs.timeout, nil
	}
	return d, nil
}

func oneToOne(b proxy.Backend, kind proxy.Kind) proxy.Route {
	return proxy.Route{Backends: []proxy.Backend{b}, Mode: proxy.OneToOne, Kind: kind}
}

// outgoing builds the metadata for the next hop from nothing: allowlisted
// client keys plus the roles this apid resolved. Whatever else the caller
// sent (node, nodes, proxyfrom, talos-role, tokens, pseudo-headers) stays
// here.
func (rs *rules) outgoing(in metadata.MD, roles []string) metadata.MD {
	out := make(metadata.MD, len(rs.forward)+2)
	for _, k := range rs.forward {
		if v, ok := in[k]; ok {
			out[k] = slices.Clone(v)
		}
	}
	if len(roles) > 0 {
		out[auth.KeyRole] = slices.Clone(roles)
	}
	return out
}

// forwarded is the metadata for another node's apid: the local one plus
// proxyfrom, the :authority the caller used to reach this apid.
func forwarded(out, in metadata.MD) metadata.MD {
	fwd := out.Copy()
	from := "apid"
	if v := in[":authority"]; len(v) > 0 {
		from = v[0]
	}
	fwd[auth.KeyProxyFrom] = []string{from}
	return fwd
}

// selfNode is the inventory name of the node this gateway runs on (its
// first self name the inventory lists), for a call that names no node.
func (rs *rules) selfNode(inv Inventory) string {
	for _, n := range rs.selfNames {
		if inv != nil {
			if node, ok := inv.Set().Lookup(n); ok {
				return node.Name
			}
		}
	}
	if len(rs.selfNames) > 0 {
		return canonical(rs.selfNames[0])
	}
	return "(local)"
}
