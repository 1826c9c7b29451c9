package agent

import (
	"context"
	"slices"
	"strings"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/pki"
)

// GenerateClientConfiguration issues a client certificate with the roles
// asked for, signed by the configured client CA, and returns it with the
// CA and a talosconfig that reaches the cluster through the configured
// gateway endpoints. Who may call it is apid's policy (admin-only by
// default); the agent checks what is asked: known roles only (never
// os:impersonator, which is for apid nodes), and a validity that is
// positive and within MaxClientTTL.
func (s *Server) GenerateClientConfiguration(ctx context.Context, req *machine.GenerateClientConfigurationRequest) (_ *machine.GenerateClientConfigurationResponse, err error) {
	defer s.logCall(ctx, "GenerateClientConfiguration", time.Now(), &err)
	if len(s.cfg.ClientCA.Cert) == 0 {
		return nil, status.Error(codes.FailedPrecondition, "this agent holds no client CA: ask a control-plane node")
	}
	ttl := req.GetCrtTtl().AsDuration()
	switch {
	case ttl <= 0:
		return nil, status.Error(codes.InvalidArgument, "crt_ttl should be positive")
	case ttl > s.cfg.MaxClientTTL:
		return nil, status.Errorf(codes.InvalidArgument, "crt_ttl %s is longer than the %s this agent grants", ttl, s.cfg.MaxClientTTL)
	}
	roles, err := clientRoles(req.GetRoles())
	if err != nil {
		return nil, err
	}
	ca, err := pki.LoadCA(s.cfg.ClientCA.Cert, s.cfg.ClientCA.Key)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "client CA: %v", err)
	}
	crt, key, err := ca.IssueClient("generated-"+strings.Join(shortRoles(roles), "+"), roles, ttl, pki.KeyECDSA)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	name := s.cfg.ClusterName
	if short := shortRoles(roles); len(short) == 1 {
		name = short[0] + "@" + name
	}
	talosconfig, err := pki.MergeTalosconfig(nil, name, pki.TalosContext{Endpoints: s.cfg.Endpoints, CA: s.cfg.ClientCA.Cert, Crt: crt, Key: key})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "talosconfig: %v", err)
	}
	s.log.Info("client certificate issued", "roles", roles, "ttl", ttl.String(), "context", name)
	return &machine.GenerateClientConfigurationResponse{Messages: []*machine.GenerateClientConfiguration{{
		Ca: s.cfg.ClientCA.Cert, Crt: crt, Key: key, Talosconfig: talosconfig,
	}}}, nil
}

// clientRoles checks the roles asked for: at least one, each a built-in
// role, never os:impersonator; duplicates collapse.
func clientRoles(asked []string) ([]string, error) {
	var roles []string
	for _, r := range asked {
		r = strings.TrimSpace(r)
		switch {
		case r == certs.RoleImpersonator:
			return nil, status.Errorf(codes.InvalidArgument, "role %s is for apid nodes, not clients", r)
		case !slices.Contains(certs.BuiltinRoles, r):
			return nil, status.Errorf(codes.InvalidArgument, "unknown role %q: the roles are %s", r, strings.Join(slices.DeleteFunc(slices.Clone(certs.BuiltinRoles), func(s string) bool { return s == certs.RoleImpersonator }), ", "))
		case !slices.Contains(roles, r):
			roles = append(roles, r)
		}
	}
	if len(roles) == 0 {
		return nil, status.Error(codes.InvalidArgument, "no roles: ask for at least one, such as os:reader")
	}
	return roles, nil
}

// shortRoles are roles without their os: prefix.
func shortRoles(roles []string) []string {
	out := make([]string, len(roles))
	for i, r := range roles {
		out[i] = strings.TrimPrefix(r, "os:")
	}
	return out
}
