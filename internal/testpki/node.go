package testpki

import (
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/apid/apid/pki"
)

// NodeFiles are the files of one node's key material, as apid gen node
// writes them.
type NodeFiles struct {
	Cert, Key             string // the serving pair
	ClientCert, ClientKey string // the forwarding identity
}

// WriteNode issues name's serving certificate (for ips) and forwarding
// identity from ca, valid for an hour, and writes them into dir.
func WriteNode(t testing.TB, ca *pki.CA, dir, name string, ips ...net.IP) NodeFiles {
	t.Helper()
	crt, key, err := ca.IssueNode(name, nil, ips, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	fcrt, fkey, err := ca.IssueForwarding(name, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	f := NodeFiles{
		Cert: filepath.Join(dir, name+".crt"), Key: filepath.Join(dir, name+".key"),
		ClientCert: filepath.Join(dir, name+"-client.crt"), ClientKey: filepath.Join(dir, name+"-client.key"),
	}
	for path, data := range map[string][]byte{f.Cert: crt, f.Key: key, f.ClientCert: fcrt, f.ClientKey: fkey} {
		if err := pki.WriteFile(path, data, 0o600, true); err != nil {
			t.Fatal(err)
		}
	}
	return f
}
