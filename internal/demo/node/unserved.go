package node

import (
	"context"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// What the demo node does not simulate answers saying why, rather than
// with gRPC's bare "method X not implemented": FailedPrecondition where a
// Talos node in the same state would refuse too, Unimplemented where the
// demo node lacks the machinery. Most parts answer for their own (Reset,
// Restart, Bootstrap, the etcd downgrades); unserved answers for what no
// part has: Kubernetes, packet capture, a META partition.
type unserved struct{}

// Kubeconfig: there is no Kubernetes in the demo.
func (unserved) Kubeconfig(*emptypb.Empty, grpc.ServerStreamingServer[common.Data]) error {
	return status.Error(codes.Unimplemented, "the example agent runs no Kubernetes: there is no kubeconfig to give")
}

// PacketCapture is not simulated.
func (unserved) PacketCapture(*machine.PacketCaptureRequest, grpc.ServerStreamingServer[common.Data]) error {
	return status.Error(codes.Unimplemented, "the example agent does not capture packets")
}

// MetaWrite and MetaDelete: the simulated machine has no META partition.
func (unserved) MetaWrite(context.Context, *machine.MetaWriteRequest) (*machine.MetaWriteResponse, error) {
	return nil, status.Error(codes.Unimplemented, "the simulated machine has no META partition")
}

func (unserved) MetaDelete(context.Context, *machine.MetaDeleteRequest) (*machine.MetaDeleteResponse, error) {
	return nil, status.Error(codes.Unimplemented, "the simulated machine has no META partition")
}
