//go:build !nodemo

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/netip"
	"time"

	"github.com/apid/apid/internal/demo/cluster"
)

// runDemo runs a demo cluster on this machine until ctx ends.
func runDemo(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseDemoFlags(args, stderr)
	if err != nil {
		return err
	}
	o.Log = newLogger(stderr, o.LogLevel, o.LogFormat)
	return cluster.Run(ctx, o, stdout)
}

func parseDemoFlags(args []string, stderr io.Writer) (cluster.Options, error) {
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	var o cluster.Options
	first := fs.String("first-ip", "127.0.0.11", "loopback `address` of node 1; node i gets the i-th address from there")
	fs.StringVar(&o.Dir, "dir", "apid-demo", "`directory` for certificates, sockets and the talosconfig")
	fs.IntVar(&o.Nodes, "nodes", 3, "number of nodes")
	fs.IntVar(&o.Port, "port", 50000, "`port` every node's apid listens on")
	fs.StringVar(&o.LogLevel, "log-level", "warn", "debug, info, warn or error (info shows every call's audit line)")
	fs.StringVar(&o.LogFormat, "log-format", "text", "text or json")
	fs.DurationVar(&o.Downtime, "downtime", 2*time.Second, "how long a simulated reboot, shutdown or upgrade keeps a node (its API, its etcd member) down")
	if err := fs.Parse(args); err != nil {
		return o, err
	}
	ip, err := netip.ParseAddr(*first)
	var errs []error
	if err != nil || !ip.Is4() || !ip.IsLoopback() {
		errs = append(errs, fmt.Errorf("-first-ip %q: want an IPv4 loopback address", *first))
	}
	if o.LogFormat != "text" && o.LogFormat != "json" {
		errs = append(errs, fmt.Errorf("-log-format %q: want text or json", o.LogFormat))
	}
	if o.Nodes < 1 || o.Nodes > 200 {
		errs = append(errs, fmt.Errorf("-nodes %d: want 1 to 200", o.Nodes))
	}
	if o.Downtime < 0 || o.Downtime > time.Hour {
		errs = append(errs, fmt.Errorf("-downtime %s: want 0s to 1h", o.Downtime))
	}
	if o.Port < 1 || o.Port > 65534 {
		errs = append(errs, fmt.Errorf("-port %d: out of range", o.Port))
	}
	o.FirstIP = ip
	return o, errors.Join(errs...)
}
