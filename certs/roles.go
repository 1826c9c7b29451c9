package certs

import (
	"context"
	"crypto/x509"
	"slices"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Role names carried in a certificate's Subject Organization. The package
// only names them; what each one grants is the authorizer's decision.
const (
	// RoleAdmin may call everything.
	RoleAdmin = "os:admin"
	// RoleOperator may read and run operations that expose no secrets.
	RoleOperator = "os:operator"
	// RoleReader may read everything except secrets.
	RoleReader = "os:reader"
	// RoleEtcdBackup may take etcd snapshots.
	RoleEtcdBackup = "os:etcd:backup"
	// RoleImageVerifier may verify container images.
	RoleImageVerifier = "os:image:verifier"
	// RoleMetaWriter may write META keys.
	RoleMetaWriter = "os:meta:writer"
	// RoleImpersonator may assert another caller's roles; apid instances
	// carry it so that they can forward requests on a caller's behalf.
	RoleImpersonator = "os:impersonator"
)

// BuiltinRoles are the roles of the Talos API, known to every policy.
var BuiltinRoles = []string{RoleAdmin, RoleOperator, RoleReader, RoleEtcdBackup, RoleImageVerifier, RoleMetaWriter, RoleImpersonator}

// Roles returns the roles a certificate carries: its Subject Organization
// values in order, without duplicates and without empty strings. Unknown
// values are kept. It returns nil for a nil certificate or one without
// roles.
func Roles(cert *x509.Certificate) []string {
	if cert == nil {
		return nil
	}

	var roles []string

	for _, o := range cert.Subject.Organization {
		if o == "" || slices.Contains(roles, o) {
			continue
		}

		roles = append(roles, o)
	}

	return roles
}

// PeerCertificate returns the leaf certificate of the gRPC peer in ctx, but
// only when the TLS handshake verified it against a trusted chain. It reports
// false for a context without a peer, a peer not on TLS, or a peer whose
// certificate was not verified.
func PeerCertificate(ctx context.Context) (*x509.Certificate, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return nil, false
	}

	var info credentials.TLSInfo

	switch ai := p.AuthInfo.(type) {
	case credentials.TLSInfo:
		info = ai
	case *credentials.TLSInfo:
		if ai == nil {
			return nil, false
		}

		info = *ai
	default:
		return nil, false
	}

	chains := info.State.VerifiedChains
	if len(chains) == 0 || len(chains[0]) == 0 {
		return nil, false
	}

	return chains[0][0], true
}
