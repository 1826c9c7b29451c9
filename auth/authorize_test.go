package auth

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"runtime"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/certs"
)

// peerStream is a server stream of a call from a peer whose verified
// certificate carries roles.
type peerStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s peerStream) Context() context.Context { return s.ctx }

func fromPeer(cn string, roles ...string) peerStream {
	cert := &x509.Certificate{Subject: pkix.Name{CommonName: cn, Organization: roles}}
	return peerStream{ctx: peer.NewContext(context.Background(), &peer.Peer{AuthInfo: credentials.TLSInfo{
		State: tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}, VerifiedChains: [][]*x509.Certificate{{cert}}},
	}})}
}

// TestInterceptorsPutTheCallerInTheContext chains the interceptors as the
// gateway does, with a probe between them as a call logger sits there.
func TestInterceptorsPutTheCallerInTheContext(t *testing.T) {
	policy, err := NewPolicy(nil, false)
	if err != nil {
		t.Fatal(err)
	}
	authz := NewAuthorizer(policy, nil)
	var logged Caller
	probe := func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
		logged, _ = IdentityFrom(ss.Context())
		return h(srv, ss)
	}
	chain := []grpc.StreamServerInterceptor{IdentityInterceptor(), probe, authz.StreamInterceptor()}
	call := func(ss grpc.ServerStream, method string) (Caller, bool, error) {
		var got Caller
		var ok bool
		h := func(_ any, ss grpc.ServerStream) error {
			got, ok = CallerFrom(ss.Context())
			return nil
		}
		for i := len(chain) - 1; i >= 0; i-- {
			next, ic := h, chain[i]
			h = func(srv any, ss grpc.ServerStream) error {
				return ic(srv, ss, &grpc.StreamServerInfo{FullMethod: method}, next)
			}
		}
		return got, ok, h(nil, ss)
	}

	c, ok, err := call(fromPeer("ops", certs.RoleReader, "team:ops"), "/machine.MachineService/Version")
	if err != nil || !ok || len(c.Roles) != 1 || c.Roles[0] != certs.RoleReader || len(c.Unknown) != 1 || c.CommonName != "ops" {
		t.Fatalf("reader calling Version: caller %+v (in context %v), %v", c, ok, err)
	}
	_, ok, err = call(fromPeer("ops", certs.RoleReader), "/machine.MachineService/Reboot")
	if status.Code(err) != codes.PermissionDenied || ok {
		t.Fatalf("reader calling Reboot: %v, handler reached %v", err, ok)
	}
	// Talos's words first, as its own tests match them, then apid's detail.
	if want := "rpc error: code = PermissionDenied desc = not authorized: /machine.MachineService/Reboot needs one of the roles os:admin, os:operator; the caller has os:reader"; err.Error() != want {
		t.Fatalf("refusal %q\nwant %q", err, want)
	}
	if logged.CommonName != "ops" {
		t.Fatalf("a refused call's caller was not known to the interceptors before the authorizer: %+v", logged)
	}
	if _, _, err = call(peerStream{ctx: context.Background()}, "/machine.MachineService/Version"); status.Code(err) != codes.Unauthenticated {
		t.Fatalf("call without a certificate: %v, want Unauthenticated", err)
	}
	if _, _, err = call(fromPeer("root", certs.RoleAdmin), "//machine.MachineService/Version"); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("malformed path: %v, want InvalidArgument", err)
	}
}

// TestIdentifyRemembersACertificate: a connection's calls share what is read
// of its certificate, and one call's roles cannot change the next one's;
// the entry goes with the certificate.
func TestIdentifyRemembersACertificate(t *testing.T) {
	ss := fromPeer("alice", "os:reader", "os:operator")
	first, err := Identify(ss.Context())
	if err != nil {
		t.Fatal(err)
	}
	first.Roles = append(first.Roles, "os:admin") // must not reach the cache
	second, err := Identify(ss.Context())
	if err != nil {
		t.Fatal(err)
	}
	if second.Subject != "CN=alice,O=os:reader+O=os:operator" || !slices.Equal(second.Roles, []string{"os:reader", "os:operator"}) {
		t.Fatalf("second call: %+v", second)
	}
	if n := testing.AllocsPerRun(100, func() { _, _ = Identify(ss.Context()) }); n > 2 {
		t.Errorf("%.0f allocations to identify a known certificate", n)
	}
	// Cleanups run after a GC finds the certificate unreachable.
	countFacts := func() (n int) {
		certFacts.Range(func(any, any) bool { n++; return true })
		return n
	}
	before := countFacts()
	for range 50 {
		_, _ = Identify(fromPeer("once", "os:reader").Context())
	}
	deadline := time.Now().Add(5 * time.Second)
	for countFacts() > before && time.Now().Before(deadline) {
		runtime.GC()
		time.Sleep(10 * time.Millisecond)
	}
	if n := countFacts(); n > before {
		t.Errorf("%d entries of certificates gone, %d before", n, before)
	}
}
