//go:build !nodemo

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/encoder"
	"github.com/siderolabs/talos/pkg/machinery/config/generate"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	"github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"golang.org/x/sync/errgroup"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/demo/etcd"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/resources"
	"github.com/apid/apid/internal/gateway"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/pki"
)

// demoOptions are the flags of `apid demo`.
type demoOptions struct {
	dir      string
	nodes    int
	port     int
	firstIP  netip.Addr
	logLevel string
	logFmt   string
}

// demoNode is one node of the demo cluster: a demo node on a unix
// socket and an apid on its own loopback address.
type demoNode struct {
	name         string
	controlPlane bool // nodes 1 to 3
	ip           string
	sock         string
	cert         string
	key          string
	clientCert   string // the forwarding identity
	clientKey    string
}

func parseDemoFlags(args []string, stderr io.Writer) (demoOptions, error) {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o demoOptions
	first := fs.String("first-ip", "127.0.0.11", "loopback `address` of node 1; node i gets the i-th address from there")
	fs.StringVar(&o.dir, "dir", "apid-demo", "`directory` for certificates, sockets and the talosconfig")
	fs.IntVar(&o.nodes, "nodes", 3, "number of nodes")
	fs.IntVar(&o.port, "port", 50000, "`port` every node's apid listens on")
	fs.StringVar(&o.logLevel, "log-level", "warn", "debug, info, warn or error (info shows every call's audit line)")
	fs.StringVar(&o.logFmt, "log-format", "text", "text or json")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	ip, err := netip.ParseAddr(*first)
	var errs []error
	if err != nil || !ip.Is4() || !ip.IsLoopback() {
		errs = append(errs, fmt.Errorf("-first-ip %q: want an IPv4 loopback address", *first))
	}
	if o.logFmt != "text" && o.logFmt != "json" {
		errs = append(errs, fmt.Errorf("-log-format %q: want text or json", o.logFmt))
	}
	if o.nodes < 1 || o.nodes > 200 {
		errs = append(errs, fmt.Errorf("-nodes %d: want 1 to 200", o.nodes))
	}
	if o.port < 1 || o.port > 65534 {
		errs = append(errs, fmt.Errorf("-port %d: out of range", o.port))
	}
	o.firstIP = ip
	// Sockets are addressed as unix:///absolute/path: the default, relative
	// directory must work from wherever the demo is started.
	if abs, err := filepath.Abs(o.dir); err != nil {
		errs = append(errs, fmt.Errorf("-dir %q: %w", o.dir, err))
	} else {
		o.dir = abs
	}
	return o, errors.Join(errs...)
}

func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseDemoFlags(args, stderr)
	if err != nil {
		return err
	}
	log := newLogger(stderr, o.logLevel, o.logFmt)
	nodes, err := writeDemoPKI(o)
	if err != nil {
		return err
	}
	caCert, err := os.ReadFile(filepath.Join(o.dir, "ca.crt"))
	if err != nil {
		return err
	}
	caKey, err := os.ReadFile(filepath.Join(o.dir, "ca.key"))
	if err != nil {
		return err
	}
	inv := demoInventory(nodes)
	// Each node starts with a machine configuration, as talosctl gen config
	// would write it for this cluster (one set of cluster secrets).
	cpConfig, workerConfig, err := demoMachineConfigs(nodes)
	if err != nil {
		return fmt.Errorf("machine configurations: %w", err)
	}
	// Every node knows the others, as a Talos cluster's discovery does.
	members := make([]resources.Member, len(nodes))
	for i, n := range nodes {
		members[i] = resources.Member{Hostname: n.name, Addresses: []string{n.ip}, ControlPlane: n.controlPlane}
	}

	etcds, err := startDemoEtcd(ctx, o, nodes)
	if err != nil {
		return err
	}
	defer func() {
		for _, e := range etcds {
			e.Stop()
		}
	}()

	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	g, ctx := errgroup.WithContext(ctx)
	for _, n := range nodes {
		agentLis, err := node.Listen("unix://" + n.sock)
		if err != nil {
			return fmt.Errorf("%s: agent: %w", n.name, err)
		}
		acfg := node.Config{Hostname: n.name, Logger: log.With("node", n.name), Endpoints: demoEndpoints(o, nodes), ClusterName: "apid-demo", BesideServices: []string{"apid"}, Members: members}
		acfg.MachineConfig = workerConfig
		if n.controlPlane {
			acfg.MachineConfig = cpConfig
		}
		acfg.Etcd = etcds[n.name]
		if n.controlPlane {
			// Control-plane nodes hold the CA and issue client
			// configurations (talosctl config new), as in Talos.
			acfg.ClientCA.Cert, acfg.ClientCA.Key = caCert, caKey
		}
		a := node.New(acfg)
		defer a.Close() // after the servers have stopped (g.Wait below)
		g.Go(func() error { return a.Serve(ctx, agentLis, log) })

		cfg := gateway.Default()
		cfg.Listen = net.JoinHostPort(n.ip, strconv.Itoa(o.port))
		cfg.TLS.CA, cfg.TLS.Cert, cfg.TLS.Key = filepath.Join(o.dir, "ca.crt"), n.cert, n.key
		if n.controlPlane {
			cfg.TLS.ClientCert, cfg.TLS.ClientKey = n.clientCert, n.clientKey
		} else {
			// A Talos worker holds no certificate to forward with and
			// serves only itself: so do the demo's.
			cfg.Routing.LocalOnly = true
		}
		cfg.Backend = "unix://" + n.sock
		cfg.Nodes.Port = o.port
		cfg.Routing.SelfNames = []string{n.ip, n.name}
		cfg.Inventory.Nodes = inv
		cfg.Routing.NodeTimeout = 10 * time.Second
		// The demo's nodes live on loopback: nothing else is dialled.
		cfg.Routing.NodeNetworks = []string{"127.0.0.0/8"}
		cfg.LogLevel = o.logLevel
		cfg.LogFormat = o.logFmt
		// Each node's admin endpoint is on its own address, next port up.
		cfg.AdminListen = net.JoinHostPort(n.ip, strconv.Itoa(o.port+1))
		// No balancer watches the demo's readiness: Ctrl-C stops at once,
		// giving running streams (logs -f) a moment to end cleanly.
		cfg.DrainDelay = 0
		cfg.ShutdownTimeout = 2 * time.Second
		// The node's apid logs to the demo's output and, as on a Talos
		// node, to the log its node serves (talosctl logs apid).
		gwLog := slog.New(slog.NewMultiHandler(log.With("node", n.name).Handler(),
			slog.NewTextHandler(a.BesideLog("apid"), &slog.HandlerOptions{Level: slog.LevelInfo})))
		gw, err := gateway.New(cfg, gwLog)
		if err != nil {
			return err
		}
		lis, err := net.Listen("tcp", cfg.Listen)
		if err != nil {
			gw.Close()
			return fmt.Errorf("%s: %w (is another demo running?)", n.name, err)
		}
		g.Go(func() error {
			defer gw.Close()
			return gw.Serve(ctx, lis)
		})
	}
	printDemoHelp(stdout, o, nodes)
	return g.Wait()
}

// writeDemoPKI writes the demo's certificates and talosconfig into o.dir.
// An existing CA there is kept, so a talosconfig from an earlier run keeps
// working; everything else is issued anew.
func writeDemoPKI(o demoOptions) ([]demoNode, error) {
	if err := os.MkdirAll(o.dir, 0o700); err != nil {
		return nil, err
	}
	caCrt, caKey := filepath.Join(o.dir, "ca.crt"), filepath.Join(o.dir, "ca.key")
	ca, err := loadOrCreateCA(caCrt, caKey)
	if err != nil {
		return nil, err
	}
	const year = 365 * 24 * time.Hour
	nodes := make([]demoNode, o.nodes)
	ip := o.firstIP
	ips := make([]string, o.nodes)
	for i := range nodes {
		name := fmt.Sprintf("node-%d", i+1)
		n := demoNode{
			name:         name,
			controlPlane: i < demoControlPlane,
			ip:           ip.String(),
			sock:         filepath.Join(o.dir, name+".sock"),
			cert:         filepath.Join(o.dir, name+".crt"),
			key:          filepath.Join(o.dir, name+".key"),
			clientCert:   filepath.Join(o.dir, name+"-client.crt"),
			clientKey:    filepath.Join(o.dir, name+"-client.key"),
		}
		crt, key, err := ca.IssueNode(name, []string{name, "localhost"}, []net.IP{net.ParseIP(n.ip)}, year, pki.KeyECDSA)
		if err != nil {
			return nil, err
		}
		if err := writePair(n.cert, crt, n.key, key); err != nil {
			return nil, err
		}
		if n.controlPlane {
			if crt, key, err = ca.IssueForwarding(name, year, pki.KeyECDSA); err != nil {
				return nil, err
			}
			if err := writePair(n.clientCert, crt, n.clientKey, key); err != nil {
				return nil, err
			}
		}
		nodes[i], ips[i] = n, n.ip
		if ip = ip.Next(); !ip.IsLoopback() {
			return nil, fmt.Errorf("node %d: ran out of loopback addresses", i+2)
		}
	}
	crt, key, err := ca.IssueClient("admin", []string{certs.RoleAdmin}, year, pki.KeyECDSA)
	if err != nil {
		return nil, err
	}
	if err := writePair(filepath.Join(o.dir, "admin.crt"), crt, filepath.Join(o.dir, "admin.key"), key); err != nil {
		return nil, err
	}
	tc := pki.TalosContext{Endpoints: demoEndpoints(o, nodes), Nodes: ips, CA: ca.CertPEM, Crt: crt, Key: key}
	return nodes, pki.WriteTalosconfig(filepath.Join(o.dir, "talosconfig"), "apid-demo", tc, pki.TalosconfigOverwrite)
}

// demoControlPlane is how many of the demo's nodes are control-plane
// nodes; the others are workers.
const demoControlPlane = 3

// demoEndpoints are the addresses clients dial: the control-plane nodes'
// apid (a worker's would refuse a call naming another node, and the
// client spreads its calls over its endpoints).
func demoEndpoints(o demoOptions, nodes []demoNode) []string {
	var endpoints []string
	for _, n := range nodes {
		if !n.controlPlane {
			continue
		}
		e := n.ip
		if o.port != 50000 {
			e = net.JoinHostPort(n.ip, strconv.Itoa(o.port))
		}
		endpoints = append(endpoints, e)
	}
	return endpoints
}

// demoInventory lists the demo's nodes by name for every apid: the first
// three are the control plane, the others workers, and they alternate
// between two zones so that label selectors have something to select.
func demoInventory(nodes []demoNode) []inventory.Node {
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

func loadOrCreateCA(crtPath, keyPath string) (*pki.CA, error) {
	ca, err := pki.ReadCA(crtPath, keyPath)
	switch {
	case err == nil && time.Until(ca.Cert.NotAfter) > 24*time.Hour:
		return ca, nil
	case err == nil:
		// About to expire: a new CA is the demo's business.
	case !errors.Is(err, fs.ErrNotExist):
		return nil, fmt.Errorf("%w (remove the directory to start afresh)", err)
	}
	ca, err = pki.NewCA("apid demo CA", 10*365*24*time.Hour, pki.KeyECDSA)
	if err != nil {
		return nil, err
	}
	return ca, writePair(crtPath, ca.CertPEM, keyPath, ca.KeyPEM)
}

// writePair writes a certificate (0644) and its key (0600), replacing
// earlier demo files.
func writePair(crtPath string, crt []byte, keyPath string, key []byte) error {
	if err := pki.WriteFile(crtPath, crt, 0o644, true); err != nil {
		return err
	}
	return pki.WriteFile(keyPath, key, 0o600, true)
}

func printDemoHelp(w io.Writer, o demoOptions, nodes []demoNode) {
	ips := make([]string, len(nodes))
	var cp, workers []string
	for i, n := range nodes {
		ips[i] = n.ip
		if n.controlPlane {
			cp = append(cp, n.name)
		} else {
			workers = append(workers, n.name)
		}
	}
	dir := o.dir
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	groups := "@controlplane: " + strings.Join(cp, ", ")
	if len(workers) > 0 {
		groups += "; @workers: " + strings.Join(workers, ", ") + ", which serve only themselves, as Talos workers do"
	} else {
		groups += "; @workers: none (-nodes 5 adds two)"
	}
	first := net.JoinHostPort(nodes[0].ip, strconv.Itoa(o.port))
	fmt.Fprintf(w, `apid demo: %d nodes up (%s), each an apid on port %d in front of an example agent.
Files are in %s (talosconfig, ca.crt, ca.key, admin.crt, admin.key).
Nodes have names and groups (%s; @all; @zone=zone-a, @zone=zone-b).

Try, from another terminal:
  export TALOSCONFIG=%s/talosconfig
  talosctl version
  talosctl -n @controlplane version
  talosctl -n %s health
  talosctl -n %s dmesg
  talosctl -n %s config new %s/reader-talosconfig --roles os:reader
  grpcurl -cacert %s/ca.crt -cert %s/admin.crt -key %s/admin.key \
    -rpc-header 'nodes: %s' %s machine.MachineService/Version
  grpcurl -cacert %s/ca.crt -cert %s/admin.crt -key %s/admin.key %s list
  curl http://%s/nodes      (each node's /nodes, /healthz, /readyz and /metrics)

Press Ctrl-C to stop.
`, len(nodes), strings.Join(ips, ", "), o.port, dir, groups,
		dir, nodes[0].name, nodes[0].name, nodes[0].name, dir,
		dir, dir, dir, strings.Join(ips, ","), first,
		dir, dir, dir, first, net.JoinHostPort(nodes[0].ip, strconv.Itoa(o.port+1)))
}

// demoMachineConfigs generates the control-plane and worker machine
// configurations of the demo cluster, sharing one set of secrets, with the
// first node's address as the Kubernetes endpoint (there is no Kubernetes:
// the documents are what a user would apply, and what get machineconfig
// shows).
func demoMachineConfigs(nodes []demoNode) (controlPlane, worker []byte, err error) {
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

// startDemoEtcd starts one etcd cluster across the control-plane nodes,
// each member on its node's address with its data under the demo's
// directory, and waits until they serve. Each run starts a new cluster (a
// member that left the last one would not be let back in).
func startDemoEtcd(ctx context.Context, o demoOptions, nodes []demoNode) (map[string]*etcd.Member, error) {
	if err := os.RemoveAll(filepath.Join(o.dir, "etcd")); err != nil {
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
			Name: n.name, DataDir: filepath.Join(o.dir, "etcd", n.name),
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
