package cluster

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/pki"
)

// demoNode is one node of the demo cluster: a demo node on a unix socket
// and an apid on its own loopback address.
type demoNode struct {
	name          string
	controlPlane  bool // nodes 1 to 3
	ip            string
	sock          string
	pki.NodeFiles // a worker has no forwarding identity
}

// writePKI writes the demo's certificates and talosconfig into o.Dir.
// An existing CA there is kept, so a talosconfig from an earlier run keeps
// working; everything else is issued anew.
func writePKI(o Options) ([]demoNode, error) {
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	dir := pki.Dir{Path: o.Dir, Force: true}
	ca, err := loadOrCreateCA(dir)
	if err != nil {
		return nil, err
	}
	const year = 365 * 24 * time.Hour
	nodes := make([]demoNode, o.Nodes)
	ip := o.FirstIP
	for i := range nodes {
		name := fmt.Sprintf("node-%d", i+1)
		n := demoNode{name: name, controlPlane: i < controlPlane, ip: ip.String(), sock: filepath.Join(o.Dir, name+".sock")}
		names, addrs := []string{name, "localhost"}, []net.IP{net.ParseIP(n.ip)}
		if n.controlPlane {
			// Control-plane nodes forward calls to the others.
			if n.NodeFiles, err = dir.WriteNode(ca, name, names, addrs, year, pki.KeyECDSA); err != nil {
				return nil, err
			}
		} else {
			crt, key, err := ca.IssueNode(name, names, addrs, year, pki.KeyECDSA)
			if err != nil {
				return nil, err
			}
			if n.Cert, n.Key, err = dir.WritePair(name, crt, key); err != nil {
				return nil, err
			}
		}
		nodes[i] = n
		if ip = ip.Next(); !ip.IsLoopback() {
			return nil, fmt.Errorf("node %d: ran out of loopback addresses", i+2)
		}
	}
	crt, key, err := ca.IssueClient("admin", []string{certs.RoleAdmin}, year, pki.KeyECDSA)
	if err != nil {
		return nil, err
	}
	if _, _, err := dir.WritePair("admin", crt, key); err != nil {
		return nil, err
	}
	// The first node by name: one node, so that talosctl health and etcd
	// members work as typed, and replies are stamped as the README shows
	// them; -n @all, @controlplane or a list reaches more.
	tc := pki.TalosContext{Endpoints: endpoints(o, nodes), Nodes: []string{nodes[0].name}, CA: ca.CertPEM, Crt: crt, Key: key}
	return nodes, pki.WriteTalosconfig(filepath.Join(o.Dir, "talosconfig"), "apid-demo", tc, pki.TalosconfigOverwrite)
}

// endpoints are the addresses clients dial: the control-plane nodes'
// apid (a worker's would refuse a call naming another node, and the
// client spreads its calls over its endpoints).
func endpoints(o Options, nodes []demoNode) []string {
	var endpoints []string
	for _, n := range nodes {
		if !n.controlPlane {
			continue
		}
		e := n.ip
		if o.Port != 50000 {
			e = net.JoinHostPort(n.ip, strconv.Itoa(o.Port))
		}
		endpoints = append(endpoints, e)
	}
	return endpoints
}

// loadOrCreateCA reads dir's CA, or makes one there when there is none or
// it is about to expire.
func loadOrCreateCA(dir pki.Dir) (*pki.CA, error) {
	ca, err := dir.ReadCA()
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
	_, _, err = dir.WritePair("ca", ca.CertPEM, ca.KeyPEM)
	return ca, err
}
