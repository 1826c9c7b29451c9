package clientconfig

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/demo/caller"
	"github.com/apid/apid/pki"
)

// Config describes what an Issuer issues.
type Config struct {
	// CA holds the PEM certificate and private key of the CA that signs
	// client certificates. With it, GenerateClientConfiguration issues new
	// clients (as a Talos control-plane node does); without it the method
	// fails with FailedPrecondition (as on a Talos worker).
	CA struct{ Cert, Key []byte }
	// Endpoints are the gateway addresses written into the talosconfigs.
	Endpoints []string
	// MaxTTL, if positive, bounds the validity granted; it is always
	// bounded by the client CA's own (Talos sets no other bound).
	MaxTTL time.Duration
	// ClusterName names the talosconfigs' contexts (admin@NAME).
	ClusterName string
	// Log is the node's log, which records each client issued.
	Log *slog.Logger
}

// Issuer serves GenerateClientConfiguration.
type Issuer struct {
	cfg Config
}

// New returns an issuer as cfg describes.
func New(cfg Config) *Issuer {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Issuer{cfg: cfg}
}

// GenerateClientConfiguration issues a client certificate with the roles
// asked for, signed by the configured client CA, and returns it with the
// CA and a talosconfig that reaches the cluster through the configured
// gateway endpoints. Who may call it is apid's policy (admin-only by
// default); the agent checks what is asked: known roles only (never
// os:impersonator, which is for apid nodes), roles the caller holds itself
// unless it is os:admin (so a policy that lets operators call this cannot
// make admins), and a validity that is positive, within the client CA's
// and, if set, within Config.MaxTTL.
// The caller's roles are those apid forwards (talos-role): the agent
// trusts its socket's peer as machined trusts apid's, which is why the
// command line serves a client CA only on a unix socket.
func (i *Issuer) GenerateClientConfiguration(ctx context.Context, req *machine.GenerateClientConfigurationRequest) (_ *machine.GenerateClientConfigurationResponse, err error) {
	if len(i.cfg.CA.Cert) == 0 {
		return nil, status.Error(codes.FailedPrecondition, "this agent holds no client CA: ask a control-plane node")
	}
	ttl := req.GetCrtTtl().AsDuration()
	if ttl <= 0 {
		return nil, status.Error(codes.InvalidArgument, "crt_ttl should be positive")
	}
	ca, err := pki.LoadCA(i.cfg.CA.Cert, i.cfg.CA.Key)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "client CA: %v", err)
	}
	// Talos grants any positive validity; a certificate cannot outlive
	// its issuer, and an operator may bound it further.
	if left := time.Until(ca.Cert.NotAfter).Truncate(time.Hour); ttl > left {
		return nil, status.Errorf(codes.InvalidArgument, "crt_ttl %s is longer than the client CA's remaining validity (%s, until %s)", ttl, left, ca.Cert.NotAfter.UTC().Format(time.DateOnly))
	}
	if i.cfg.MaxTTL > 0 && ttl > i.cfg.MaxTTL {
		return nil, status.Errorf(codes.InvalidArgument, "crt_ttl %s is longer than the %s this agent grants (-max-client-ttl)", ttl, i.cfg.MaxTTL)
	}
	roles, err := clientRoles(req.GetRoles())
	if err != nil {
		return nil, err
	}
	if err := mayIssue(ctx, roles); err != nil {
		return nil, err
	}
	// Limits, the audit log and revocation lists tell clients apart by
	// their subject: each issued client gets its own.
	var id [6]byte
	_, _ = rand.Read(id[:])
	crt, key, err := ca.IssueClient(fmt.Sprintf("generated-%s-%x", strings.Join(shortRoles(roles), "+"), id), roles, ttl, pki.KeyECDSA)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	name := i.cfg.ClusterName
	if short := shortRoles(roles); len(short) == 1 {
		name = short[0] + "@" + name
	}
	talosconfig, err := pki.MergeTalosconfig(nil, name, pki.TalosContext{Endpoints: i.cfg.Endpoints, CA: i.cfg.CA.Cert, Crt: crt, Key: key})
	if err != nil {
		return nil, status.Errorf(codes.Internal, "talosconfig: %v", err)
	}
	i.cfg.Log.Info("client certificate issued", "roles", roles, "ttl", ttl.String(), "context", name)
	return &machine.GenerateClientConfigurationResponse{Messages: []*machine.GenerateClientConfiguration{{
		Ca: i.cfg.CA.Cert, Crt: crt, Key: key, Talosconfig: talosconfig,
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

// mayIssue refuses roles the caller (as apid forwarded it) does not hold,
// unless it holds os:admin.
func mayIssue(ctx context.Context, roles []string) error {
	held := caller.Roles(ctx)
	if slices.Contains(held, certs.RoleAdmin) {
		return nil
	}
	have := "no roles"
	if len(held) > 0 {
		have = strings.Join(held, ", ")
	}
	for _, r := range roles {
		if !slices.Contains(held, r) {
			return status.Errorf(codes.PermissionDenied, "issuing a client with role %s needs that role or %s; the caller has %s",
				r, certs.RoleAdmin, have)
		}
	}
	return nil
}

// shortRoles are roles without their os: prefix.
func shortRoles(roles []string) []string {
	out := make([]string, len(roles))
	for i, r := range roles {
		out[i] = strings.TrimPrefix(r, "os:")
	}
	return out
}
