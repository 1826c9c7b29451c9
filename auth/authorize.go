package auth

import (
	"context"
	"log/slog"
	"strings"
	"sync/atomic"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Authorizer checks every call against a role policy.
type Authorizer struct {
	policy atomic.Pointer[Policy]
	log    *slog.Logger
}

// HealthMethods are the methods of the standard gRPC health service apid
// serves itself, which every authenticated caller may call whatever its
// roles: a probe needs a certificate, not a role. Only these exact names:
// any other method under the service reaches the proxy, and the policy.
var HealthMethods = map[string]bool{
	"/grpc.health.v1.Health/Check": true,
	"/grpc.health.v1.Health/Watch": true,
	"/grpc.health.v1.Health/List":  true,
}

// NewAuthorizer returns an Authorizer of policy; denied calls are logged
// to log (nil: discarded).
func NewAuthorizer(policy *Policy, log *slog.Logger) *Authorizer {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	a := &Authorizer{log: log}
	a.policy.Store(policy)
	return a
}

// Policy returns the policy the Authorizer enforces now.
func (a *Authorizer) Policy() *Policy { return a.policy.Load() }

// SetPolicy makes calls that start from now on checked against policy.
func (a *Authorizer) SetPolicy(policy *Policy) { a.policy.Store(policy) }

// NotAuthorized begins every refusal, as machined words it.
const NotAuthorized = "not authorized"

// Authorize refuses a non-canonical method path before anything else (so
// no path trick can slip past the policy), identifies the caller (unless
// the Identity interceptor already did), and checks the policy. It returns
// ctx carrying the authorized caller, whose Roles are those the policy
// knows.
func (a *Authorizer) Authorize(ctx context.Context, fullMethod string) (context.Context, error) {
	if !ValidMethod(fullMethod) {
		return ctx, status.Errorf(codes.InvalidArgument, "malformed method path %.64q", fullMethod)
	}
	c, ok := ctx.Value(identityKey{}).(Caller)
	if !ok {
		var err error
		if c, err = Identify(ctx); err != nil {
			return ctx, err
		}
	}
	policy := a.policy.Load()
	c.Roles, c.Unknown = policy.Known(c.Roles)
	if len(c.Unknown) > 0 {
		a.log.Debug("ignoring unknown roles", "peer", c.Subject, "roles", c.Unknown)
	}
	if !HealthMethods[fullMethod] && !policy.Permits(fullMethod, c.Roles) {
		a.log.Info("permission denied", "method", fullMethod, "peer", c.Subject, "roles", c.Roles, "unknown_roles", c.Unknown)
		// Talos's words first (clients and Talos's own tests match them),
		// then what would have been needed.
		return ctx, status.Errorf(codes.PermissionDenied, "%s: %s needs one of the roles %s; the caller has %s",
			NotAuthorized, fullMethod, strings.Join(policy.Allowed(fullMethod), ", "), describeRoles(c.Roles))
	}
	return NewContext(ctx, c), nil
}

func describeRoles(roles []string) string {
	if len(roles) == 0 {
		return "none"
	}
	return strings.Join(roles, ", ")
}

// StreamInterceptor authorizes every call (the proxy serves all of them as
// streams) and hands the handler a stream whose context carries the caller.
func (a *Authorizer) StreamInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		ctx, err := a.Authorize(ss.Context(), info.FullMethod)
		if err != nil {
			return err
		}
		return handler(srv, &contextStream{ServerStream: ss, ctx: ctx})
	}
}

// UnaryInterceptor authorizes calls to the services apid serves itself
// (health), whose unary methods bypass the stream interceptors.
func (a *Authorizer) UnaryInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		ctx, err := a.Authorize(ctx, info.FullMethod)
		if err != nil {
			return nil, err
		}
		return handler(ctx, req)
	}
}

// IdentityInterceptor identifies the caller of every call and puts it in
// the context, so that what runs between it and the Authorizer (call logs,
// metrics) can name the caller even of a call that is then refused. A call
// without a verified certificate passes on unidentified: the Authorizer
// refuses it.
func IdentityInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		return handler(srv, Identified(ss))
	}
}

// Identified returns ss with its caller identified in its context, as
// IdentityInterceptor does, for an interceptor that names the caller of
// every call (call logs, metrics); a call without a verified certificate
// is returned as it is, and the Authorizer refuses it.
func Identified(ss grpc.ServerStream) grpc.ServerStream {
	c, err := Identify(ss.Context())
	if err != nil {
		return ss
	}
	return &contextStream{ServerStream: ss, ctx: context.WithValue(ss.Context(), identityKey{}, c)}
}

// contextStream is a server stream with a context of its own.
type contextStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *contextStream) Context() context.Context { return s.ctx }
