package containers

import (
	"context"
	"log/slog"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Runtime is the node's container runtime, which runs no containers: it
// serves Containers, Stats, LogsContainers and Restart, the legacy
// ImageList and ImagePull, and, through ImageService and InstallService,
// machine.ImageService and machine.LifecycleService, on simulated images.
type Runtime struct {
	log    *slog.Logger
	images imageStore
}

// New returns a runtime with no images, which logs to log.
func New(log *slog.Logger) *Runtime {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Runtime{log: log}
}

// ImageService serves machine.ImageService on the runtime's images.
func (r *Runtime) ImageService() machine.ImageServiceServer { return imageServer{r: r} }

// InstallService serves machine.LifecycleService: the simulated install of
// a pulled image.
func (r *Runtime) InstallService() machine.LifecycleServiceServer { return lifecycleServer{r: r} }

// Containers reports the containers the node runs: none, whatever the
// namespace asked for. It manages no container runtime, and an empty list
// is the truth (talosctl containers prints its header only).
func (*Runtime) Containers(ctx context.Context, _ *machine.ContainersRequest) (_ *machine.ContainersResponse, err error) {
	return &machine.ContainersResponse{Messages: []*machine.Container{{}}}, nil
}

// Stats reports the resource use of the node's containers: there are
// none (talosctl stats prints its header only).
func (*Runtime) Stats(ctx context.Context, _ *machine.StatsRequest) (_ *machine.StatsResponse, err error) {
	return &machine.StatsResponse{Messages: []*machine.Stats{{}}}, nil
}

// LogsContainers lists the containers whose logs Logs serves: none.
func (*Runtime) LogsContainers(context.Context, *emptypb.Empty) (*machine.LogsContainersResponse, error) {
	return &machine.LogsContainersResponse{Messages: []*machine.LogsContainer{{}}}, nil
}

// Restart restarts a container: the node runs none (service restart
// restarts a simulated service).
func (*Runtime) Restart(context.Context, *machine.RestartRequest) (*machine.RestartResponse, error) {
	return nil, status.Error(codes.Unimplemented, "the example agent runs no containers to restart: talosctl service ID restart restarts a simulated service")
}
