package agent

import (
	"context"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// What the example agent does not simulate answers saying why, rather
// than with gRPC's bare "method X not implemented": FailedPrecondition
// where a Talos node in the same state would refuse too, Unimplemented
// where the demo node lacks the machinery.

// Bootstrap refuses as Talos refuses a bootstrapped member: the demo's
// control plane runs its etcd cluster from the start.
func (s *Server) Bootstrap(context.Context, *machine.BootstrapRequest) (*machine.BootstrapResponse, error) {
	if s.cfg.Etcd == nil {
		return nil, status.Error(codes.Unimplemented, "bootstrap is only available on control plane nodes")
	}
	return nil, status.Error(codes.FailedPrecondition, "etcd is already bootstrapped: the demo's control plane runs one etcd cluster from the start")
}

// Kubeconfig: there is no Kubernetes in the demo.
func (s *Server) Kubeconfig(*emptypb.Empty, grpc.ServerStreamingServer[common.Data]) error {
	return status.Error(codes.Unimplemented, "the example agent runs no Kubernetes: there is no kubeconfig to give")
}

// LogsContainers lists the containers whose logs Logs serves: none.
func (s *Server) LogsContainers(context.Context, *emptypb.Empty) (*machine.LogsContainersResponse, error) {
	return &machine.LogsContainersResponse{Messages: []*machine.LogsContainer{{}}}, nil
}

// Restart restarts a container: the agent runs none (service restart
// restarts a simulated service).
func (s *Server) Restart(context.Context, *machine.RestartRequest) (*machine.RestartResponse, error) {
	return nil, status.Error(codes.Unimplemented, "the example agent runs no containers to restart: talosctl service ID restart restarts a simulated service")
}

// Rollback: nothing was installed, so there is nothing to roll back to.
func (s *Server) Rollback(context.Context, *machine.RollbackRequest) (*machine.RollbackResponse, error) {
	return nil, status.Error(codes.FailedPrecondition, "the simulated machine has no previous installation to roll back to")
}

// Reset would wipe the machine: not simulated.
func (s *Server) Reset(context.Context, *machine.ResetRequest) (*machine.ResetResponse, error) {
	return nil, status.Error(codes.Unimplemented, "the example agent does not simulate a reset: it would wipe the machine it runs on")
}

// PacketCapture is not simulated.
func (s *Server) PacketCapture(*machine.PacketCaptureRequest, grpc.ServerStreamingServer[common.Data]) error {
	return status.Error(codes.Unimplemented, "the example agent does not capture packets")
}

// MetaWrite and MetaDelete: the simulated machine has no META partition.
func (s *Server) MetaWrite(context.Context, *machine.MetaWriteRequest) (*machine.MetaWriteResponse, error) {
	return nil, status.Error(codes.Unimplemented, "the simulated machine has no META partition")
}

func (s *Server) MetaDelete(context.Context, *machine.MetaDeleteRequest) (*machine.MetaDeleteResponse, error) {
	return nil, status.Error(codes.Unimplemented, "the simulated machine has no META partition")
}

// The etcd downgrade calls are not simulated.
func (s *Server) EtcdDowngradeValidate(context.Context, *machine.EtcdDowngradeValidateRequest) (*machine.EtcdDowngradeValidateResponse, error) {
	return nil, errNoDowngrade
}

func (s *Server) EtcdDowngradeEnable(context.Context, *machine.EtcdDowngradeEnableRequest) (*machine.EtcdDowngradeEnableResponse, error) {
	return nil, errNoDowngrade
}

func (s *Server) EtcdDowngradeCancel(context.Context, *emptypb.Empty) (*machine.EtcdDowngradeCancelResponse, error) {
	return nil, errNoDowngrade
}

var errNoDowngrade = status.Error(codes.Unimplemented, "the example agent does not downgrade its etcd cluster")
