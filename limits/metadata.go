package limits

import (
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Bounds on what a caller's metadata may make apid parse and forward: far
// below grpc-go's header list bound (past which the client sees only an
// Internal reset), so that the answer names the key.
const (
	MaxNodesBytes   = 64 << 10 // all node and nodes values together
	MaxForwardBytes = 8 << 10  // the values of one forwarded key
)

// MetadataSize is what routing measured of a call's metadata.
type MetadataSize struct {
	// Nodes is the bytes of every node and nodes value together.
	Nodes int
	// Forward is the largest forwarded key and its bytes.
	ForwardKey   string
	ForwardBytes int
}

// Metadata refuses calls whose routing or forwarded metadata is too large.
type Metadata struct{ refused atomic.Int64 }

// Refused counts the calls refused for their metadata's size.
func (m *Metadata) Refused() int64 { return m.refused.Load() }

func (m *Metadata) admit(s MetadataSize) error {
	if s.Nodes > MaxNodesBytes {
		m.refused.Add(1)
		return status.Errorf(codes.InvalidArgument, "node and nodes metadata hold %d bytes, more than %d: name at most maxNodes nodes (groups such as @controlplane count as one value)", s.Nodes, MaxNodesBytes)
	}
	if s.ForwardBytes > MaxForwardBytes {
		m.refused.Add(1)
		return status.Errorf(codes.InvalidArgument, "%s metadata holds %d bytes, more than the %d apid forwards", s.ForwardKey, s.ForwardBytes, MaxForwardBytes)
	}
	return nil
}
