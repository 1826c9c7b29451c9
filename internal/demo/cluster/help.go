package cluster

import (
	"fmt"
	"io"
	"net"
	"path/filepath"
	"strconv"
	"strings"
)

// printHelp tells how to reach the cluster that just came up.
func printHelp(w io.Writer, o Options, nodes []demoNode) {
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
	dir := o.Dir
	if abs, err := filepath.Abs(dir); err == nil {
		dir = abs
	}
	groups := "@controlplane: " + strings.Join(cp, ", ")
	if len(workers) > 0 {
		groups += "; @workers: " + strings.Join(workers, ", ") + ", which serve only themselves, as Talos workers do"
	} else {
		groups += "; @workers: none (-nodes 5 adds two)"
	}
	first := net.JoinHostPort(nodes[0].ip, strconv.Itoa(o.Port))
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
`, len(nodes), strings.Join(ips, ", "), o.Port, dir, groups,
		dir, nodes[0].name, nodes[0].name, nodes[0].name, dir,
		dir, dir, dir, strings.Join(ips, ","), first,
		dir, dir, dir, first, net.JoinHostPort(nodes[0].ip, strconv.Itoa(o.Port+1)))
}
