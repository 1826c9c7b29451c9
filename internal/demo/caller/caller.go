package caller

import (
	"context"

	"google.golang.org/grpc/metadata"
)

// RoleKey is the metadata key through which apid forwards the caller's
// roles (auth.KeyRole on the gateway's side).
const RoleKey = "talos-role"

// Admin is the role that may do everything.
const Admin = "os:admin"

// Roles returns the roles apid forwarded with the call of ctx; none when
// the call comes from the socket's peer itself.
func Roles(ctx context.Context) []string {
	return metadata.ValueFromIncomingContext(ctx, RoleKey)
}
