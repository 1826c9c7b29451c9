package pki

import (
	"github.com/apid/apid/certs"

	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"os"
	"slices"
	"strings"
	"time"
)

// backdate moves NotBefore into the past so that a certificate is usable
// at once on machines whose clocks run a little behind the issuer's.
const backdate = time.Minute

// KeyType selects the algorithm of a generated key.
type KeyType int

const (
	// KeyECDSA is ECDSA on P-256, the default.
	KeyECDSA KeyType = iota
	// KeyEd25519 is Ed25519.
	KeyEd25519
)

// String returns the name ParseKeyType accepts.
func (kt KeyType) String() string {
	switch kt {
	case KeyECDSA:
		return "ecdsa"
	case KeyEd25519:
		return "ed25519"
	default:
		return fmt.Sprintf("KeyType(%d)", int(kt))
	}
}

// ParseKeyType parses "ecdsa" (also "p256", "ecdsa-p256") or "ed25519",
// ignoring case.
func ParseKeyType(s string) (KeyType, error) {
	switch strings.ToLower(s) {
	case "ecdsa", "p256", "ecdsa-p256":
		return KeyECDSA, nil
	case "ed25519":
		return KeyEd25519, nil
	default:
		return 0, fmt.Errorf("unknown key type %q (want ecdsa or ed25519)", s)
	}
}

func (kt KeyType) generate() (crypto.Signer, error) {
	switch kt {
	case KeyECDSA:
		return ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case KeyEd25519:
		_, key, err := ed25519.GenerateKey(rand.Reader)

		return key, err
	default:
		return nil, fmt.Errorf("unsupported key type %v", kt)
	}
}

// CA is a certificate authority that issues apid node and client
// certificates.
type CA struct {
	// Cert is the CA certificate.
	Cert *x509.Certificate
	// Key signs issued certificates.
	Key crypto.Signer
	// CertPEM is Cert in PEM form.
	CertPEM []byte
	// KeyPEM is Key in PEM form; write it with mode 0o600.
	KeyPEM []byte
}

// NewCA creates a self-signed CA valid for ttl from now. It may sign leaf
// certificates only (path length zero).
func NewCA(commonName string, ttl time.Duration, kt KeyType) (*CA, error) {
	if commonName == "" {
		return nil, errors.New("new CA: empty common name")
	}

	key, err := kt.generate()
	if err != nil {
		return nil, fmt.Errorf("new CA: %w", err)
	}

	tmpl, err := template(commonName, nil, time.Now(), ttl)
	if err != nil {
		return nil, fmt.Errorf("new CA: %w", err)
	}

	tmpl.IsCA = true
	tmpl.BasicConstraintsValid = true
	tmpl.MaxPathLenZero = true
	tmpl.KeyUsage = x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature

	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("new CA: %w", err)
	}

	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("new CA: %w", err)
	}

	keyPEM, err := encodeKey(key)
	if err != nil {
		return nil, fmt.Errorf("new CA: %w", err)
	}

	return &CA{Cert: cert, Key: key, CertPEM: encodeCert(der), KeyPEM: keyPEM}, nil
}

// ReadCA loads the CA whose certificate and key are in the PEM files
// crtPath and keyPath. An error reading either wraps the os error (so a
// missing file is fs.ErrNotExist); one parsing them names the file.
func ReadCA(crtPath, keyPath string) (*CA, error) {
	crt, err := os.ReadFile(crtPath)
	if err != nil {
		return nil, err
	}
	key, err := os.ReadFile(keyPath)
	if err != nil {
		return nil, err
	}
	ca, err := LoadCA(crt, key)
	if err != nil {
		return nil, fmt.Errorf("%s, %s: %w", crtPath, keyPath, err)
	}
	return ca, nil
}

// LoadCA reads a CA from PEM. The key may be PKCS#8 ("PRIVATE KEY", also
// under the "ED25519 PRIVATE KEY" label Talos uses), SEC 1 ("EC PRIVATE
// KEY") or PKCS#1 ("RSA PRIVATE KEY"); it must match the certificate, which
// must be a CA allowed to sign certificates.
func LoadCA(certPEM, keyPEM []byte) (*CA, error) {
	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		return nil, errors.New("load CA: no PEM CERTIFICATE block")
	}

	cert, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}

	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, fmt.Errorf("load CA: certificate %q is not a CA", cert.Subject.CommonName)
	}

	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("load CA: certificate %q may not sign certificates", cert.Subject.CommonName)
	}

	key, err := decodeKey(keyPEM)
	if err != nil {
		return nil, fmt.Errorf("load CA: %w", err)
	}

	pub, ok := key.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(cert.PublicKey) {
		return nil, errors.New("load CA: private key does not match the certificate")
	}

	return &CA{
		Cert:    cert,
		Key:     key,
		CertPEM: encodeCert(cert.Raw),
		KeyPEM:  append([]byte(nil), keyPEM...),
	}, nil
}

// IssueNode issues an apid node's serving certificate for dnsNames and ips
// (extended key usage serverAuth only: it is never presented as a client;
// IssueForwarding makes the certificate a node forwards with). At least one
// DNS name or IP is required, or no client could verify it. Like
// IssueClient, it ends the validity with the CA's if ttl reaches past it.
func (ca *CA) IssueNode(commonName string, dnsNames []string, ips []net.IP, ttl time.Duration, kt KeyType) (certPEM, keyPEM []byte, err error) {
	if len(dnsNames) == 0 && len(ips) == 0 {
		return nil, nil, errors.New("issue node certificate: no DNS names or IP addresses")
	}

	tmpl, err := template(commonName, nil, time.Now(), ttl)
	if err != nil {
		return nil, nil, fmt.Errorf("issue node certificate: %w", err)
	}

	tmpl.DNSNames = dnsNames
	tmpl.IPAddresses = ips
	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}

	certPEM, keyPEM, err = ca.issue(tmpl, kt)
	if err != nil {
		return nil, nil, fmt.Errorf("issue node certificate: %w", err)
	}

	return certPEM, keyPEM, nil
}

// IssueForwarding issues a node's forwarding identity, the client
// certificate it presents to other nodes' apid, as Talos control planes
// hold it: Organization os:impersonator (so the next node honours the
// caller's roles it forwards), the node's name as common name, and
// clientAuth as the only extended key usage (Talos refuses any other).
func (ca *CA) IssueForwarding(commonName string, ttl time.Duration, kt KeyType) (certPEM, keyPEM []byte, err error) {
	return ca.IssueClient(commonName, []string{certs.RoleImpersonator}, ttl, kt)
}

// IssueClient issues a client certificate carrying roles as its Subject
// Organization, with clientAuth as its only extended key usage. Roles are
// not checked against the known names: authorization decides what an
// unknown one grants (nothing). The validity is ttl from now, cut short at
// the CA's own expiry.
func (ca *CA) IssueClient(commonName string, roles []string, ttl time.Duration, kt KeyType) (certPEM, keyPEM []byte, err error) {
	if len(roles) == 0 || slices.Contains(roles, "") {
		return nil, nil, errors.New("issue client certificate: roles must be non-empty strings, and at least one is needed")
	}

	tmpl, err := template(commonName, roles, time.Now(), ttl)
	if err != nil {
		return nil, nil, fmt.Errorf("issue client certificate: %w", err)
	}

	tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}

	certPEM, keyPEM, err = ca.issue(tmpl, kt)
	if err != nil {
		return nil, nil, fmt.Errorf("issue client certificate: %w", err)
	}

	return certPEM, keyPEM, nil
}

func (ca *CA) issue(tmpl *x509.Certificate, kt KeyType) (certPEM, keyPEM []byte, err error) {
	// Nothing verifies past the CA's expiry, so a longer validity would
	// only misinform whoever reads the certificate.
	if tmpl.NotAfter.After(ca.Cert.NotAfter) {
		tmpl.NotAfter = ca.Cert.NotAfter
	}

	if !tmpl.NotAfter.After(time.Now()) {
		return nil, nil, fmt.Errorf("CA expired at %s", ca.Cert.NotAfter.UTC().Format(time.RFC3339))
	}

	key, err := kt.generate()
	if err != nil {
		return nil, nil, err
	}

	tmpl.KeyUsage = x509.KeyUsageDigitalSignature
	tmpl.BasicConstraintsValid = true

	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		return nil, nil, err
	}

	keyPEM, err = encodeKey(key)
	if err != nil {
		return nil, nil, err
	}

	return encodeCert(der), keyPEM, nil
}

// template fills what every certificate shares: a random 128-bit serial, a
// backdated validity window and the subject.
func template(commonName string, organization []string, now time.Time, ttl time.Duration) (*x509.Certificate, error) {
	if commonName == "" {
		return nil, errors.New("empty common name")
	}

	if ttl <= 0 {
		return nil, fmt.Errorf("validity %s is not positive", ttl)
	}

	// Serial numbers must be positive: draw from [0, 2^128-1) and add one.
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	limit.Sub(limit, big.NewInt(1))

	serial, err := rand.Int(rand.Reader, limit)
	if err != nil {
		return nil, err
	}

	serial.Add(serial, big.NewInt(1))

	return &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			CommonName:   commonName,
			Organization: organization,
		},
		NotBefore: now.Add(-backdate),
		NotAfter:  now.Add(ttl),
	}, nil
}

func encodeCert(der []byte) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
}

// encodeKey writes PKCS#8, which tls.X509KeyPair (and so the Talos client)
// reads for every key type.
func encodeKey(key crypto.Signer) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}

	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

func decodeKey(data []byte) (crypto.Signer, error) {
	for rest := data; ; {
		var block *pem.Block

		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, errors.New("no PEM private key block")
		}

		if block.Type != "PRIVATE KEY" && !strings.HasSuffix(block.Type, " PRIVATE KEY") {
			continue
		}

		var (
			key any
			err error
		)

		switch block.Type {
		case "EC PRIVATE KEY":
			key, err = x509.ParseECPrivateKey(block.Bytes)
		case "RSA PRIVATE KEY":
			key, err = x509.ParsePKCS1PrivateKey(block.Bytes)
		default:
			key, err = x509.ParsePKCS8PrivateKey(block.Bytes)
		}

		if err != nil {
			return nil, fmt.Errorf("parse %s: %w", block.Type, err)
		}

		switch k := key.(type) {
		case *ecdsa.PrivateKey, *rsa.PrivateKey, ed25519.PrivateKey:
			return k.(crypto.Signer), nil
		default:
			return nil, fmt.Errorf("unsupported private key type %T", key)
		}
	}
}
