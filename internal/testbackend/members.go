package testbackend

import (
	"context"
	"net/netip"

	cosiapi "github.com/cosi-project/runtime/api/v1alpha1"
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/cosi-project/runtime/pkg/state/impl/inmem"
	"github.com/cosi-project/runtime/pkg/state/impl/namespaced"
	cosiserver "github.com/cosi-project/runtime/pkg/state/protobuf/server"
	configmachine "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/resources/cluster"
	"google.golang.org/grpc"
)

// Member is a node of the cluster as the resource API's cluster members
// show it (talosctl get members).
type Member struct {
	Hostname     string
	Addresses    []string
	ControlPlane bool
}

// members is the backend's resource API: an in-memory COSI state that
// holds the cluster's members, served as cosi.resource.State.
type members struct {
	st state.State
}

func newMembers() *members {
	return &members{st: state.WrapCore(namespaced.NewState(inmem.Build))}
}

func (m *members) register(g *grpc.Server) {
	cosiapi.RegisterStateServer(g, cosiserver.NewState(m.st))
}

// SetMembers makes the cluster's members those of ms: new ones created,
// changed ones updated, gone ones destroyed, so that a watch sees members
// join and leave as a Talos node's discovery sees them.
func (s *Server) SetMembers(ms []Member) error {
	ctx := context.Background()
	keep := map[resource.ID]bool{}
	for _, m := range ms {
		keep[m.Hostname] = true
		if err := safe.StateModify(ctx, s.members.st, cluster.NewMember(cluster.NamespaceName, m.Hostname), func(res *cluster.Member) error {
			spec := res.TypedSpec()
			spec.NodeID, spec.Hostname = m.Hostname, m.Hostname
			spec.MachineType = configmachine.TypeWorker
			if m.ControlPlane {
				spec.MachineType = configmachine.TypeControlPlane
			}
			spec.Addresses = nil
			for _, a := range m.Addresses {
				if ip, err := netip.ParseAddr(a); err == nil {
					spec.Addresses = append(spec.Addresses, ip)
				}
			}
			return nil
		}); err != nil {
			return err
		}
	}
	current, err := safe.StateListAll[*cluster.Member](ctx, s.members.st)
	if err != nil {
		return err
	}
	for m := range current.All() {
		if !keep[m.Metadata().ID()] {
			if err := s.members.st.Destroy(ctx, m.Metadata()); err != nil {
				return err
			}
		}
	}
	return nil
}
