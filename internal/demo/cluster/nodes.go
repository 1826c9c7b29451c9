package cluster

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"time"

	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/encoder"
	"github.com/siderolabs/talos/pkg/machinery/config/generate"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/constants"

	"github.com/apid/apid/internal/demo/etcd"
	"github.com/apid/apid/inventory"
)

// inventoryOf lists the demo's nodes by name for every apid: the first
// three are the control plane, the others workers, and they alternate
// between two zones so that label selectors have something to select.
func inventoryOf(nodes []demoNode) []inventory.Node {
	out := make([]inventory.Node, len(nodes))
	for i, n := range nodes {
		role := inventory.RoleWorker
		if n.controlPlane {
			role = inventory.RoleControlPlane
		}
		out[i] = inventory.Node{Name: n.name, Address: n.ip, Role: role,
			Labels: map[string]string{"zone": fmt.Sprintf("zone-%c", 'a'+i%2)}}
	}
	return out
}

// machineConfigs generates the control-plane and worker machine
// configurations of the demo cluster, sharing one set of secrets, with the
// first node's address as the Kubernetes endpoint (there is no Kubernetes:
// the documents are what a user would apply, and what get machineconfig
// shows).
func machineConfigs(nodes []demoNode) (controlPlane, worker []byte, err error) {
	bundle, err := secrets.NewBundle(secrets.NewClock(), talosconfig.TalosVersionCurrent)
	if err != nil {
		return nil, nil, err
	}
	in, err := generate.NewInput("apid-demo", "https://"+net.JoinHostPort(nodes[0].ip, "6443"), constants.DefaultKubernetesVersion,
		generate.WithSecretsBundle(bundle), generate.WithVersionContract(talosconfig.TalosVersionCurrent))
	if err != nil {
		return nil, nil, err
	}
	encode := func(t machine.Type) ([]byte, error) {
		cfg, err := in.Config(t)
		if err != nil {
			return nil, err
		}
		return cfg.EncodeBytes(encoder.WithComments(encoder.CommentsDisabled))
	}
	if controlPlane, err = encode(machine.TypeControlPlane); err != nil {
		return nil, nil, err
	}
	worker, err = encode(machine.TypeWorker)
	return controlPlane, worker, err
}

// Where a demo node's etcd member listens, on its address: Talos's ports.
const (
	etcdClientPort = "2379"
	etcdPeerPort   = "2380"
)

// startEtcd starts one etcd cluster across the control-plane nodes, each
// member on its node's address with its data under the demo's directory,
// and waits until they serve. Each run starts a new cluster (a member that
// left the last one would not be let back in).
func startEtcd(ctx context.Context, o Options, nodes []demoNode) (map[string]*etcd.Member, error) {
	if err := os.RemoveAll(filepath.Join(o.Dir, "etcd")); err != nil {
		return nil, err
	}
	var initial []string
	for _, n := range nodes {
		if n.controlPlane {
			initial = append(initial, n.name+"=http://"+net.JoinHostPort(n.ip, etcdPeerPort))
		}
	}
	etcds := map[string]*etcd.Member{}
	stopAll := func() {
		for _, e := range etcds {
			e.Stop()
		}
	}
	for _, n := range nodes {
		if !n.controlPlane {
			continue
		}
		e, err := etcd.Start(etcd.MemberConfig{
			Name: n.name, DataDir: filepath.Join(o.Dir, "etcd", n.name),
			ClientURL: "http://" + net.JoinHostPort(n.ip, etcdClientPort), PeerURL: "http://" + net.JoinHostPort(n.ip, etcdPeerPort),
			InitialCluster: strings.Join(initial, ","),
		})
		if err != nil {
			stopAll()
			return nil, fmt.Errorf("%s: %w", n.name, err)
		}
		etcds[n.name] = e
	}
	ready, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for _, e := range etcds {
		if err := e.Ready(ready); err != nil {
			stopAll()
			return nil, err
		}
	}
	return etcds, nil
}
