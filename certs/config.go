package certs

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
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
}

// ServerConfig returns the config for the gateway listener. Every handshake
// uses the certificate and CA pool current in src at that moment, so a reload
// affects new connections only. Clients must present a certificate that
// chains to the pool and lists the clientAuth extended key usage (serverAuth
// alongside it is accepted; a certificate without extended key usages is
// not). ALPN offers only h2 and session tickets are off, so every connection
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
		VerifyConnection:       requireClientAuthUsage,
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

// requireClientAuthUsage closes the gap left by crypto/x509, which treats a
// leaf without extended key usages as valid for any purpose.
func requireClientAuthUsage(cs tls.ConnectionState) error {
	if len(cs.PeerCertificates) == 0 {
		return errors.New("tls: client certificate required")
	}

	leaf := cs.PeerCertificates[0]
	if !slices.Contains(leaf.ExtKeyUsage, x509.ExtKeyUsageClientAuth) {
		return fmt.Errorf("tls: client certificate %q does not allow client authentication", leaf.Subject.CommonName)
	}

	return nil
}

// ClientConfig returns the config for dialling the apid at serverName (a host
// name or IP address, without port; IPv6 brackets are ignored) with this
// node's certificate. The certificate offered and the CA pool the server is
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
			return src.Certificate(), nil
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
