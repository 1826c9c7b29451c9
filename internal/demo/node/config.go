package node

import (
	"log/slog"
	"os"
	"slices"
	"time"

	"github.com/apid/apid/internal/demo/etcd"
	"github.com/apid/apid/internal/demo/files"
	"github.com/apid/apid/internal/demo/logs"
	"github.com/apid/apid/internal/demo/monitoring"
	"github.com/apid/apid/internal/demo/resources"
)

// Defaults applied by [New] to zero fields of [Config], besides the parts'
// own: files.DefaultReadRoots, logs.DefaultKernelLogPath and
// monitoring.DefaultMeminfoPath.
const (
	// DefaultLogCapacity is how many lines of its own log the node keeps for Logs.
	DefaultLogCapacity = 1000
	// DefaultClusterName names the contexts of generated talosconfigs.
	DefaultClusterName = "apid"
)

// Config describes a node. The zero value is usable: every empty field gets
// the default documented on it.
type Config struct {
	// Hostname is returned by the Hostname method and recorded in the node's
	// log. Default: os.Hostname(), or "localhost" if that fails.
	Hostname string

	// ReadRoots are the directories Read, List, DiskUsage and Copy may open
	// files under (see files.New). Default: files.DefaultReadRoots.
	ReadRoots []string

	// KernelLogPath is the kernel log device served by Dmesg. When it cannot
	// be opened or read, Dmesg serves clearly labelled synthetic lines instead
	// of failing. Default: logs.DefaultKernelLogPath.
	KernelLogPath string

	// MeminfoPath is the file parsed by Memory. Default:
	// monitoring.DefaultMeminfoPath.
	MeminfoPath string

	// LogCapacity bounds the in-memory log served by Logs, in lines.
	// Default: DefaultLogCapacity.
	LogCapacity int

	// Logger receives the node's structured log (one record per call
	// served). Default: records are kept only in the in-memory log.
	Logger *slog.Logger

	// ClientCA holds the PEM certificate and private key of the CA that
	// signs client certificates. With it, GenerateClientConfiguration
	// issues new clients (as a Talos control-plane node does); without it
	// the method fails with FailedPrecondition (as on a Talos worker).
	ClientCA struct{ Cert, Key []byte }
	// Endpoints are the gateway addresses written into the talosconfigs
	// GenerateClientConfiguration returns.
	Endpoints []string
	// MaxClientTTL, if positive, bounds the validity
	// GenerateClientConfiguration grants; it is always bounded by the
	// client CA's own (Talos sets no other bound).
	MaxClientTTL time.Duration
	// BesideServices are services that run beside the node (the demo's
	// apid): ServiceList shows them running, as a Talos node lists its
	// apid, and Logs serves what they write to BesideLog, but the node
	// does not manage them.
	BesideServices []string
	// MachineConfig is the node's machine configuration at start (a Talos
	// configuration document, as talosctl gen config writes it); without
	// one the node is as in maintenance mode until one is applied.
	MachineConfig []byte
	// Etcd is the etcd member this node runs (a control-plane node), which
	// the etcd API serves; nil on a worker, whose etcd calls are
	// Unimplemented in Talos's words.
	Etcd *etcd.Member
	// Members are the cluster's nodes, as the resource API's cluster
	// members (talosctl get members): the demo names its nodes.
	Members []resources.Member
	// Downtime is how long a simulated reboot, shutdown or upgrade keeps
	// the node down (its API refusing calls, its etcd member stopped).
	// Default lifecycle.DefaultDowntime; negative: none.
	Downtime time.Duration
	// ClusterName names generated talosconfig contexts (admin@NAME).
	// Default: DefaultClusterName.
	ClusterName string
}

// withDefaults returns c with every zero field replaced by its default.
func (c Config) withDefaults() Config {
	if c.Hostname == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "localhost"
		}
		c.Hostname = h
	}
	if len(c.ReadRoots) == 0 {
		c.ReadRoots = slices.Clone(files.DefaultReadRoots)
	}
	if c.KernelLogPath == "" {
		c.KernelLogPath = logs.DefaultKernelLogPath
	}
	if c.MeminfoPath == "" {
		c.MeminfoPath = monitoring.DefaultMeminfoPath
	}
	if c.LogCapacity <= 0 {
		c.LogCapacity = DefaultLogCapacity
	}
	if c.ClusterName == "" {
		c.ClusterName = DefaultClusterName
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	return c
}
