package pki

import (
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"time"
)

// Dir is a directory of key material as apid gen and apid demo lay it out:
// the CA as ca.crt and ca.key, and every other certificate as NAME.crt
// (mode 0o644: it is public) beside its private key NAME.key (0o600). With
// Force, writing replaces what is there; without it, a pair is written
// only where neither of its files exists.
type Dir struct {
	Path  string
	Force bool
	// Wrote, if set, is told the paths of each pair written.
	Wrote func(crtPath, keyPath string)
}

// ReadCA reads the directory's CA, as ReadCA does.
func (d Dir) ReadCA() (*CA, error) {
	return ReadCA(filepath.Join(d.Path, "ca.crt"), filepath.Join(d.Path, "ca.key"))
}

// WritePair writes name.crt and name.key, each as WriteFile writes it, and
// returns their paths. Without Force, when either exists, neither is
// written and the error is an *ExistsError.
func (d Dir) WritePair(name string, crt, key []byte) (crtPath, keyPath string, err error) {
	crtPath, keyPath = filepath.Join(d.Path, name+".crt"), filepath.Join(d.Path, name+".key")
	if !d.Force {
		for _, p := range []string{crtPath, keyPath} {
			if _, err := os.Lstat(p); err == nil {
				return crtPath, keyPath, &ExistsError{Path: p}
			}
		}
	}
	if err := WriteFile(crtPath, crt, 0o644, d.Force); err != nil {
		return crtPath, keyPath, err
	}
	if err := WriteFile(keyPath, key, 0o600, d.Force); err != nil {
		return crtPath, keyPath, err
	}
	if d.Wrote != nil {
		d.Wrote(crtPath, keyPath)
	}
	return crtPath, keyPath, nil
}

// NodeFiles are a node's key material in a Dir, as apid gen node writes
// it: its serving pair, NAME.crt and NAME.key, and the identity it forwards
// with, NAME-client.crt and NAME-client.key.
type NodeFiles struct {
	Cert, Key             string
	ClientCert, ClientKey string
}

// WriteNode issues node name's serving certificate, for dnsNames and ips,
// and the identity it forwards with, from ca (see IssueNode and
// IssueForwarding), and writes them, each pair as WritePair does.
func (d Dir) WriteNode(ca *CA, name string, dnsNames []string, ips []net.IP, ttl time.Duration, kt KeyType) (f NodeFiles, err error) {
	crt, key, err := ca.IssueNode(name, dnsNames, ips, ttl, kt)
	if err == nil {
		f.Cert, f.Key, err = d.WritePair(name, crt, key)
	}
	if err == nil {
		crt, key, err = ca.IssueForwarding(name, ttl, kt)
	}
	if err == nil {
		f.ClientCert, f.ClientKey, err = d.WritePair(name+"-client", crt, key)
	}
	return f, err
}

// ExistsError is a file that Dir.WritePair would not replace. It is
// fs.ErrExist for errors.Is.
type ExistsError struct{ Path string }

func (e *ExistsError) Error() string { return e.Path + " exists" }

// Is reports whether target is fs.ErrExist.
func (e *ExistsError) Is(target error) bool { return target == fs.ErrExist }
