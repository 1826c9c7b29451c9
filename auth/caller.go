package auth

import (
	"context"
	"crypto/x509"
	"runtime"
	"slices"
	"sync"
	"weak"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/certs"
)

// Metadata keys through which one apid speaks for its caller to the next.
const (
	// KeyRole carries the original caller's roles, one value each.
	KeyRole = "talos-role"
	// KeyProxyFrom marks a call forwarded by another apid (its value is
	// the :authority the caller used there); such a call is served by the
	// node that receives it.
	KeyProxyFrom = "proxyfrom"
)

// Caller is who a call comes from.
type Caller struct {
	// Roles are the roles the call runs with: the certificate's, or those
	// an impersonating apid forwarded. Once authorized, only the roles the
	// policy knows.
	Roles []string
	// Unknown are role strings the caller presented that the policy does
	// not know (kept for logs; they grant nothing). Set once authorized.
	Unknown []string
	// Forwarded is true when another apid forwarded the call; it is then
	// served locally.
	Forwarded bool
	// Subject names the peer certificate, for logs.
	Subject string
	// CommonName is the certificate subject's common name, for logs.
	CommonName string
}

// Identify reads the caller from the peer certificate. Forwarded roles and
// proxyfrom count only from a peer whose certificate holds os:impersonator;
// from anyone else they are ignored.
func Identify(ctx context.Context) (Caller, error) {
	cert, ok := certs.PeerCertificate(ctx)
	if !ok {
		return Caller{}, status.Error(codes.Unauthenticated, "no verified client certificate")
	}
	f := factsOf(cert)
	c := Caller{Roles: f.roles, Subject: f.subject, CommonName: cert.Subject.CommonName}
	if !slices.Contains(c.Roles, certs.RoleImpersonator) {
		return c, nil
	}
	md, _ := metadata.FromIncomingContext(ctx)
	roles, hasRoles := md[KeyRole]
	c.Forwarded = len(md[KeyProxyFrom]) > 0
	if hasRoles || c.Forwarded {
		// An impersonating peer speaks for its caller: the caller's roles,
		// and none of its own, even when the caller had none.
		c.Roles = slices.Clone(roles)
	}
	return c, nil
}

// certFacts caches what Identify reads of each peer certificate: a
// connection's calls all present the same one, and formatting its subject
// cost more than the rest of identifying a call. An entry goes when its
// certificate does (the connection closed).
var certFacts sync.Map // weak.Pointer[x509.Certificate] -> *certFact

type certFact struct {
	subject string
	roles   []string // clipped: an append never writes into it
}

func factsOf(cert *x509.Certificate) *certFact {
	key := weak.Make(cert)
	if f, ok := certFacts.Load(key); ok {
		return f.(*certFact)
	}
	f := &certFact{subject: cert.Subject.String(), roles: slices.Clip(certs.Roles(cert))}
	if _, loaded := certFacts.LoadOrStore(key, f); !loaded {
		runtime.AddCleanup(cert, func(k weak.Pointer[x509.Certificate]) { certFacts.Delete(k) }, key)
	}
	return f
}

type (
	identityKey   struct{}
	authorizedKey struct{}
)

// IdentityFrom returns the caller the Identity interceptor found, whether
// or not the call was authorized (for logs of every call).
func IdentityFrom(ctx context.Context) (Caller, bool) {
	if c, ok := ctx.Value(authorizedKey{}).(Caller); ok {
		return c, true
	}
	c, ok := ctx.Value(identityKey{}).(Caller)
	return c, ok
}

// CallerFrom returns the caller of a call that was authorized; ok is false
// for a call that was not.
func CallerFrom(ctx context.Context) (c Caller, ok bool) {
	c, ok = ctx.Value(authorizedKey{}).(Caller)
	return c, ok
}

// NewContext returns ctx carrying c as the authorized caller. Servers get
// it from Authorizer; tests of what runs after authorization use it
// directly.
func NewContext(ctx context.Context, c Caller) context.Context {
	return context.WithValue(ctx, authorizedKey{}, c)
}
