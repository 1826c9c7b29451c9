package certs_test

import (
	"crypto/tls"
	"crypto/x509"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testpki"
	"github.com/apid/apid/pki"
	"slices"
	"strings"
	"testing"
	"time"
)

// gateway starts a ServerConfig listener for a fresh CA and node certificate
// and returns the CA so that tests can issue clients for it.
func gateway(t *testing.T, opts certs.ServerOptions) (*pki.CA, *tlsServer) {
	t.Helper()

	ca := testpki.NewCA(t, "cluster")
	files := writeFiles(t, t.TempDir(), ca.CertPEM, issueNode(t, ca, pki.KeyECDSA))
	src := testpki.Must[*certs.Source](t)(certs.NewSource(files))

	return ca, startTLSServer(t, certs.ServerConfig(src, opts))
}

func TestServerConfigClientCertificates(t *testing.T) {
	t.Parallel()

	ca, srv := gateway(t, certs.ServerOptions{})
	other := testpki.NewCA(t, "other")
	roots := testpki.Pool(t, ca.CertPEM)

	reader := issueClient(t, ca, certs.RoleReader, certs.RoleOperator, certs.RoleReader, "custom:role")
	both := craft(t, ca, &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}})
	expired := craft(t, ca, &x509.Certificate{
		NotBefore:   time.Now().Add(-2 * time.Hour),
		NotAfter:    time.Now().Add(-time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	notYetValid := craft(t, ca, &x509.Certificate{
		NotBefore:   time.Now().Add(time.Hour),
		NotAfter:    time.Now().Add(2 * time.Hour),
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	})
	wrongCA := issueClient(t, other, certs.RoleAdmin)
	selfSigned := craft(t, nil, &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}})
	serverOnly := craft(t, ca, &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	noEKU := craft(t, ca, &x509.Certificate{})

	tests := []struct {
		name      string
		client    *pair
		wantRoles []string // nil: refused
	}{
		{"valid client", &reader, []string{certs.RoleReader, certs.RoleOperator, "custom:role"}},
		{"clientAuth and serverAuth (Talos refuses it)", &both, nil},
		{"expired", &expired, nil},
		{"not yet valid", &notYetValid, nil},
		{"other CA", &wrongCA, nil},
		{"self-signed", &selfSigned, nil},
		{"no client certificate", nil, nil},
		{"serverAuth only", &serverOnly, nil},
		{"no extended key usage", &noEKU, nil},
	}

	// The server reports handshakes in connection order, so the cases run
	// one after another.
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := dial(t, srv.addr, clientConfig(t, roots, tt.client))
			h := srv.next(t)

			if tt.wantRoles == nil {
				if err == nil || h.err == nil {
					t.Fatalf("accepted: client error %v, server error %v", err, h.err)
				}

				return
			}

			if err != nil || h.err != nil {
				t.Fatalf("refused: client error %v, server error %v", err, h.err)
			}

			// DER sorts the values of the Organization attribute set, so the
			// order read back is not the order issued.
			got := certs.Roles(h.state.PeerCertificates[0])
			slices.Sort(got)
			slices.Sort(tt.wantRoles)

			if !slices.Equal(got, tt.wantRoles) {
				t.Errorf("roles = %q, want %q", got, tt.wantRoles)
			}

			if h.state.Version != tls.VersionTLS13 || h.state.NegotiatedProtocol != "h2" && h.state.NegotiatedProtocol != "" {
				t.Errorf("version %x, protocol %q", h.state.Version, h.state.NegotiatedProtocol)
			}
		})
	}
}

// TestServerConfigAllowsCombinedClientCertificates: the rolling-upgrade
// switch admits serverAuth beside clientAuth, and nothing else more.
func TestServerConfigAllowsCombinedClientCertificates(t *testing.T) {
	t.Parallel()

	ca, srv := gateway(t, certs.ServerOptions{AllowCombinedClientCertificates: true})
	roots := testpki.Pool(t, ca.CertPEM)
	both := craft(t, ca, &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}})
	serverOnly := craft(t, ca, &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
	extra := craft(t, ca, &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageCodeSigning}})

	for _, tc := range []struct {
		name   string
		client pair
		ok     bool
	}{{"serverAuth and clientAuth", both, true}, {"serverAuth only", serverOnly, false}, {"clientAuth and codeSigning", extra, false}} {
		_, err := dial(t, srv.addr, clientConfig(t, roots, &tc.client))
		h := srv.next(t)
		if ok := err == nil && h.err == nil; ok != tc.ok {
			t.Errorf("%s: accepted %v, want %v (client %v, server %v)", tc.name, ok, tc.ok, err, h.err)
		}
	}
}

// TestClientUsageErrorsSpeakTalos: the refusal begins with Talos's text
// and says what the certificate has.
func TestClientUsageErrorsSpeakTalos(t *testing.T) {
	t.Parallel()

	ca := testpki.NewCA(t, "cluster")
	both := craft(t, ca, &x509.Certificate{ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}})
	leaf := testpki.Must[tls.Certificate](t)(tls.X509KeyPair(both.cert, both.key)).Leaf
	err := certs.CheckClientUsage([]*x509.Certificate{leaf}, false)
	want := `certificate "CN=crafted,O=os:admin" is missing the client auth extended key usage: a client certificate must have exactly clientAuth, this one has serverAuth, clientAuth`
	if err == nil || err.Error() != want {
		t.Fatalf("got %v\nwant %s", err, want)
	}
	if err := certs.CheckForwardingCertificate(leaf); err == nil {
		t.Fatal("a combined certificate accepted as a forwarding identity")
	}
	reader := issueClient(t, ca, certs.RoleReader)
	if err := certs.CheckForwardingCertificate(reader.tls(t).Leaf); err == nil || !strings.Contains(err.Error(), "lacks the os:impersonator role") {
		t.Fatalf("a forwarding certificate without os:impersonator: %v", err)
	}
	fc, fk, err := ca.IssueForwarding("cp-1", time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	if err := certs.CheckForwardingCertificate(pair{cert: fc, key: fk}.tls(t).Leaf); err != nil {
		t.Fatalf("IssueForwarding's certificate refused: %v", err)
	}
}

func TestServerConfigTLS12(t *testing.T) {
	t.Parallel()

	tls12 := func(t *testing.T, roots *x509.CertPool, p pair, suite uint16) *tls.Config {
		cfg := clientConfig(t, roots, &p)
		cfg.MaxVersion = tls.VersionTLS12
		cfg.CipherSuites = []uint16{suite}

		return cfg
	}

	t.Run("refused by default", func(t *testing.T) {
		t.Parallel()

		ca, srv := gateway(t, certs.ServerOptions{})
		cfg := tls12(t, testpki.Pool(t, ca.CertPEM), issueClient(t, ca, certs.RoleAdmin), tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384)

		if _, err := dial(t, srv.addr, cfg); err == nil {
			t.Fatal("TLS 1.2 client accepted")
		}

		if h := srv.next(t); h.err == nil {
			t.Fatal("server completed a TLS 1.2 handshake")
		}
	})

	t.Run("allowed", func(t *testing.T) {
		t.Parallel()

		ca, srv := gateway(t, certs.ServerOptions{AllowTLS12: true})
		roots := testpki.Pool(t, ca.CertPEM)
		client := issueClient(t, ca, certs.RoleAdmin)

		// The node key is ECDSA, so only the ECDSA half of the allowed
		// suites can be negotiated; the RSA half is checked on the config.
		for _, suite := range []uint16{
			tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
			tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
		} {
			if _, err := dial(t, srv.addr, tls12(t, roots, client, suite)); err != nil {
				t.Fatalf("%s refused: %v", tls.CipherSuiteName(suite), err)
			}

			h := srv.next(t)
			if h.err != nil || h.state.Version != tls.VersionTLS12 || h.state.CipherSuite != suite {
				t.Fatalf("%s: server error %v, version %x, suite %s", tls.CipherSuiteName(suite),
					h.err, h.state.Version, tls.CipherSuiteName(h.state.CipherSuite))
			}
		}

		// A suite outside the list is refused even though Go supports it.
		weak := tls12(t, roots, client, tls.TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256)
		if _, err := dial(t, srv.addr, weak); err == nil {
			t.Fatal("AES-128 suite accepted")
		}

		srv.next(t)
	})
}

func TestServerConfigSettings(t *testing.T) {
	t.Parallel()

	ca := testpki.NewCA(t, "cluster")
	src := testpki.Must[*certs.Source](t)(certs.NewSource(writeFiles(t, t.TempDir(), ca.CertPEM, issueNode(t, ca, pki.KeyECDSA))))

	for _, opts := range []certs.ServerOptions{{}, {AllowTLS12: true}} {
		outer := certs.ServerConfig(src, opts)

		cfg, err := outer.GetConfigForClient(&tls.ClientHelloInfo{})
		if err != nil {
			t.Fatal(err)
		}

		wantMin, wantSuites := uint16(tls.VersionTLS13), []uint16(nil)
		if opts.AllowTLS12 {
			wantMin = tls.VersionTLS12
			wantSuites = []uint16{
				tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
				tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
				tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
				tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
			}
		}

		for _, c := range []*tls.Config{outer, cfg} {
			if c.MinVersion != wantMin || !slices.Equal(c.CipherSuites, wantSuites) ||
				!slices.Equal(c.NextProtos, []string{"h2"}) || !c.SessionTicketsDisabled ||
				c.ClientAuth != tls.RequireAndVerifyClientCert {
				t.Errorf("%+v: min %x suites %x protos %q tickets off %v auth %v", opts,
					c.MinVersion, c.CipherSuites, c.NextProtos, c.SessionTicketsDisabled, c.ClientAuth)
			}
		}

		if len(cfg.Certificates) != 1 || cfg.Certificates[0].Leaf != src.Certificate().Leaf || cfg.ClientCAs != src.Pool() {
			t.Errorf("%+v: per-handshake config does not use the current material", opts)
		}
	}
}
