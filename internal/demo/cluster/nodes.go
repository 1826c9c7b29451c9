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
	"github.com/apid/apid/pki"
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
	files, err := writeEtcdPKI(o, nodes)
	if err != nil {
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
			ClientURL: etcdClientURL(n), PeerURL: "http://" + net.JoinHostPort(n.ip, etcdPeerPort),
			InitialCluster: strings.Join(initial, ","), TLS: files[n.name],
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

// etcdClientURL is where node n's etcd member serves clients: with TLS and
// client certificates, as Talos's does.
func etcdClientURL(n demoNode) string { return "https://" + net.JoinHostPort(n.ip, etcdClientPort) }

// etcdEndpoints are the client URLs of every member.
func etcdEndpoints(nodes []demoNode) []string {
	var out []string
	for _, n := range nodes {
		if n.controlPlane {
			out = append(out, etcdClientURL(n))
		}
	}
	return out
}

// The demo's etcd key material, under DIR/etcd-pki: a CA of its own, apart
// from the API's (as Talos keeps etcd's), each member's serving pair, the
// client pair the nodes' etcd API presents, and apid's, whose key is a
// file of its own: an etcd client certificate reads everything etcd holds.
const (
	etcdPKIDir    = "etcd-pki"
	apidEtcdName  = "apid-etcd"
	etcdCAName    = "ca"
	etcdAgentName = "agent"
)

// writeEtcdPKI issues the etcd key material anew (etcd itself starts anew
// each run) and returns each member's files.
func writeEtcdPKI(o Options, nodes []demoNode) (map[string]*etcd.TLSFiles, error) {
	path := filepath.Join(o.Dir, etcdPKIDir)
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, err
	}
	dir := pki.Dir{Path: path, Force: true}
	ca, err := pki.NewCA("apid-demo etcd", 365*24*time.Hour, pki.KeyECDSA)
	if err != nil {
		return nil, err
	}
	caFile, _, err := dir.WritePair(etcdCAName, ca.CertPEM, ca.KeyPEM)
	if err != nil {
		return nil, err
	}
	issue := func(name string, roles []string) (string, string, error) {
		crt, key, err := ca.IssueClient(name, roles, 365*24*time.Hour, pki.KeyECDSA)
		if err != nil {
			return "", "", err
		}
		return dir.WritePair(name, crt, key)
	}
	agentCrt, agentKey, err := issue(etcdAgentName, []string{"etcd-client"})
	if err != nil {
		return nil, err
	}
	if _, _, err := issue(apidEtcdName, []string{"etcd-client"}); err != nil {
		return nil, err
	}
	out := map[string]*etcd.TLSFiles{}
	for _, n := range nodes {
		if !n.controlPlane {
			continue
		}
		crt, key, err := ca.IssueNode(n.name, []string{n.name, "localhost"}, []net.IP{net.ParseIP(n.ip)}, 365*24*time.Hour, pki.KeyECDSA)
		if err != nil {
			return nil, err
		}
		crtFile, keyFile, err := dir.WritePair("member-"+n.name, crt, key)
		if err != nil {
			return nil, err
		}
		out[n.name] = &etcd.TLSFiles{CA: caFile, Cert: crtFile, Key: keyFile, ClientCert: agentCrt, ClientKey: agentKey}
	}
	return out, nil
}

// apidEtcdFiles are the files of apid's etcd client identity.
func apidEtcdFiles(o Options) (ca, cert, key string) {
	path := filepath.Join(o.Dir, etcdPKIDir)
	return filepath.Join(path, etcdCAName+".crt"), filepath.Join(path, apidEtcdName+".crt"), filepath.Join(path, apidEtcdName+".key")
}
