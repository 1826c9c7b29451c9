package certs_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testpki"
	"github.com/apid/apid/pki"
	"io"
	"math/big"
	"net"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// testTimeout bounds every network wait in these tests.
const testTimeout = 10 * time.Second

var loopback = []net.IP{net.IPv4(127, 0, 0, 1)}

// pair is a PEM certificate and key, and for a node its forwarding
// identity.
type pair struct {
	cert, key []byte
	fwd       *pair
}

func (p pair) tls(t *testing.T) tls.Certificate {
	t.Helper()

	return testpki.Must[tls.Certificate](t)(tls.X509KeyPair(p.cert, p.key))
}

func issueNode(t *testing.T, ca *pki.CA, kt pki.KeyType) pair {
	t.Helper()

	c, k, err := ca.IssueNode("node.test", []string{"node.test"}, loopback, time.Hour, kt)
	if err != nil {
		t.Fatal(err)
	}

	fc, fk, err := ca.IssueForwarding("node.test", time.Hour, kt)
	if err != nil {
		t.Fatal(err)
	}

	return pair{cert: c, key: k, fwd: &pair{cert: fc, key: fk}}
}

func issueClient(t *testing.T, ca *pki.CA, roles ...string) pair {
	t.Helper()

	c, k, err := ca.IssueClient("client", roles, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}

	return pair{cert: c, key: k}
}

// craft signs a certificate the PKI functions refuse to make: tmpl is
// completed with a fresh key, a serial and a subject when missing. A nil
// parent makes it self-signed.
func craft(t *testing.T, parent *pki.CA, tmpl *x509.Certificate) pair {
	t.Helper()

	key := testpki.Must[*ecdsa.PrivateKey](t)(ecdsa.GenerateKey(elliptic.P256(), rand.Reader))

	tmpl.SerialNumber = big.NewInt(time.Now().UnixNano())
	if tmpl.Subject.CommonName == "" {
		tmpl.Subject = pkix.Name{CommonName: "crafted", Organization: []string{certs.RoleAdmin}}
	}

	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = time.Now().Add(-time.Hour)
	}

	if tmpl.NotAfter.IsZero() {
		tmpl.NotAfter = time.Now().Add(time.Hour)
	}

	var (
		signer crypto.Signer = key
		issuer               = tmpl
	)

	if parent != nil {
		signer, issuer = parent.Key, parent.Cert
	}

	der := testpki.Must[[]byte](t)(x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), signer))
	keyDER := testpki.Must[[]byte](t)(x509.MarshalPKCS8PrivateKey(key))

	return pair{
		cert: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		key:  pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}
}

// writeFiles writes a node's material into dir under fixed names, replacing
// what is there, and returns the paths.
func writeFiles(t *testing.T, dir string, caPEM []byte, node pair) certs.Files {
	t.Helper()

	f := certs.Files{
		CA:   filepath.Join(dir, "ca.crt"),
		Cert: filepath.Join(dir, "node.crt"),
		Key:  filepath.Join(dir, "node.key"),
	}

	files := map[string][]byte{f.CA: caPEM, f.Cert: node.cert, f.Key: node.key}
	if node.fwd != nil {
		f.ClientCert, f.ClientKey = filepath.Join(dir, "node-client.crt"), filepath.Join(dir, "node-client.key")
		files[f.ClientCert], files[f.ClientKey] = node.fwd.cert, node.fwd.key
	}

	for path, data := range files {
		if err := pki.WriteFile(path, data, 0o600, true); err != nil {
			t.Fatal(err)
		}
	}

	return f
}

// handshake is the server's view of one accepted connection.
type handshake struct {
	state tls.ConnectionState
	err   error
}

// tlsServer accepts TLS connections on 127.0.0.1, reports each handshake on
// handshakes and echoes what verified clients send until they hang up.
type tlsServer struct {
	addr       string
	handshakes chan handshake
}

func startTLSServer(t *testing.T, cfg *tls.Config) *tlsServer {
	t.Helper()

	ln := testpki.Must[net.Listener](t)(net.Listen("tcp", "127.0.0.1:0"))
	s := &tlsServer{addr: ln.Addr().String(), handshakes: make(chan handshake, 16)}

	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		conns []net.Conn
	)

	t.Cleanup(func() {
		_ = ln.Close()

		mu.Lock()
		for _, c := range conns {
			_ = c.Close()
		}
		mu.Unlock()

		wg.Wait()
	})

	wg.Go(func() {
		for {
			raw, err := ln.Accept()
			if err != nil {
				return
			}

			mu.Lock()
			conns = append(conns, raw)
			mu.Unlock()

			wg.Go(func() {
				defer raw.Close() //nolint:errcheck

				_ = raw.SetDeadline(time.Now().Add(testTimeout))

				conn := tls.Server(raw, cfg)
				err := conn.Handshake()
				s.handshakes <- handshake{state: conn.ConnectionState(), err: err}

				if err == nil {
					_, _ = io.Copy(conn, conn)
				}
			})
		}
	})

	return s
}

// next returns the server's view of the next handshake.
func (s *tlsServer) next(t *testing.T) handshake {
	t.Helper()

	select {
	case h := <-s.handshakes:
		return h
	case <-time.After(testTimeout):
		t.Fatal("no handshake reported by the server")

		return handshake{}
	}
}

// dial connects with cfg and does one echo round trip, which in TLS 1.3 is
// the first moment the client learns whether the server accepted its
// certificate. The connection is closed at the end of the test.
func dial(t *testing.T, addr string, cfg *tls.Config) (*tls.Conn, error) {
	t.Helper()

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()

	d := tls.Dialer{Config: cfg}

	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}

	conn := c.(*tls.Conn)
	t.Cleanup(func() { _ = conn.Close() })

	if err := echo(conn); err != nil {
		return nil, err
	}

	return conn, nil
}

func echo(conn *tls.Conn) error {
	_ = conn.SetDeadline(time.Now().Add(testTimeout))

	msg := []byte("ping")
	if _, err := conn.Write(msg); err != nil {
		return err
	}

	got := make([]byte, len(msg))
	if _, err := io.ReadFull(conn, got); err != nil {
		return err
	}

	if string(got) != string(msg) {
		return errors.New("echo mismatch")
	}

	return nil
}

// clientConfig is a plain client of the gateway presenting p.
func clientConfig(t *testing.T, roots *x509.CertPool, p *pair) *tls.Config {
	t.Helper()

	cfg := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	if p != nil {
		cfg.Certificates = []tls.Certificate{p.tls(t)}
	}

	return cfg
}
