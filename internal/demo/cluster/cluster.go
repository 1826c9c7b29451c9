package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/resources"
	"github.com/apid/apid/internal/gateway"
)

// Options describe a demo cluster.
type Options struct {
	// Dir holds the certificates, sockets, etcd data and talosconfig; an
	// existing CA there is kept, so that an earlier talosconfig keeps
	// working.
	Dir string
	// Nodes is how many nodes run (1 to 200); the first three are the
	// control plane.
	Nodes int
	// Port is where every node's apid listens; its admin endpoint is on
	// the next port up.
	Port int
	// FirstIP is node 1's IPv4 loopback address; node i gets the i-th
	// address from there.
	FirstIP netip.Addr
	// LogLevel and LogFormat are the apids' (debug, info, warn or error;
	// text or json).
	LogLevel, LogFormat string
	// Downtime is how long a simulated reboot, shutdown or upgrade keeps
	// a node's API and etcd member down; zero: none.
	Downtime time.Duration
	// Log receives the nodes' and the apids' logs.
	Log *slog.Logger
}

// controlPlane is how many of the demo's nodes are control-plane nodes;
// the others are workers.
const controlPlane = 3

// Run starts the cluster o describes, prints how to use it to stdout, and
// serves until ctx ends or a node fails.
func Run(ctx context.Context, o Options, stdout io.Writer) error {
	if o.Nodes < 1 {
		return errors.New("a demo cluster needs at least one node")
	}
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	// Sockets are addressed as unix:///absolute/path.
	dir, err := filepath.Abs(o.Dir)
	if err != nil {
		return err
	}
	o.Dir = dir
	log := o.Log
	// Before anything is written: a second demo on the same addresses
	// would otherwise fail half-way, deep in etcd, leaving a directory
	// half-written.
	if err := addressesFree(o); err != nil {
		return err
	}
	nodes, err := writePKI(o)
	if err != nil {
		return err
	}
	caCert, err := os.ReadFile(filepath.Join(o.Dir, "ca.crt"))
	if err != nil {
		return err
	}
	caKey, err := os.ReadFile(filepath.Join(o.Dir, "ca.key"))
	if err != nil {
		return err
	}
	inv := inventoryOf(nodes)
	// Each node starts with a machine configuration, as talosctl gen config
	// would write it for this cluster (one set of cluster secrets).
	cpConfig, workerConfig, err := machineConfigs(nodes)
	if err != nil {
		return fmt.Errorf("machine configurations: %w", err)
	}
	// Every node knows the others, as a Talos cluster's discovery does.
	members := make([]resources.Member, len(nodes))
	for i, n := range nodes {
		members[i] = resources.Member{Hostname: n.name, Addresses: []string{n.ip}, ControlPlane: n.controlPlane}
	}

	etcds, err := startEtcd(ctx, o, nodes)
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
		acfg := node.Config{Hostname: n.name, Logger: log.With("node", n.name), Endpoints: endpoints(o, nodes), ClusterName: "apid-demo", BesideServices: []string{"apid"}, Members: members,
			Downtime: o.Downtime}
		if o.Downtime == 0 {
			acfg.Downtime = -1 // none
		}
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
		cfg.Listen = net.JoinHostPort(n.ip, strconv.Itoa(o.Port))
		cfg.TLS.CA, cfg.TLS.Cert, cfg.TLS.Key = filepath.Join(o.Dir, "ca.crt"), n.Cert, n.Key
		if n.controlPlane {
			cfg.TLS.ClientCert, cfg.TLS.ClientKey = n.ClientCert, n.ClientKey
			// The control plane's gateways share one disruption budget
			// through the cluster's etcd.
			cfg.Disruption.Etcd.Endpoints = etcdEndpoints(nodes)
			cfg.Disruption.Etcd.CA, cfg.Disruption.Etcd.Cert, cfg.Disruption.Etcd.Key = apidEtcdFiles(o)
		} else {
			// A Talos worker holds no certificate to forward with and
			// serves only itself: so do the demo's.
			cfg.Routing.LocalOnly = true
		}
		cfg.Backend = "unix://" + n.sock
		cfg.Nodes.Port = o.Port
		cfg.Routing.SelfNames = []string{n.ip, n.name}
		cfg.Inventory.Nodes = inv
		cfg.Routing.NodeTimeout = 10 * time.Second
		// The demo's nodes live on loopback: nothing else is dialled.
		cfg.Routing.NodeNetworks = []string{"127.0.0.0/8"}
		cfg.LogLevel = o.LogLevel
		cfg.LogFormat = o.LogFormat
		// Each node's admin endpoint is on its own address, next port up.
		cfg.AdminListen = net.JoinHostPort(n.ip, strconv.Itoa(o.Port+1))
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
	printHelp(stdout, o, nodes)
	return g.Wait()
}

// addressesFree checks that every address the cluster o describes listens
// on is free: each node's apid and admin endpoint, and a control-plane
// node's etcd ports.
func addressesFree(o Options) error {
	ip := o.FirstIP
	for i := range o.Nodes {
		ports := []string{strconv.Itoa(o.Port), strconv.Itoa(o.Port + 1)}
		if i < controlPlane {
			ports = append(ports, etcdClientPort, etcdPeerPort)
		}
		for _, port := range ports {
			addr := net.JoinHostPort(ip.String(), port)
			l, err := net.Listen("tcp", addr)
			if err != nil {
				next := ip
				for range o.Nodes + 10 {
					next = next.Next()
				}
				return fmt.Errorf("node-%d: %s is taken (another apid demo running?): stop it, or run this one on other addresses, as in apid demo -first-ip %s", i+1, addr, next)
			}
			l.Close()
		}
		if ip = ip.Next(); !ip.IsLoopback() {
			return fmt.Errorf("node %d: ran out of loopback addresses", i+2)
		}
	}
	return nil
}
