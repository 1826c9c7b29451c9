package agent

import (
	"context"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
)

// Containers reports the containers the agent runs: none, whatever the
// namespace asked for. It manages no container runtime, and an empty list
// is the truth (talosctl containers prints its header only).
func (s *Server) Containers(ctx context.Context, _ *machine.ContainersRequest) (_ *machine.ContainersResponse, err error) {
	return &machine.ContainersResponse{Messages: []*machine.Container{{}}}, nil
}

// Stats reports the resource use of the agent's containers: there are
// none (talosctl stats prints its header only).
func (s *Server) Stats(ctx context.Context, _ *machine.StatsRequest) (_ *machine.StatsResponse, err error) {
	return &machine.StatsResponse{Messages: []*machine.Stats{{}}}, nil
}
