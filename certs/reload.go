package certs

import (
	"bytes"
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/binary"
	"encoding/pem"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

// DefaultWatchInterval is the polling interval Watch uses when given a
// non-positive one.
const DefaultWatchInterval = 10 * time.Second

// Files names the PEM files that hold a node's key material.
type Files struct {
	// CA holds the certificates trusted to sign peers. It may hold several
	// so that a CA can be rotated without downtime.
	CA string `yaml:"ca" reload:"restart"`
	// Cert holds the node's certificate, optionally followed by
	// intermediates.
	Cert string `yaml:"cert" reload:"restart"`
	// Key holds the private key matching Cert.
	Key string `yaml:"key" reload:"restart"`
	// ClientCert and ClientKey are the forwarding identity: the client
	// certificate this node presents to other nodes' apid, as Talos
	// control planes hold one (Organization os:impersonator, extended key
	// usage exactly clientAuth; apid gen node writes it). Empty: Cert is
	// presented, which only peers that allow combined client certificates
	// accept.
	ClientCert string `yaml:"clientCert" reload:"restart"`
	ClientKey  string `yaml:"clientKey" reload:"restart"`
}

// Source holds a node's current key pair and CA pool, loaded from Files, and
// replaces them when the files change. Configs built by ServerConfig and
// ClientConfig read the current material on every handshake, so a reload
// applies to new connections and leaves established ones alone.
//
// A Source is safe for concurrent use.
type Source struct {
	files Files

	reloadMu sync.Mutex // serialises Reload; readers never take it
	current  atomic.Pointer[material]
}

// material is one immutable generation of key material.
type material struct {
	cert       *tls.Certificate // Leaf is set
	client     *tls.Certificate // the forwarding identity; cert when none is configured
	pool       *x509.CertPool
	cas        []*x509.Certificate // what pool holds, for expiry reports
	digest     [sha256.Size]byte
	generation uint64
	superseded chan struct{} // closed when a newer generation replaces this one
}

// NewSource loads files once and checks them: the key must match the
// certificate and the CA file must hold at least one CA certificate and
// nothing but certificates.
func NewSource(files Files) (*Source, error) {
	s := &Source{files: files}

	m, err := load(files)
	if err != nil {
		return nil, err
	}

	m.generation = 1
	s.current.Store(m)

	return s, nil
}

// Files returns the paths the Source reads.
func (s *Source) Files() Files { return s.files }

// Certificate returns the current certificate and key, with Leaf set. It is
// shared: callers must not modify it.
func (s *Source) Certificate() *tls.Certificate { return s.current.Load().cert }

// ClientCertificate returns the certificate presented to other nodes: the
// forwarding identity, or the serving certificate when none is configured.
// Leaf is set.
func (s *Source) ClientCertificate() *tls.Certificate { return s.current.Load().client }

// Pool returns the current pool of trusted CAs. It is shared: callers must
// not modify it.
func (s *Source) Pool() *x509.CertPool { return s.current.Load().pool }

// CAs returns the certificates of the current CA bundle. They are shared:
// callers must not modify them.
func (s *Source) CAs() []*x509.Certificate { return s.current.Load().cas }

// caCertificates lists the certificates of a bundle ParseCAPool accepted.
func caCertificates(data []byte) []*x509.Certificate {
	var out []*x509.Certificate
	for rest := data; ; {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			return out
		}
		if c, err := x509.ParseCertificate(block.Bytes); err == nil {
			out = append(out, c)
		}
	}
}

// Generation returns a number that grows by one each time Reload replaces the
// material; NewSource starts it at 1.
func (s *Source) Generation() uint64 { return s.current.Load().generation }

// Changed returns a channel that is closed once the material current at the
// time of the call has been replaced. A connection pool can wait on it to
// learn that connections dialled with the old certificate should be retired;
// after it fires, call Changed again for the next change.
func (s *Source) Changed() <-chan struct{} { return s.current.Load().superseded }

// Reload re-reads the files. It reports changed=false without error when
// their content is what is already loaded. When the new content does not load
// (for example the certificate was replaced but the key not yet), it keeps the
// current material and returns the error; a later Reload picks up the
// completed change.
func (s *Source) Reload() (changed bool, err error) {
	s.reloadMu.Lock()
	defer s.reloadMu.Unlock()

	raw, err := readFiles(s.files)
	if err != nil {
		return false, err
	}

	old := s.current.Load()
	if raw.digest() == old.digest {
		return false, nil
	}

	m, err := raw.parse(s.files)
	if err != nil {
		return false, err
	}

	m.generation = old.generation + 1
	s.current.Store(m)
	close(old.superseded)

	return true, nil
}

// Watch calls Reload every interval until ctx is done, then returns; run it
// in a goroutine the caller waits for. onChange is called after a reload
// that replaced the material. onError is called when a reload fails, but
// not again for the same error until a reload has succeeded, so a file left
// broken does not flood the log. Either callback may be nil; both run on
// Watch's goroutine.
func (s *Source) Watch(ctx context.Context, interval time.Duration, onChange func(), onError func(error)) {
	if interval <= 0 {
		interval = DefaultWatchInterval
	}

	ticker := time.NewTicker(interval)
	defer ticker.Stop()

	var lastErr string

	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
		}

		changed, err := s.Reload()

		switch {
		case err != nil:
			if err.Error() != lastErr && onError != nil {
				onError(err)
			}

			lastErr = err.Error()
		case changed:
			lastErr = ""

			if onChange != nil {
				onChange()
			}
		default:
			lastErr = ""
		}
	}
}

// rawFiles is the undecoded content of Files.
type rawFiles struct {
	ca, cert, key, clientCert, clientKey []byte
}

func readFiles(files Files) (rawFiles, error) {
	var (
		raw  rawFiles
		errs []error
	)

	for _, f := range []struct {
		path     string
		dst      *[]byte
		optional bool
	}{
		{files.CA, &raw.ca, false},
		{files.Cert, &raw.cert, false},
		{files.Key, &raw.key, false},
		{files.ClientCert, &raw.clientCert, true},
		{files.ClientKey, &raw.clientKey, true},
	} {
		if f.path == "" && f.optional {
			continue
		}

		b, err := os.ReadFile(f.path)
		if err != nil {
			errs = append(errs, err)

			continue
		}

		*f.dst = b
	}

	return raw, errors.Join(errs...)
}

// digest identifies the content; lengths are mixed in so that bytes moving
// from one file to the next still change it.
func (r rawFiles) digest() [sha256.Size]byte {
	h := sha256.New()

	for _, b := range [][]byte{r.ca, r.cert, r.key, r.clientCert, r.clientKey} {
		_ = binary.Write(h, binary.BigEndian, uint64(len(b)))
		h.Write(b)
	}

	var d [sha256.Size]byte

	h.Sum(d[:0])

	return d
}

func (r rawFiles) parse(files Files) (*material, error) {
	// A file cut short (a writer that died, a full disk) can still parse:
	// its last block is then silently dropped, and with it a CA, or the
	// intermediate a chain needs. Such a file is refused whole.
	for _, f := range []struct {
		path string
		data []byte
	}{{files.CA, r.ca}, {files.Cert, r.cert}, {files.Key, r.key}, {files.ClientCert, r.clientCert}, {files.ClientKey, r.clientKey}} {
		if err := CheckPEMWhole(f.data); err != nil {
			return nil, fmt.Errorf("%s: %w", f.path, err)
		}
	}
	cert, err := tls.X509KeyPair(r.cert, r.key)
	if err != nil {
		return nil, fmt.Errorf("load key pair %s, %s: %w", files.Cert, files.Key, err)
	}

	pool, err := ParseCAPool(r.ca)
	if err != nil {
		return nil, fmt.Errorf("load CA %s: %w", files.CA, err)
	}

	client := &cert
	if files.ClientCert != "" || files.ClientKey != "" {
		c, err := tls.X509KeyPair(r.clientCert, r.clientKey)
		if err != nil {
			return nil, fmt.Errorf("load forwarding key pair %s, %s: %w", files.ClientCert, files.ClientKey, err)
		}
		if err := CheckForwardingCertificate(c.Leaf); err != nil {
			return nil, fmt.Errorf("clientCert %s: %w", files.ClientCert, err)
		}
		client = &c
	}

	return &material{
		cert:       &cert,
		client:     client,
		pool:       pool,
		cas:        caCertificates(r.ca),
		digest:     r.digest(),
		superseded: make(chan struct{}),
	}, nil
}

func load(files Files) (*material, error) {
	raw, err := readFiles(files)
	if err != nil {
		return nil, err
	}

	return raw.parse(files)
}

// CheckPEMWhole refuses PEM data with a block that begins and never ends:
// a file cut inside its last block. Text between blocks (as openssl x509
// -text writes it) is fine.
func CheckPEMWhole(data []byte) error {
	rest := data
	for n := 1; ; n++ {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			break
		}
	}
	// What follows the last whole block may be text, but not the dashes
	// of a marker: a file cut inside "-----BEGIN" or a block's body.
	if i := bytes.Index(rest, []byte("-----")); i >= 0 {
		line, _, _ := bytes.Cut(rest[i:], []byte("\n"))
		return fmt.Errorf("a PEM block is cut short (%q has no END line, or its content does not decode): the file was written partly; write the whole file again, then rename it into place", bytes.TrimSpace(line))
	}
	return nil
}

// ParseCAPool accepts only CERTIFICATE blocks of CA certificates: a stray
// private key or a leaf in a trust bundle is a mistake worth stopping for,
// and a leaf in a pool would be trusted as a root.
func ParseCAPool(data []byte) (*x509.CertPool, error) {
	pool := x509.NewCertPool()
	n := 0

	for rest := data; ; {
		var block *pem.Block

		block, rest = pem.Decode(rest)
		if block == nil {
			break
		}

		n++

		if block.Type != "CERTIFICATE" {
			return nil, fmt.Errorf("PEM block %d is %q, want CERTIFICATE", n, block.Type)
		}

		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("certificate %d: %w", n, err)
		}

		if !cert.BasicConstraintsValid || !cert.IsCA {
			return nil, fmt.Errorf("certificate %d (%q) is not a CA", n, cert.Subject.CommonName)
		}

		pool.AddCert(cert)
	}

	if n == 0 {
		return nil, errors.New("no PEM certificates found")
	}

	return pool, nil
}
