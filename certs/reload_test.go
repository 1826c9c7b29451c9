package certs_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testpki"
	"github.com/apid/apid/pki"
	"io/fs"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

func leafOf(t *testing.T, p pair) *x509.Certificate {
	t.Helper()

	block, _ := pem.Decode(p.cert)

	return testpki.Must[*x509.Certificate](t)(x509.ParseCertificate(block.Bytes))
}

func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestSourceReload(t *testing.T) {
	t.Parallel()

	dir := t.TempDir()
	ca1, ca2 := testpki.NewCA(t, "old"), testpki.NewCA(t, "new")
	node1, node2 := issueNode(t, ca1, pki.KeyECDSA), issueNode(t, ca2, pki.KeyEd25519)
	client1, client2 := issueClient(t, ca1, certs.RoleAdmin), issueClient(t, ca2, certs.RoleAdmin)
	bothRoots := testpki.Pool(t, ca1.CertPEM, ca2.CertPEM)

	files := writeFiles(t, dir, ca1.CertPEM, node1)
	src := testpki.Must[*certs.Source](t)(certs.NewSource(files))
	srv := startTLSServer(t, certs.ServerConfig(src, certs.ServerOptions{}))

	accepted := func(t *testing.T, client pair, wantServer pair) {
		t.Helper()

		conn, err := dial(t, srv.addr, clientConfig(t, bothRoots, &client))
		if h := srv.next(t); err != nil || h.err != nil {
			t.Fatalf("refused: client error %v, server error %v", err, h.err)
		}

		if got := conn.ConnectionState().PeerCertificates[0]; !got.Equal(leafOf(t, wantServer)) {
			t.Fatalf("server presented %q serial %x, want the other certificate", got.Subject.CommonName, got.SerialNumber)
		}
	}

	refused := func(t *testing.T, client pair) {
		t.Helper()

		_, err := dial(t, srv.addr, clientConfig(t, bothRoots, &client))
		if h := srv.next(t); err == nil || h.err == nil {
			t.Fatalf("accepted: client error %v, server error %v", err, h.err)
		}
	}

	old, err := dial(t, srv.addr, clientConfig(t, bothRoots, &client1))
	if h := srv.next(t); err != nil || h.err != nil {
		t.Fatalf("first connection: client error %v, server error %v", err, h.err)
	}

	gen, changedCh := src.Generation(), src.Changed()

	if changed, err := src.Reload(); changed || err != nil {
		t.Fatalf("Reload of unchanged files = %v, %v", changed, err)
	}

	// Rotate to a new CA and node certificate.
	writeFiles(t, dir, ca2.CertPEM, node2)

	if changed, err := src.Reload(); !changed || err != nil {
		t.Fatalf("Reload after rotation = %v, %v", changed, err)
	}

	if src.Generation() != gen+1 || !closed(changedCh) || closed(src.Changed()) {
		t.Fatalf("generation %d (was %d), old channel closed %v, new channel closed %v",
			src.Generation(), gen, closed(changedCh), closed(src.Changed()))
	}

	if err := echo(old); err != nil {
		t.Fatalf("connection made before the reload broke: %v", err)
	}

	accepted(t, client2, node2)
	refused(t, client1)

	// A bundle of both CAs trusts clients of either.
	writeFiles(t, dir, slices.Concat(ca1.CertPEM, ca2.CertPEM), node2)

	if changed, err := src.Reload(); !changed || err != nil {
		t.Fatalf("Reload of the bundle = %v, %v", changed, err)
	}

	accepted(t, client1, node2)
	accepted(t, client2, node2)

	// A key that does not match the certificate is refused and the loaded
	// material stays in use.
	before, gen := src.Certificate(), src.Generation()

	if err := pki.WriteFile(files.Key, node1.key, 0o600, true); err != nil {
		t.Fatal(err)
	}

	if changed, err := src.Reload(); changed || err == nil {
		t.Fatalf("Reload of a mismatched key = %v, %v", changed, err)
	}

	if src.Certificate() != before || src.Generation() != gen {
		t.Fatal("failed reload replaced the material")
	}

	accepted(t, client1, node2)

	if err := echo(old); err != nil {
		t.Fatalf("connection made before the reloads broke: %v", err)
	}
}

func TestSourceWatch(t *testing.T) {
	t.Parallel()

	dir := t.TempDir()
	ca1, ca2 := testpki.NewCA(t, "old"), testpki.NewCA(t, "new")
	node1, node2 := issueNode(t, ca1, pki.KeyECDSA), issueNode(t, ca2, pki.KeyECDSA)
	files := writeFiles(t, dir, ca1.CertPEM, node1)
	src := testpki.Must[*certs.Source](t)(certs.NewSource(files))

	changes := make(chan struct{}, 1)
	failures := make(chan error, 1)

	ctx, cancel := context.WithCancel(context.Background())

	var wg sync.WaitGroup

	t.Cleanup(wg.Wait)
	t.Cleanup(cancel)

	wg.Go(func() {
		src.Watch(ctx, 5*time.Millisecond,
			func() {
				select {
				case changes <- struct{}{}:
				default: // a notification is already pending
				}
			},
			func(err error) {
				select {
				case failures <- err:
				default:
				}
			})
	})

	// A single broken file is reported and nothing changes.
	if err := pki.WriteFile(files.Key, node2.key, 0o600, true); err != nil {
		t.Fatal(err)
	}

	select {
	case err := <-failures:
		if src.Generation() != 1 {
			t.Fatalf("generation %d after a failed reload (error %v)", src.Generation(), err)
		}
	case <-changes:
		t.Fatal("a mismatched key was loaded")
	case <-time.After(testTimeout):
		t.Fatal("Watch did not report the broken key")
	}

	// The three files change one at a time, so Watch may load an
	// intermediate state first; wait until it reaches the final one.
	writeFiles(t, dir, ca2.CertPEM, node2)

	want := leafOf(t, node2)
	wantPool := testpki.Pool(t, ca2.CertPEM)
	deadline := time.After(testTimeout)

	for !src.Certificate().Leaf.Equal(want) || !src.Pool().Equal(wantPool) {
		select {
		case <-changes:
		case <-deadline:
			t.Fatal("Watch did not load the rotated files")
		}
	}

	cancel()
	wg.Wait()
}

func TestNewSourceRejects(t *testing.T) {
	t.Parallel()

	ca := testpki.NewCA(t, "cluster")
	node := issueNode(t, ca, pki.KeyECDSA)
	other := issueNode(t, ca, pki.KeyECDSA)

	tests := []struct {
		name string
		ca   []byte
		node pair
	}{
		{"key of another certificate", ca.CertPEM, pair{cert: node.cert, key: other.key}},
		{"empty CA file", nil, node},
		{"leaf in CA file", node.cert, node},
		{"key in CA file", slices.Concat(ca.CertPEM, node.key), node},
		{"garbage certificate", ca.CertPEM, pair{cert: []byte("not PEM"), key: node.key}},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			files := writeFiles(t, t.TempDir(), tt.ca, tt.node)
			if _, err := certs.NewSource(files); err == nil {
				t.Fatal("NewSource accepted broken material")
			}
		})
	}

	t.Run("missing file", func(t *testing.T) {
		t.Parallel()

		files := writeFiles(t, t.TempDir(), ca.CertPEM, node)
		if err := os.Remove(files.Key); err != nil {
			t.Fatal(err)
		}

		if _, err := certs.NewSource(files); !errors.Is(err, fs.ErrNotExist) {
			t.Fatalf("NewSource error = %v, want fs.ErrNotExist", err)
		}
	})
}

// TestCutBundleRefused: a CA bundle (or certificate) cut inside its last
// block, as a writer that dies leaves it, is refused and the running
// material stays, whichever CA the cut one is; annotated bundles, with
// text between blocks as openssl x509 -text writes it, load.
func TestCutBundleRefused(t *testing.T) {
	t.Parallel()

	dir := t.TempDir()
	ca1, ca2 := testpki.NewCA(t, "cluster"), testpki.NewCA(t, "other")
	node := issueNode(t, ca1, pki.KeyECDSA)
	annotated := slices.Concat([]byte("Certificate:\n    Data:\n        Version: 3 (0x2)\n"), ca1.CertPEM, []byte("# the other CA\n"), ca2.CertPEM)
	files := writeFiles(t, dir, annotated, node)
	src := testpki.Must[*certs.Source](t)(certs.NewSource(files))

	if n := len(src.CAs()); n != 2 {
		t.Fatalf("annotated bundle: %d CAs, want 2", n)
	}

	before := src.Generation()
	for name, bundle := range map[string][]byte{
		"the other CA cut":   slices.Concat(ca1.CertPEM, ca2.CertPEM[:len(ca2.CertPEM)-40]),
		"the cluster CA cut": slices.Concat(ca2.CertPEM, ca1.CertPEM[:len(ca1.CertPEM)/2]),
		"cut in its header":  slices.Concat(ca1.CertPEM, []byte("-----BEGIN CERT")),
		"cut in its marker":  slices.Concat(ca1.CertPEM, []byte("-----BE")),
	} {
		writeFiles(t, dir, bundle, node)

		changed, err := src.Reload()
		if changed || err == nil || !strings.Contains(err.Error(), "cut short") {
			t.Errorf("%s: Reload = %v, %v; want refused as cut short", name, changed, err)
		}

		if src.Generation() != before || len(src.CAs()) != 2 {
			t.Errorf("%s: the running material changed", name)
		}
	}

	cutCert := pair{cert: node.cert[:len(node.cert)-30], key: node.key}
	writeFiles(t, dir, ca1.CertPEM, cutCert)
	if _, err := src.Reload(); err == nil || !strings.Contains(err.Error(), "cut short") {
		t.Errorf("a cut certificate: %v", err)
	}

	if _, err := certs.NewSource(files); err == nil {
		t.Error("NewSource accepted a cut certificate")
	}
}
