package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"strings"
)

// alpnH2 is the only application protocol apid speaks: gRPC over HTTP/2.
var alpnH2 = []string{"h2"}

// tls12Suites are the TLS 1.2 suites allowed with ServerOptions.AllowTLS12:
// forward-secret AEADs only. TLS 1.3 suites are not configurable in Go.
var tls12Suites = []uint16{
	tls.TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
	tls.TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
	tls.TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
}

// ServerOptions adjusts ServerConfig. The zero value is the recommended
// setting. Handshake timeouts belong to the listener (grpc.ConnectionTimeout)
// and are not set here.
type ServerOptions struct {
	// AllowTLS12 admits TLS 1.2 clients, limited to ECDHE with AES-256-GCM
	// or ChaCha20-Poly1305. Off by default: TLS 1.3 is required.
	AllowTLS12 bool
	// AllowCombinedClientCertificates also admits client certificates
	// whose extended key usage is serverAuth and clientAuth (apid node
	// certificates made before the forwarding identity was separate), for
	// a rolling upgrade. Off by default: Talos's rule, exactly clientAuth.
	AllowCombinedClientCertificates bool
}

// ServerConfig returns the config for the gateway listener. Every handshake
// uses the certificate and CA pool current in src at that moment, so a reload
// affects new connections only. Clients must present a certificate that
// chains to the pool and whose extended key usage is exactly clientAuth, as
// Talos requires (CheckClientUsage). ALPN offers only h2 and session tickets are off, so every connection
// is fully verified against the current pool.
func ServerConfig(src *Source, opts ServerOptions) *tls.Config {
	cfg := serverConfig(nil, nil, opts)
	cfg.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		m := src.current.Load()

		return serverConfig(m.cert, m.pool, opts), nil
	}

	return cfg
}

func serverConfig(cert *tls.Certificate, pool *x509.CertPool, opts ServerOptions) *tls.Config {
	cfg := &tls.Config{
		MinVersion:             tls.VersionTLS13,
		NextProtos:             alpnH2,
		SessionTicketsDisabled: true,
		ClientAuth:             tls.RequireAndVerifyClientCert,
		ClientCAs:              pool,
		VerifyConnection: func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("tls: client certificate required")
			}
			return CheckClientUsage(cs.PeerCertificates, opts.AllowCombinedClientCertificates)
		},
	}

	if cert != nil {
		cfg.Certificates = []tls.Certificate{*cert}
	}

	if opts.AllowTLS12 {
		cfg.MinVersion = tls.VersionTLS12
		cfg.CipherSuites = tls12Suites
	}

	return cfg
}

// CheckClientUsage applies Talos's rule to a client's certificate chain:
// every certificate that is not a CA must have exactly clientAuth as its
// extended key usage (crypto/x509 alone would accept a leaf without any,
// or one that is also a server certificate). allowCombined also accepts
// serverAuth beside clientAuth. The error begins with Talos's words and
// adds what was found.
func CheckClientUsage(chain []*x509.Certificate, allowCombined bool) error {
	for _, c := range chain {
		if c.IsCA {
			continue
		}
		if clientUsageOK(c, allowCombined) {
			continue
		}
		want := "exactly clientAuth"
		if allowCombined {
			want = "clientAuth, optionally with serverAuth"
		}
		return fmt.Errorf("certificate %q is missing the client auth extended key usage: a client certificate must have %s, this one has %s",
			c.Subject.String(), want, describeUsage(c))
	}
	return nil
}

func clientUsageOK(c *x509.Certificate, allowCombined bool) bool {
	if len(c.UnknownExtKeyUsage) > 0 {
		return false
	}
	switch {
	case slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}):
		return true
	case allowCombined && len(c.ExtKeyUsage) == 2 &&
		slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageClientAuth) && slices.Contains(c.ExtKeyUsage, x509.ExtKeyUsageServerAuth):
		return true
	}
	return false
}

// CheckForwardingCertificate refuses a forwarding identity that Talos's
// apid (and apid's own default rule) would refuse, or whose forwarded roles
// it would ignore: its extended key usage must be exactly clientAuth and it
// must carry os:impersonator.
func CheckForwardingCertificate(c *x509.Certificate) error {
	if err := CheckClientUsage([]*x509.Certificate{c}, false); err != nil {
		return fmt.Errorf("%w (apid gen node writes a forwarding certificate)", err)
	}
	if !slices.Contains(Roles(c), RoleImpersonator) {
		return fmt.Errorf("certificate %q lacks the %s role: the next node would ignore the roles it forwards (apid gen node writes a forwarding certificate)",
			c.Subject.String(), RoleImpersonator)
	}
	return nil
}

// describeUsage names a certificate's extended key usages.
func describeUsage(c *x509.Certificate) string {
	var names []string
	for _, u := range c.ExtKeyUsage {
		switch u {
		case x509.ExtKeyUsageClientAuth:
			names = append(names, "clientAuth")
		case x509.ExtKeyUsageServerAuth:
			names = append(names, "serverAuth")
		case x509.ExtKeyUsageAny:
			names = append(names, "any")
		default:
			names = append(names, fmt.Sprintf("usage %d", u))
		}
	}
	for _, oid := range c.UnknownExtKeyUsage {
		names = append(names, oid.String())
	}
	if len(names) == 0 {
		return "none"
	}
	return strings.Join(names, ", ")
}

// ClientConfig returns the config for dialling the apid at serverName (a host
// name or IP address, without port; IPv6 brackets are ignored) with this
// node's forwarding identity (Source.ClientCertificate). The certificate offered and the CA pool the server is
// verified against are read from src on every handshake, so connections
// dialled after a reload use the new material. The server certificate must
// name serverName (a DNS name or an IP address, IPv6 without brackets) and
// allow server authentication.
//
// Build one config per target: the name is captured by the verification,
// because crypto/tls does not pass an IP-address ServerName to it.
func ClientConfig(src *Source, serverName string) *tls.Config {
	return &tls.Config{
		ServerName: serverName,
		MinVersion: tls.VersionTLS13,
		NextProtos: alpnH2,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return src.ClientCertificate(), nil
		},
		// The built-in verification would pin RootCAs at config creation;
		// VerifyConnection below does the same checks against the pool
		// current at handshake time.
		InsecureSkipVerify: true, //nolint:gosec
		VerifyConnection: func(cs tls.ConnectionState) error {
			return verifyServer(cs, src.Pool(), serverName)
		},
	}
}

func verifyServer(cs tls.ConnectionState, pool *x509.CertPool, name string) error {
	if name == "" {
		return errors.New("tls: no server name to verify the server certificate against")
	}

	if len(cs.PeerCertificates) == 0 {
		return errors.New("tls: server presented no certificate")
	}

	opts := x509.VerifyOptions{
		Roots:         pool,
		DNSName:       name,
		Intermediates: x509.NewCertPool(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}

	for _, c := range cs.PeerCertificates[1:] {
		opts.Intermediates.AddCert(c)
	}

	if _, err := cs.PeerCertificates[0].Verify(opts); err != nil {
		return &tls.CertificateVerificationError{UnverifiedCertificates: cs.PeerCertificates, Err: err}
	}

	return nil
}
