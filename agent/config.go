package agent

import (
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"time"
)

// Defaults applied by [New] to zero fields of [Config].
const (
	// DefaultKernelLogPath is the kernel log device read by Dmesg.
	DefaultKernelLogPath = "/dev/kmsg"
	// DefaultMeminfoPath is the file parsed by Memory.
	DefaultMeminfoPath = "/proc/meminfo"
	// DefaultLogCapacity is how many lines of its own log the agent keeps for Logs.
	DefaultLogCapacity = 1000
	// DefaultClusterName names the contexts of generated talosconfigs.
	DefaultClusterName = "apid"
)

// DefaultReadRoots are the directories Read may serve files from when
// [Config.ReadRoots] is empty: what a Talos node's users read most (its
// /etc holds the machine's own configuration files). Everything is served
// read-only, and Read and Copy are os:admin's alone in the policy, as in
// Talos.
var DefaultReadRoots = []string{"/proc", "/sys", "/etc"}

// Config describes an agent. The zero value is usable: every empty field gets
// the default documented on it.
type Config struct {
	// Hostname is returned by the Hostname method and recorded in the agent's
	// log. Default: os.Hostname(), or "localhost" if that fails.
	Hostname string

	// ReadRoots are the directories Read, List, DiskUsage and Copy may open
	// files under.
	// Each is made absolute, cleaned and symlink-resolved once, in New; empty
	// entries are ignored. A request for anything that is not (after cleaning
	// and symlink resolution) inside one of them is refused with
	// PermissionDenied. Default: DefaultReadRoots.
	ReadRoots []string

	// KernelLogPath is the kernel log device served by Dmesg. When it cannot
	// be opened or read, Dmesg serves clearly labelled synthetic lines instead
	// of failing. Default: DefaultKernelLogPath.
	KernelLogPath string

	// MeminfoPath is the file parsed by Memory. Default: DefaultMeminfoPath.
	MeminfoPath string

	// LogCapacity bounds the in-memory log served by Logs, in lines.
	// Default: DefaultLogCapacity.
	LogCapacity int

	// Logger receives the agent's structured log (one record per call
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
	// BesideServices are services that run beside the agent on the node
	// (the demo's apid): ServiceList shows them running, as a Talos node
	// lists its apid, but the agent does not manage them.
	BesideServices []string
	// MachineConfig is the node's machine configuration at start (a Talos
	// configuration document, as talosctl gen config writes it); without
	// one the node is as in maintenance mode until one is applied.
	MachineConfig []byte
	// Etcd is the etcd member this node runs (a control-plane node), which
	// the etcd API serves; nil on a worker, whose etcd calls are
	// Unimplemented in Talos's words.
	Etcd *Etcd
	// Members are the cluster's nodes, as the resource API's cluster
	// members (talosctl get members): the demo names its nodes.
	Members []Member
	// ClusterName names generated talosconfig contexts (admin@NAME).
	// Default: DefaultClusterName.
	ClusterName string
}

// withDefaults returns c with every zero field replaced by its default and
// the read roots resolved.
func (c Config) withDefaults() Config {
	if c.Hostname == "" {
		h, err := os.Hostname()
		if err != nil || h == "" {
			h = "localhost"
		}
		c.Hostname = h
	}
	if len(c.ReadRoots) == 0 {
		c.ReadRoots = slices.Clone(DefaultReadRoots)
	}
	if c.KernelLogPath == "" {
		c.KernelLogPath = DefaultKernelLogPath
	}
	if c.MeminfoPath == "" {
		c.MeminfoPath = DefaultMeminfoPath
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

// resolveRoots makes each root absolute and clean and, when it exists,
// resolves its symlinks, so that containment checks compare real paths.
// It returns the cleaned roots as configured and their resolved forms.
func resolveRoots(roots []string) (cleaned, resolved []string) {
	for _, r := range roots {
		if r == "" {
			continue
		}
		abs, err := filepath.Abs(r)
		if err != nil {
			continue
		}
		cleaned = append(cleaned, abs)
		if real, err := filepath.EvalSymlinks(abs); err == nil {
			abs = real
		}
		resolved = append(resolved, abs)
	}
	return cleaned, resolved
}
