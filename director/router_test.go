package director

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"maps"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/limits"
	"github.com/apid/apid/proxy"
)

// unusedConn stands for the local node agent. Routing must only hand it
// out; a call on it would mean the router itself talked to a backend.
type unusedConn struct{ t *testing.T }

func (c unusedConn) Invoke(context.Context, string, any, any, ...grpc.CallOption) error {
	c.t.Error("the router invoked a method on the local connection")
	return status.Error(codes.Internal, "unused")
}

func (c unusedConn) NewStream(context.Context, *grpc.StreamDesc, string, ...grpc.CallOption) (grpc.ClientStream, error) {
	c.t.Error("the router opened a stream on the local connection")
	return nil, status.Error(codes.Internal, "unused")
}

const gatewayAuthority = "gw.example:50000"

// Methods the routing tests ask about.
const (
	mVersion     = "/machine.MachineService/Version"
	mDmesg       = "/machine.MachineService/Dmesg"
	mReboot      = "/machine.MachineService/Reboot"
	mRead        = "/machine.MachineService/Read"
	mEtcdRecover = "/machine.MachineService/EtcdRecover"
	mUnknown     = "/made.Up/Method"
	mReflection  = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
)

// testRouter is a Router behind the authorizer with the built-in policy,
// as the gateway assembles them: Route here authorizes first, as the
// interceptor does before the proxy asks the director.
type testRouter struct {
	*Router
	authz *auth.Authorizer
}

func newTestRouter(t *testing.T, cfg Config) testRouter {
	t.Helper()
	return newInventoryRouter(t, cfg, nil)
}

func newInventoryRouter(t *testing.T, cfg Config, inv Inventory) testRouter {
	t.Helper()
	pool := NewPool(PoolConfig{Port: 50000, IdleTimeout: 200 * time.Millisecond})
	t.Cleanup(func() { _ = pool.Close() })
	policy, err := auth.NewPolicy(nil, false)
	if err != nil {
		t.Fatal(err)
	}
	return testRouter{Router: NewRouter(cfg, Deps{Local: unusedConn{t}, Nodes: pool, Inventory: inv, Admission: limits.New(limits.DefaultConfig(), time.Second, nil)}), authz: auth.NewAuthorizer(policy, nil)}
}

func (r testRouter) Route(ctx context.Context, method string) (proxy.Route, error) {
	ctx, err := r.authz.Authorize(ctx, method)
	if err != nil {
		return proxy.Route{}, err
	}
	return r.Router.Route(ctx, method)
}

// callerContext is the server-side context of a call from a peer whose
// verified certificate carries roles as its Organization, with md as the
// incoming metadata (the :authority pseudo-header included, as grpc-go
// delivers it).
func callerContext(roles []string, md metadata.MD) context.Context {
	cert := &x509.Certificate{Subject: pkix.Name{CommonName: "caller", Organization: roles}}
	ctx := peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{
		State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}, VerifiedChains: [][]*x509.Certificate{{cert}}},
	}})
	in := metadata.Pairs(":authority", gatewayAuthority)
	for k, v := range md {
		in[k] = append(in[k], v...)
	}
	return metadata.NewIncomingContext(ctx, in)
}

// hop is what one backend of a route would send: to whom, over which
// connection, with which metadata.
type hop struct {
	name  string
	local bool
	md    metadata.MD
}

func hops(t *testing.T, r testRouter, route proxy.Route, method string) []hop {
	t.Helper()
	var out []hop
	for _, b := range route.Backends {
		ctx, cc, release, err := b.Connect(context.Background(), method)
		if err != nil {
			t.Fatalf("Connect(%s): %v", b.Name(), err)
		}
		if release != nil {
			release()
		}
		md, _ := metadata.FromOutgoingContext(ctx)
		_, local := cc.(unusedConn)
		out = append(out, hop{name: b.Name(), local: local, md: md})
	}
	return out
}

func route(t *testing.T, r testRouter, method string, roles []string, md metadata.MD) (proxy.Route, []hop) {
	t.Helper()
	rt, err := r.Route(callerContext(roles, md), method)
	if err != nil {
		t.Fatalf("Route(%s) for %q: %v", method, roles, err)
	}
	return rt, hops(t, r, rt, method)
}

// expectMD fails unless md holds exactly want: the same keys, the same
// values in the same order.
func expectMD(t *testing.T, what string, md, want metadata.MD) {
	t.Helper()
	keys := slices.Sorted(maps.Keys(md))
	wantKeys := slices.Sorted(maps.Keys(want))
	if !slices.Equal(keys, wantKeys) {
		t.Errorf("%s: keys %q cross, want exactly %q", what, keys, wantKeys)
	}
	for k, v := range want {
		if !slices.Equal(md[k], v) {
			t.Errorf("%s: %s = %q, want %q", what, k, md[k], v)
		}
	}
}

// forged is what a hostile client adds to a call: routing and identity
// keys it has no right to set, a credential, and arbitrary keys, beside
// the keys every next hop should see.
func forged(extra ...string) metadata.MD {
	md := metadata.Pairs(
		auth.KeyRole, certs.RoleAdmin,
		auth.KeyRole, certs.RoleImpersonator,
		auth.KeyProxyFrom, "attacker",
		"token", "secret",
		"authorization", "Bearer stolen",
		"x-custom", "1",
		"x-bin-bin", "\x00\x01",
		"apid-node-timeout", "1s",
		"context", "prod",
		"runtime", "talosctl",
		"traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
		"tracestate", "vendor=1",
	)
	for i := 0; i+1 < len(extra); i += 2 {
		md.Append(extra[i], extra[i+1])
	}
	return md
}

// allowlisted is the part of forged() every next hop receives.
func allowlisted() metadata.MD {
	return metadata.MD{
		"context":     {"prod"},
		"runtime":     {"talosctl"},
		"traceparent": {"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
		"tracestate":  {"vendor=1"},
	}
}

func with(md metadata.MD, kv ...string) metadata.MD {
	out := md.Copy()
	for i := 0; i+1 < len(kv); i += 2 {
		out.Append(kv[i], kv[i+1])
	}
	return out
}

var reader = []string{certs.RoleReader}

func TestRouteForgedMetadataFromReader(t *testing.T) {
	r := newTestRouter(t, Config{SelfNames: []string{"10.0.0.1", "cp-1"}})
	asReader := with(allowlisted(), auth.KeyRole, certs.RoleReader)
	toRemote := with(asReader, auth.KeyProxyFrom, gatewayAuthority)

	t.Run("local", func(t *testing.T) {
		rt, hs := route(t, r, mVersion, reader, forged())
		if rt.Mode == proxy.OneToMany || len(hs) != 1 || !hs[0].local || hs[0].name != "" {
			t.Fatalf("route %+v, hops %+v: want the local agent alone", rt, hs)
		}
		expectMD(t, "local agent", hs[0].md, asReader)
	})

	t.Run("node", func(t *testing.T) {
		rt, hs := route(t, r, mVersion, reader, forged(KeyNode, "10.0.0.2"))
		if rt.Mode == proxy.OneToMany || len(hs) != 1 || hs[0].local || hs[0].name != "10.0.0.2" {
			t.Fatalf("route %+v, hops %+v: want the apid of 10.0.0.2 alone", rt, hs)
		}
		// proxyfrom names this gateway as the caller reached it, never
		// what the caller claimed.
		expectMD(t, "next apid", hs[0].md, toRemote)
	})

	t.Run("nodes", func(t *testing.T) {
		rt, hs := route(t, r, mDmesg, reader, forged(KeyNodes, "10.0.0.2", KeyNodes, "10.0.0.3,cp-1", KeyNodes, "10.0.0.2"))
		if rt.Mode != proxy.OneToMany || rt.Kind != proxy.ServerStream {
			t.Fatalf("route %+v: want a server-streaming fan-out", rt)
		}
		var names []string
		for _, h := range hs {
			names = append(names, h.name)
		}
		if !slices.Equal(names, []string{"10.0.0.2", "10.0.0.3", "cp-1"}) {
			t.Fatalf("backends %q, want 10.0.0.2, 10.0.0.3, cp-1 once each in order", names)
		}
		for _, h := range hs {
			if h.name == "cp-1" {
				if !h.local {
					t.Errorf("self name %s not served by the local agent", h.name)
				}
				expectMD(t, "local agent", h.md, asReader)
				continue
			}
			if h.local {
				t.Errorf("%s served locally", h.name)
			}
			expectMD(t, h.name, h.md, toRemote)
		}
	})

	t.Run("self node", func(t *testing.T) {
		_, hs := route(t, r, mVersion, reader, forged(KeyNode, "10.0.0.1"))
		if len(hs) != 1 || !hs[0].local || hs[0].name != "10.0.0.1" {
			t.Fatalf("hops %+v: want the local agent, named 10.0.0.1", hs)
		}
		expectMD(t, "local agent", hs[0].md, asReader)
	})

	t.Run("forged proxyfrom does not keep the call here", func(t *testing.T) {
		_, hs := route(t, r, mVersion, reader, metadata.Pairs(auth.KeyProxyFrom, "10.0.0.2", KeyNode, "10.0.0.2"))
		if len(hs) != 1 || hs[0].local {
			t.Fatalf("hops %+v: a reader's proxyfrom kept the call local", hs)
		}
		expectMD(t, "next apid", hs[0].md, metadata.Pairs(auth.KeyRole, certs.RoleReader, auth.KeyProxyFrom, gatewayAuthority))
	})

	t.Run("forged roles grant nothing", func(t *testing.T) {
		for _, m := range []string{mReboot, mRead, mEtcdRecover, mUnknown} {
			for _, md := range []metadata.MD{forged(), forged(KeyNode, "10.0.0.2"), forged(KeyNodes, "10.0.0.2,10.0.0.3")} {
				_, err := r.Route(callerContext(reader, md), m)
				if status.Code(err) != codes.PermissionDenied {
					t.Errorf("reader with forged roles calling %s (%v): %v, want PermissionDenied", m, md[KeyNode], err)
				}
			}
		}
	})
}

func TestRouteCallerWithoutRoles(t *testing.T) {
	r := newTestRouter(t, Config{})
	for name, roles := range map[string][]string{"no roles": nil, "unknown roles only": {"os:wizard", "team:ops"}} {
		t.Run(name, func(t *testing.T) {
			for _, m := range []string{mVersion, mReflection, mReboot, mUnknown} {
				for _, md := range []metadata.MD{forged(), forged(KeyNode, "10.0.0.2"), forged(KeyNodes, "10.0.0.2,10.0.0.2")} {
					_, err := r.Route(callerContext(roles, md), m)
					if status.Code(err) != codes.PermissionDenied {
						t.Fatalf("%s: %v, want PermissionDenied", m, err)
					}
					if msg := status.Convert(err).Message(); !strings.Contains(msg, "the caller has none") || strings.Contains(msg, "wizard") {
						t.Errorf("%s: message %q, want the caller to have none (unknown roles are not roles)", m, msg)
					}
				}
			}
		})
	}
}

// TestOutgoingWithoutRoles is the shape of advisory GHSA-rjwj-368c-f82r: a
// caller whose roles resolve to nothing must not have its own talos-role
// header carried to the next hop.
func TestOutgoingWithoutRoles(t *testing.T) {
	r := newTestRouter(t, Config{})
	for _, roles := range [][]string{nil, {}} {
		out := r.rules.Load().outgoing(forged(), roles)
		if v, ok := out[auth.KeyRole]; ok {
			t.Errorf("outgoing with roles %#v holds %s = %q", roles, auth.KeyRole, v)
		}
		expectMD(t, "next hop", out, allowlisted())
	}
}

func TestRouteImpersonator(t *testing.T) {
	r := newTestRouter(t, Config{SelfNames: []string{"10.0.0.1"}})
	impersonator := []string{certs.RoleImpersonator}

	t.Run("forwarded call is served here with the forwarded roles", func(t *testing.T) {
		md := with(allowlisted(), auth.KeyProxyFrom, "10.0.0.9:50000", auth.KeyRole, certs.RoleReader, auth.KeyRole, "os:wizard",
			KeyNode, "10.0.0.2", "token", "secret")
		rt, hs := route(t, r, mVersion, impersonator, md)
		if rt.Mode == proxy.OneToMany || len(hs) != 1 || !hs[0].local {
			t.Fatalf("route %+v, hops %+v: a forwarded call must be served by the local agent", rt, hs)
		}
		// The unknown role is dropped, the impersonator's own role is not
		// added, proxyfrom and node stop here.
		expectMD(t, "local agent", hs[0].md, with(allowlisted(), auth.KeyRole, certs.RoleReader))
		if _, err := r.Route(callerContext(impersonator, md), mReboot); status.Code(err) != codes.PermissionDenied {
			t.Errorf("forwarded reader calling Reboot: %v, want PermissionDenied", err)
		}
	})

	t.Run("forwarded roles replace the peer's own", func(t *testing.T) {
		both := []string{certs.RoleAdmin, certs.RoleImpersonator}
		md := metadata.Pairs(auth.KeyProxyFrom, "x", auth.KeyRole, certs.RoleReader)
		if _, err := r.Route(callerContext(both, md), mReboot); status.Code(err) != codes.PermissionDenied {
			t.Errorf("admin impersonator forwarding a reader's Reboot: %v, want PermissionDenied", err)
		}
	})

	t.Run("forwarded call without roles has none", func(t *testing.T) {
		for _, peerRoles := range [][]string{impersonator, {certs.RoleAdmin, certs.RoleImpersonator}} {
			md := metadata.Pairs(auth.KeyProxyFrom, "10.0.0.9:50000")
			for _, m := range []string{mVersion, mReflection} {
				_, err := r.Route(callerContext(peerRoles, md), m)
				if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "the caller has none") {
					t.Errorf("peer %q forwarding %s without roles: %v, want PermissionDenied for a caller with none", peerRoles, m, err)
				}
			}
			c, err := auth.Identify(callerContext(peerRoles, md))
			if err != nil || len(c.Roles) != 0 || !c.Forwarded {
				t.Errorf("Identify = %+v, %v; want forwarded, no roles", c, err)
			}
		}
	})

	t.Run("impersonating client routes with the asserted roles", func(t *testing.T) {
		md := metadata.Pairs(auth.KeyRole, certs.RoleOperator, KeyNode, "10.0.0.2")
		_, hs := route(t, r, mReboot, impersonator, md)
		if len(hs) != 1 || hs[0].local || hs[0].name != "10.0.0.2" {
			t.Fatalf("hops %+v: want the apid of 10.0.0.2", hs)
		}
		expectMD(t, "next apid", hs[0].md, metadata.Pairs(auth.KeyRole, certs.RoleOperator, auth.KeyProxyFrom, gatewayAuthority))
	})

	t.Run("impersonator alone may call nothing", func(t *testing.T) {
		if _, err := r.Route(callerContext(impersonator, nil), mVersion); status.Code(err) != codes.PermissionDenied {
			t.Errorf("impersonator without forwarded roles calling Version: %v, want PermissionDenied", err)
		}
	})
}

func TestRouteNeedsVerifiedCertificate(t *testing.T) {
	r := newTestRouter(t, Config{})
	admin := &x509.Certificate{Subject: pkix.Name{Organization: []string{certs.RoleAdmin}}}
	for name, ctx := range map[string]context.Context{
		"no peer": context.Background(),
		"no TLS":  peer.NewContext(context.Background(), &peer.Peer{}),
		"unverified certificate": peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{
			State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{admin}},
		}}),
	} {
		if _, err := r.Route(ctx, mVersion); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: %v, want Unauthenticated", name, err)
		}
	}
}

func TestRouteRefusesMalformedMethods(t *testing.T) {
	r := newTestRouter(t, Config{})
	admin := []string{certs.RoleAdmin}
	for _, m := range []string{
		"machine.MachineService/Version",
		"//machine.MachineService/Version",
		"/machine.MachineService/Version/",
		"/machine.MachineService//Version",
		"/machine.MachineService/Version/../Reboot",
		"/machine.MachineService/",
		"",
	} {
		if _, err := r.Route(callerContext(admin, nil), m); status.Code(err) != codes.InvalidArgument {
			t.Errorf("Route(%q) as admin: %v, want InvalidArgument", m, err)
		}
		// The path is refused before the caller is even identified.
		if _, err := r.Route(context.Background(), m); status.Code(err) != codes.InvalidArgument {
			t.Errorf("Route(%q) without a peer: %v, want InvalidArgument", m, err)
		}
	}
}

func TestRouteTargets(t *testing.T) {
	r := newTestRouter(t, Config{MaxNodes: 3, SelfNames: []string{"10.0.0.1"}})
	admin := []string{certs.RoleAdmin}
	for _, tc := range []struct {
		name string
		md   metadata.MD
	}{
		{"node and nodes", metadata.Pairs(KeyNode, "10.0.0.2", KeyNodes, "10.0.0.3")},
		{"node twice", metadata.Pairs(KeyNode, "10.0.0.2", KeyNode, "10.0.0.2")},
		{"node empty", metadata.Pairs(KeyNode, "")},
		{"node blank", metadata.Pairs(KeyNode, "  ")},
		{"node with port", metadata.Pairs(KeyNode, "10.0.0.2:50000")},
		{"node with path", metadata.Pairs(KeyNode, "10.0.0.2/x")},
		{"nodes empty", metadata.Pairs(KeyNodes, "")},
		{"nodes empty item", metadata.Pairs(KeyNodes, "10.0.0.2,,10.0.0.3")},
		{"nodes trailing comma", metadata.Pairs(KeyNodes, "10.0.0.2,")},
		{"nodes empty value", metadata.Pairs(KeyNodes, "10.0.0.2", KeyNodes, "")},
		{"nodes with port", metadata.Pairs(KeyNodes, "10.0.0.2:1")},
		{"nodes over the limit", metadata.Pairs(KeyNodes, "10.0.0.2,10.0.0.3,10.0.0.4,10.0.0.5")},
		{"nodes over the limit in values", metadata.Pairs(KeyNodes, "a", KeyNodes, "b", KeyNodes, "c", KeyNodes, "d")},
		{"bad node timeout", metadata.Pairs(KeyNodes, "10.0.0.2", KeyNodeTimeout, "soon")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rt, err := r.Route(callerContext(admin, tc.md), mVersion)
			if status.Code(err) != codes.InvalidArgument {
				t.Fatalf("route %+v, %v; want InvalidArgument", rt, err)
			}
			if len(rt.Backends) != 0 {
				t.Errorf("an error route names %d backends", len(rt.Backends))
			}
		})
	}
	if n := r.d.Nodes.(*Pool).Len(); n != 0 {
		t.Errorf("refused routes left %d pooled connections", n)
	}

	t.Run("duplicates collapse and do not count against the limit", func(t *testing.T) {
		md := metadata.Pairs(KeyNodes, "10.0.0.2, 10.0.0.2", KeyNodes, "10.0.0.3", KeyNodes, "10.0.0.1", KeyNodes, "10.0.0.3,10.0.0.1")
		rt, hs := route(t, r, mVersion, admin, md)
		if rt.Mode != proxy.OneToMany || len(hs) != 3 {
			t.Fatalf("route %+v: want 3 distinct backends", rt)
		}
		for i, want := range []struct {
			name  string
			local bool
		}{{"10.0.0.2", false}, {"10.0.0.3", false}, {"10.0.0.1", true}} {
			if hs[i].name != want.name || hs[i].local != want.local {
				t.Errorf("backend %d = %+v, want %s (local %v)", i, hs[i], want.name, want.local)
			}
		}
	})

	t.Run("one node in nodes is still a fan-out", func(t *testing.T) {
		rt, hs := route(t, r, mVersion, admin, metadata.Pairs(KeyNodes, "10.0.0.1,10.0.0.1"))
		if rt.Mode != proxy.OneToMany || len(hs) != 1 || !hs[0].local || hs[0].name != "10.0.0.1" {
			t.Fatalf("route %+v, hops %+v: want a stamped fan-out to the local agent", rt, hs)
		}
	})

	t.Run("reflection is served here", func(t *testing.T) {
		rt, hs := route(t, r, mReflection, reader, metadata.Pairs(KeyNodes, "10.0.0.2,10.0.0.3"))
		if rt.Mode == proxy.OneToMany || len(hs) != 1 || !hs[0].local {
			t.Fatalf("route %+v, hops %+v: reflection must go to the local agent alone", rt, hs)
		}
	})
}

func TestRouteNodeTimeout(t *testing.T) {
	admin := []string{certs.RoleAdmin}
	for _, tc := range []struct {
		configured time.Duration
		header     []string
		want       time.Duration
		ok         bool
	}{
		{10 * time.Second, nil, 10 * time.Second, true},
		{10 * time.Second, []string{"2s"}, 2 * time.Second, true},
		{10 * time.Second, []string{"1m"}, 10 * time.Second, true},
		{10 * time.Second, []string{"10s"}, 10 * time.Second, true},
		{0, []string{"1m"}, time.Minute, true},
		{0, nil, 0, true},
		{10 * time.Second, []string{"0s"}, 0, false},
		{10 * time.Second, []string{"-1s"}, 0, false},
		{10 * time.Second, []string{"2"}, 0, false},
		{10 * time.Second, []string{"1s", "1s"}, 0, false},
	} {
		r := newTestRouter(t, Config{NodeTimeout: tc.configured})
		md := metadata.Pairs(KeyNodes, "10.0.0.2")
		for _, v := range tc.header {
			md.Append(KeyNodeTimeout, v)
		}
		rt, err := r.Route(callerContext(admin, md), mVersion)
		switch {
		case !tc.ok && status.Code(err) != codes.InvalidArgument:
			t.Errorf("configured %s, header %q: %v, want InvalidArgument", tc.configured, tc.header, err)
		case tc.ok && err != nil:
			t.Errorf("configured %s, header %q: %v", tc.configured, tc.header, err)
		case tc.ok && rt.NodeTimeout != tc.want:
			t.Errorf("configured %s, header %q: node timeout %s, want %s", tc.configured, tc.header, rt.NodeTimeout, tc.want)
		}
	}
}

func TestPermissionDeniedMessage(t *testing.T) {
	r := newTestRouter(t, Config{})
	_, err := r.Route(callerContext([]string{certs.RoleReader, "os:wizard"}, forged()), mReboot)
	st := status.Convert(err)
	if st.Code() != codes.PermissionDenied {
		t.Fatalf("%v, want PermissionDenied", err)
	}
	msg := st.Message()
	for _, want := range []string{mReboot, certs.RoleAdmin, certs.RoleOperator, "the caller has " + certs.RoleReader} {
		if !strings.Contains(msg, want) {
			t.Errorf("message %q does not mention %q", msg, want)
		}
	}
	// Neither the forged role nor the ignored unknown one is presented as
	// the caller's.
	if strings.Contains(msg, "wizard") || strings.Contains(msg, "the caller has "+certs.RoleAdmin) {
		t.Errorf("message %q names roles the caller does not hold", msg)
	}

	_, err = r.Route(callerContext(reader, nil), mUnknown)
	if msg := status.Convert(err).Message(); !strings.Contains(msg, mUnknown) || !strings.Contains(msg, "needs one of the roles "+certs.RoleAdmin+";") {
		t.Errorf("unknown method: message %q, want it admin-only", msg)
	}
}

func TestForwardKeys(t *testing.T) {
	r := newTestRouter(t, Config{ForwardKeys: []string{"X-Custom"}})
	_, hs := route(t, r, mVersion, reader, forged())
	expectMD(t, "local agent", hs[0].md, with(allowlisted(), "x-custom", "1", auth.KeyRole, certs.RoleReader))
}

// TestForwardKeysCannotCarryRoutingKeys: naming a routing or identity key
// in the configured allowlist must not let a caller's value of it through,
// or one careless line of configuration reopens what the allowlist closes.
func TestForwardKeysCannotCarryRoutingKeys(t *testing.T) {
	reserved := []string{KeyNode, KeyNodes, auth.KeyProxyFrom, auth.KeyRole, KeyNodeTimeout, ":authority"}
	r := newTestRouter(t, Config{ForwardKeys: reserved, SelfNames: []string{"10.0.0.1"}})
	md := forged(KeyNodes, "10.0.0.2,10.0.0.1")
	rt, hs := route(t, r, mVersion, reader, md)
	if len(hs) != 2 || rt.Mode != proxy.OneToMany {
		t.Fatalf("hops %+v", hs)
	}
	expectMD(t, "next apid", hs[0].md, with(allowlisted(), auth.KeyRole, certs.RoleReader, auth.KeyProxyFrom, gatewayAuthority))
	expectMD(t, "local agent", hs[1].md, with(allowlisted(), auth.KeyRole, certs.RoleReader))
}

// TestRouteRefusesUnauthorizedCalls: a call that did not pass the
// authorizer (a server assembled without it) is refused, whoever the peer.
func TestRouteRefusesUnauthorizedCalls(t *testing.T) {
	r := newTestRouter(t, Config{})
	_, err := r.Router.Route(callerContext([]string{certs.RoleAdmin}, nil), mVersion)
	if status.Code(err) != codes.Internal {
		t.Fatalf("unauthorized call routed: %v, want Internal", err)
	}
}

// TestLocalOnlyRefusesForwarding: a local-only apid behaves as a Talos
// worker's: a call naming another node is PermissionDenied "no request
// forwarding" as a whole (node or nodes), a call naming only itself is
// served locally, and a call naming nothing too.
func TestLocalOnlyRefusesForwarding(t *testing.T) {
	r := newTestRouter(t, Config{LocalOnly: true, SelfNames: []string{"10.0.0.1", "w-1"}})
	admin := []string{certs.RoleAdmin}
	for _, md := range []metadata.MD{
		metadata.Pairs(KeyNode, "10.0.0.2"),
		metadata.Pairs(KeyNodes, "10.0.0.2"),
		metadata.Pairs(KeyNodes, "10.0.0.1", KeyNodes, "10.0.0.2"),
		metadata.Pairs(KeyNode, "w-2"),
	} {
		_, err := r.Route(callerContext(admin, md), "/machine.MachineService/Version")
		if status.Code(err) != codes.PermissionDenied || !strings.HasPrefix(status.Convert(err).Message(), "no request forwarding") {
			t.Errorf("%v: %v, want PermissionDenied no request forwarding", md, err)
		}
	}
	for _, md := range []metadata.MD{{}, metadata.Pairs(KeyNode, "10.0.0.1"), metadata.Pairs(KeyNodes, "w-1")} {
		rt, _ := route(t, r, "/machine.MachineService/Version", admin, md)
		if _, local := rt.Backends[0].(*Local); len(rt.Backends) != 1 || !local {
			t.Errorf("%v: routed to %v, want the local agent", md, rt.Backends)
		}
	}
	// Talos's words for a multi-valued node.
	_, err := r.Route(callerContext(admin, metadata.Pairs(KeyNode, "10.0.0.1", KeyNode, "10.0.0.2")), "/machine.MachineService/Version")
	if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), "node metadata must be single-valued") {
		t.Errorf("two node values: %v", err)
	}
}

// TestFanOutFollowsTheDescriptors: what may fan out and how it streams is
// read from the compiled descriptors, and the services whose replies carry
// common.Metadata are exactly the five Talos fans out.
func TestFanOutFollowsTheDescriptors(t *testing.T) {
	stampedServices := map[string]bool{}
	unstamped := map[string]bool{}
	for name, m := range apiMethods {
		svc := name[1:strings.LastIndexByte(name, '/')]
		if m.Stamped {
			stampedServices[svc] = true
		} else {
			unstamped[svc] = true
		}
	}
	var both []string
	for svc := range stampedServices {
		if unstamped[svc] {
			both = append(both, svc)
		}
	}
	// Talos (commit 2165280d0) fans out these services and refuses the rest.
	talos := []string{"cluster.ClusterService", "inspect.InspectService", "machine.MachineService", "os.OSService", "storage.StorageService", "time.TimeService"}
	if got := slices.Sorted(maps.Keys(stampedServices)); !slices.Equal(got, talos) || len(both) > 0 {
		t.Fatalf("services whose replies can be merged: %v (mixed: %v), want %v", got, both, talos)
	}
	for method, want := range map[string]proxy.Kind{
		"/cosi.resource.State/List":           proxy.ServerStream,
		"/cosi.resource.State/Watch":          proxy.ServerStream,
		"/cosi.resource.State/Get":            proxy.Unary,
		"/machine.ImageService/List":          proxy.ServerStream,
		"/machine.ImageService/Pull":          proxy.ServerStream,
		"/machine.ImageService/Import":        proxy.ClientStream,
		"/machine.DebugService/ContainerRun":  proxy.BidiStream,
		"/grpc.health.v1.Health/Watch":        proxy.ServerStream,
		"/machine.MachineService/Logs":        proxy.ServerStream,
		"/machine.MachineService/EtcdRecover": proxy.ClientStream,
		"/machine.MachineService/Version":     proxy.Unary,
		// Unknown: relayed frame by frame both ways, whatever the name.
		"/custom.Service/TailStream": proxy.BidiStream,
		"/custom.Service/Get":        proxy.BidiStream,
	} {
		if got := Describe(method).Kind; got != want {
			t.Errorf("%s: %v, want %v", method, got, want)
		}
	}

	r := newTestRouter(t, Config{})
	admin := []string{certs.RoleAdmin}
	_, err := r.Route(callerContext(admin, metadata.Pairs(KeyNodes, "10.0.0.2")), "/cosi.resource.State/Get")
	if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), "one-2-many proxying is not supported for method /cosi.resource.State/Get") {
		t.Errorf("COSI with nodes: %v", err)
	}
	if rt, err := r.Route(callerContext(admin, metadata.Pairs(KeyNode, "10.0.0.2")), "/cosi.resource.State/Get"); err != nil || rt.Mode == proxy.OneToMany {
		t.Errorf("COSI with node: %+v, %v; want one-to-one", rt, err)
	}
	// A method apid does not know (a newer Talos's) goes one-to-one as a
	// bidirectional stream and never fans out, unless declared.
	const newer = "/machine.LVMService/Create"
	if rt, err := r.Route(callerContext(admin, metadata.Pairs(KeyNode, "10.0.0.2")), newer); err != nil || rt.Mode != proxy.OneToOne || rt.Kind != proxy.BidiStream {
		t.Errorf("unknown method with node: %+v, %v; want one-to-one, bidi-streaming", rt, err)
	}
	_, err = r.Route(callerContext(admin, metadata.Pairs(KeyNodes, "10.0.0.2,10.0.0.3")), newer)
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "apid does not know it") {
		t.Errorf("unknown method with nodes: %v", err)
	}
	declared := newTestRouter(t, Config{Unary: []string{newer}})
	if rt, err := declared.Route(callerContext(admin, metadata.Pairs(KeyNodes, "10.0.0.2,10.0.0.3")), newer); err != nil || rt.Mode != proxy.OneToMany || rt.Kind != proxy.Unary {
		t.Errorf("declared unary method with nodes: %+v, %v; want fan-out, unary", rt, err)
	}
	// Policy and routing name the same methods: every method a built-in
	// rule names exists in the descriptors.
	for _, rule := range auth.DefaultRules() {
		if !strings.HasSuffix(rule.Method, "*") && !Describe(rule.Method).Known {
			t.Errorf("the policy names %s, which no compiled service has", rule.Method)
		}
	}
}

// TestGroupsRefusedForSingleNodeCommands: talosctl cannot see through a
// group, so the gateway keeps its one-node guard for groups.
func TestGroupsRefusedForSingleNodeCommands(t *testing.T) {
	r := inventoryRouter(t, Config{}, testInventory)
	admin := []string{certs.RoleAdmin}
	for _, md := range []metadata.MD{metadata.Pairs(KeyNodes, "@controlplane"), metadata.Pairs(KeyNode, "@controlplane")} {
		_, err := r.Route(callerContext(admin, md), "/machine.MachineService/EtcdLeaveCluster")
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "talosctl etcd leave works on one node, and @controlplane names 3 (cp-1, cp-2, cp-3): name one, as in talosctl -n cp-1 etcd leave") {
			t.Errorf("%v: %v", md, err)
		}
	}
	// A group of one, or a list a client wrote out, is the client's call.
	for _, md := range []metadata.MD{metadata.Pairs(KeyNodes, "@workers"), metadata.Pairs(KeyNodes, "cp-1,cp-2")} {
		if _, err := r.Route(callerContext(admin, md), "/machine.MachineService/Read"); err != nil {
			t.Errorf("%v: %v", md, err)
		}
	}

	// A method whose replies cannot be merged, asked of a group as one node
	// (a multiplexing client): Talos's words, then the list to type.
	// Two lines at most.
	_, err := r.Route(callerContext(admin, metadata.Pairs(KeyNode, "@controlplane")), "/machine.ImageService/Pull")
	if msg := status.Convert(err).Message(); status.Code(err) != codes.InvalidArgument ||
		msg != "one-2-many proxying is not supported for method /machine.ImageService/Pull\n@controlplane names 3 nodes: list them, as in talosctl -n cp-1,cp-2,cp-3" {
		t.Errorf("image pull of a group: %v", err)
	}

	// talosctl's --wait tracker reads each node's boot ID: the refusal
	// speaks of the command the person typed.
	_, err = r.Route(callerContext(admin, metadata.Pairs(KeyNode, "@controlplane")), "/machine.MachineService/Read")
	if msg := status.Convert(err).Message(); status.Code(err) != codes.InvalidArgument || strings.Count(msg, "\n") != 1 ||
		!strings.HasPrefix(msg, "talosctl read works on one node, and @controlplane names 3 (cp-1, cp-2, cp-3)\n") ||
		!strings.Contains(msg, "list them: talosctl -n cp-1,cp-2,cp-3 <command>, or add --wait=false") {
		t.Errorf("read of a group: %v", err)
	}
}

// TestMetadataSizesBounded: routing and forwarded metadata past apid's
// bounds is refused naming the key, before anything is parsed or dialled.
func TestMetadataSizesBounded(t *testing.T) {
	r := newTestRouter(t, Config{})
	admin := []string{certs.RoleAdmin}
	big := strings.Repeat("10.0.0.2,", 8000)
	for md, want := range map[*metadata.MD]string{
		ptrMD(metadata.Pairs(KeyNodes, big)):                                             "node and nodes metadata hold",
		ptrMD(metadata.Pairs(KeyNodes, "10.0.0.2", "traceparent", big)):                  "traceparent metadata holds",
		ptrMD(metadata.Pairs("context", strings.Repeat("x", 9000), KeyNode, "10.0.0.2")): "context metadata holds",
	} {
		_, err := r.Route(callerContext(admin, *md), mVersion)
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: %v", want, err)
		}
	}
}

func ptrMD(md metadata.MD) *metadata.MD { return &md }

// TestNodeNetworks: an address outside nodeNetworks is that node's
// PermissionDenied entry, whoever named it; inside, it is dialled.
func TestNodeNetworks(t *testing.T) {
	r := inventoryRouter(t, Config{NodeNetworks: []string{"127.0.0.0/8"}}, inventory.Config{Nodes: []inventory.Node{{Name: "far", Address: "198.18.0.9"}, {Name: "near", Address: "127.0.0.9"}}})
	rt, err := r.Route(callerContext([]string{certs.RoleAdmin}, metadata.Pairs(KeyNodes, "far,near,198.18.0.10")), mVersion)
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []codes.Code{codes.PermissionDenied, codes.OK, codes.PermissionDenied} {
		_, _, _, err := rt.Backends[i].Connect(context.Background(), mVersion)
		if want == codes.OK {
			if err != nil {
				t.Errorf("%s: %v", rt.Backends[i].Name(), err)
			}
			continue
		}
		if status.Code(err) != want || !strings.Contains(err.Error(), "outside the networks nodes live in (nodeNetworks)") {
			t.Errorf("%s: %v, want %v", rt.Backends[i].Name(), err, want)
		}
	}
	// A name is checked where it resolves: at the dial.
	if why := outside([]netip.Prefix{netip.MustParsePrefix("127.0.0.0/8")}, "::ffff:127.0.0.1"); why != "" {
		t.Errorf("an IPv4-mapped loopback address: %s", why)
	}
	cfg := Config{NodeNetworks: []string{"10.0.0.0/33"}, MaxNodes: 1, Ejection: DefaultConfig().Ejection}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "nodeNetworks[0]") {
		t.Errorf("a bad CIDR: %v", err)
	}
}
