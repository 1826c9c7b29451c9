package gateway

import (
	"context"

	"google.golang.org/grpc"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/limits"
)

// methodIssueClient issues a client certificate (talosctl config new).
const methodIssueClient = "/machine.MachineService/GenerateClientConfiguration"

// callers asks the limits section on behalf of the caller in a call's
// context: what a call, and the cluster health check, may start.
type callers struct{ l *limits.Limits }

// admitCall admits a call of the caller in ctx. A call another apid
// forwarded was counted against its caller there; counting it here
// against the node certificate would make every client's calls through
// that apid share one budget.
func (c callers) admitCall(ctx context.Context, issues bool) (release func(), err error) {
	id, ok := auth.IdentityFrom(ctx)
	if !ok || id.Forwarded {
		return func() {}, nil
	}
	return c.l.AdmitCall(limits.Call{Identity: id.Subject, IssuesCertificate: issues})
}

// AdmitCall implements clusterhealth.Admission: a check's calls to nodes
// are its caller's calls.
func (c callers) AdmitCall(ctx context.Context) (func(), error) { return c.admitCall(ctx, false) }

// AdmitCheck implements clusterhealth.Admission.
func (c callers) AdmitCheck(ctx context.Context, maxRunning, perIdentity int) (func(), error) {
	id, _ := auth.IdentityFrom(ctx)
	return c.l.AdmitCheck(id.Subject, maxRunning, perIdentity)
}

// admit applies the caller's call limits (calls in flight, calls a
// second, certificates issued an hour) before any node is contacted.
func (g *Gateway) admit(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	release, err := callers{g.limits}.admitCall(ss.Context(), info.FullMethod == methodIssueClient)
	if err != nil {
		return err
	}
	defer release()
	return handler(srv, ss)
}

// admitUnary applies the same call limits to the unary methods apid serves
// itself (gRPC health): a probe is a call like any other, or an identity
// could call them without bound.
func (g *Gateway) admitUnary(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if c, err := auth.Identify(ctx); err == nil && !c.Forwarded {
		release, err := g.limits.AdmitCall(limits.Call{Identity: c.Subject})
		if err != nil {
			return nil, err
		}
		defer release()
	}
	return handler(ctx, req)
}
