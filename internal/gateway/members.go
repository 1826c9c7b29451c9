package gateway

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	cosiapi "github.com/cosi-project/runtime/api/v1alpha1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"gopkg.in/yaml.v3"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/director"
	"github.com/apid/apid/inventory"
)

// The cluster inventory source: the members a node knows (cluster.Member
// resources of Talos's resource API), watched as a reader through the local
// node agent or through the apid of the node the source names. Only the
// API's descriptors and the resources' YAML are used: the gateway links no
// resource runtime.

// Where Talos keeps its members.
const (
	memberNamespace = "cluster"
	memberType      = "Members.cluster.talos.dev"
)

// memberSpec is what the inventory needs of a member's spec, as its YAML
// says it.
type memberSpec struct {
	Hostname    string   `yaml:"hostname"`
	Addresses   []string `yaml:"addresses"`
	MachineType string   `yaml:"machineType"`
}

// watchMembers is the inventory's Members: through the local node at local,
// or, when the source names a node, through that node's apid from the
// pool (the forwarding identity, asserting the reader's role as Talos's
// apid does when it forwards).
func watchMembers(local grpc.ClientConnInterface, pool *director.Pool) inventory.Members {
	return func(ctx context.Context, src inventory.ClusterSource, set func([]inventory.Node)) error {
		conn := local
		if src.Through != "" {
			c, release, err := pool.Conn(src.Through)
			if err != nil {
				return fmt.Errorf("members through %s: %w", src.Through, err)
			}
			defer release()
			conn = c
		}
		// As Talos's apid calls machined: the roles the caller has, here
		// a reader's, which is all this needs.
		ctx = metadata.AppendToOutgoingContext(ctx, auth.KeyRole, "os:reader")
		stream, err := cosiapi.NewStateClient(conn).Watch(ctx, &cosiapi.WatchRequest{
			Namespace: memberNamespace, Type: memberType, ApiVersion: 1,
			Options: &cosiapi.WatchOptions{BootstrapContents: true},
		})
		if err != nil {
			return err
		}
		members := map[string]inventory.Node{}
		bootstrapped := false
		publish := func() {
			nodes := slices.Collect(maps.Values(members))
			slices.SortFunc(nodes, func(a, b inventory.Node) int { return strings.Compare(a.Name, b.Name) })
			set(nodes)
		}
		for {
			resp, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return errors.New("the node ended the members watch")
			}
			if err != nil {
				return fmt.Errorf("members watch: %w", err)
			}
			changed := false
			for _, ev := range resp.GetEvent() {
				switch ev.GetEventType() {
				case cosiapi.EventType_BOOTSTRAPPED:
					bootstrapped, changed = true, true
				case cosiapi.EventType_ERRORED:
					return fmt.Errorf("members watch: %s", ev.GetError())
				case cosiapi.EventType_DESTROYED:
					delete(members, ev.GetResource().GetMetadata().GetId())
					changed = true
				case cosiapi.EventType_CREATED, cosiapi.EventType_UPDATED:
					n, err := memberNode(ev.GetResource())
					if err != nil {
						return err
					}
					if _, known := members[ev.GetResource().GetMetadata().GetId()]; !known && len(members) >= inventory.MaxMembers {
						return fmt.Errorf("members watch: more than %d members; keeping the last ones", inventory.MaxMembers)
					}
					members[ev.GetResource().GetMetadata().GetId()] = n
					changed = true
				}
			}
			if bootstrapped && changed {
				publish()
			}
		}
	}
}

// memberNode makes an inventory node of a member: its hostname as the
// name (and the identity its certificate carries), its first address
// dialled, its machine type as the role.
func memberNode(r *cosiapi.Resource) (inventory.Node, error) {
	var spec memberSpec
	if err := yaml.Unmarshal([]byte(r.GetSpec().GetYamlSpec()), &spec); err != nil {
		return inventory.Node{}, fmt.Errorf("member %s: %w", r.GetMetadata().GetId(), err)
	}
	n := inventory.Node{Name: r.GetMetadata().GetId(), Role: "worker", Labels: map[string]string{"source": "cluster"}}
	if spec.Hostname != "" {
		n.Name = spec.Hostname
	}
	if len(spec.Addresses) > 0 {
		n.Address = spec.Addresses[0]
	}
	if spec.MachineType == "controlplane" || spec.MachineType == "init" {
		n.Role = "controlplane"
	}
	return n, nil
}
