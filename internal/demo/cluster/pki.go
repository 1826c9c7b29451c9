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
	name         string
	controlPlane bool // nodes 1 to 3
	ip           string
	sock         string
	cert         string
	key          string
	clientCert   string // the forwarding identity
	clientKey    string
}

// writePKI writes the demo's certificates and talosconfig into o.Dir.
// An existing CA there is kept, so a talosconfig from an earlier run keeps
// working; everything else is issued anew.
func writePKI(o Options) ([]demoNode, error) {
	if err := os.MkdirAll(o.Dir, 0o700); err != nil {
		return nil, err
	}
	caCrt, caKey := filepath.Join(o.Dir, "ca.crt"), filepath.Join(o.Dir, "ca.key")
	ca, err := loadOrCreateCA(caCrt, caKey)
	if err != nil {
		return nil, err
	}
	const year = 365 * 24 * time.Hour
	nodes := make([]demoNode, o.Nodes)
	ip := o.FirstIP
	ips := make([]string, o.Nodes)
	for i := range nodes {
		name := fmt.Sprintf("node-%d", i+1)
		n := demoNode{
			name:         name,
			controlPlane: i < controlPlane,
			ip:           ip.String(),
			sock:         filepath.Join(o.Dir, name+".sock"),
			cert:         filepath.Join(o.Dir, name+".crt"),
			key:          filepath.Join(o.Dir, name+".key"),
			clientCert:   filepath.Join(o.Dir, name+"-client.crt"),
			clientKey:    filepath.Join(o.Dir, name+"-client.key"),
		}
		crt, key, err := ca.IssueNode(name, []string{name, "localhost"}, []net.IP{net.ParseIP(n.ip)}, year, pki.KeyECDSA)
		if err != nil {
			return nil, err
		}
		if err := pki.WritePair(n.cert, crt, n.key, key, true); err != nil {
			return nil, err
		}
		if n.controlPlane {
			if crt, key, err = ca.IssueForwarding(name, year, pki.KeyECDSA); err != nil {
				return nil, err
			}
			if err := pki.WritePair(n.clientCert, crt, n.clientKey, key, true); err != nil {
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
	if err := pki.WritePair(filepath.Join(o.Dir, "admin.crt"), crt, filepath.Join(o.Dir, "admin.key"), key, true); err != nil {
		return nil, err
	}
	tc := pki.TalosContext{Endpoints: endpoints(o, nodes), Nodes: ips, CA: ca.CertPEM, Crt: crt, Key: key}
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
	return ca, pki.WritePair(crtPath, ca.CertPEM, keyPath, ca.KeyPEM, true)
}
