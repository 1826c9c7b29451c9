package pki_test

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testpki"
	"github.com/apid/apid/pki"
	"net"
	"slices"
	"testing"
	"time"
)

func TestNewCA(t *testing.T) {
	t.Parallel()

	for _, kt := range []pki.KeyType{pki.KeyECDSA, pki.KeyEd25519} {
		t.Run(kt.String(), func(t *testing.T) {
			t.Parallel()

			ca := testpki.Must[*pki.CA](t)(pki.NewCA("cluster", time.Hour, kt))
			c := ca.Cert

			if !c.IsCA || !c.BasicConstraintsValid || c.MaxPathLen != 0 || !c.MaxPathLenZero ||
				c.KeyUsage&x509.KeyUsageCertSign == 0 || c.Subject.CommonName != "cluster" {
				t.Errorf("CA certificate: %+v", c)
			}

			if err := c.CheckSignatureFrom(c); err != nil {
				t.Errorf("not self-signed: %v", err)
			}

			checkValidity(t, c, time.Hour)

			loaded := testpki.Must[*pki.CA](t)(pki.LoadCA(ca.CertPEM, ca.KeyPEM))
			if !loaded.Cert.Equal(c) {
				t.Error("LoadCA returned another certificate")
			}

			switch kt {
			case pki.KeyECDSA:
				if _, ok := loaded.Key.(*ecdsa.PrivateKey); !ok {
					t.Errorf("key %T", loaded.Key)
				}
			case pki.KeyEd25519:
				if _, ok := loaded.Key.(ed25519.PrivateKey); !ok {
					t.Errorf("key %T", loaded.Key)
				}
			}
		})
	}
}

// checkValidity checks the rules every issued certificate follows.
func checkValidity(t *testing.T, c *x509.Certificate, ttl time.Duration) {
	t.Helper()

	now := time.Now()

	if c.SerialNumber.Sign() <= 0 || c.SerialNumber.BitLen() > 128 || c.SerialNumber.BitLen() < 64 {
		t.Errorf("serial %x is not a positive random 128-bit number", c.SerialNumber)
	}

	if !c.NotBefore.Before(now.Add(-50*time.Second)) || c.NotBefore.Before(now.Add(-2*time.Minute)) {
		t.Errorf("NotBefore %s is not about a minute ago", c.NotBefore)
	}

	if d := c.NotAfter.Sub(now); d > ttl || d < ttl-time.Minute {
		t.Errorf("NotAfter %s is not %s from now", c.NotAfter, ttl)
	}
}

func parseCert(t *testing.T, certPEM []byte) *x509.Certificate {
	t.Helper()

	block, _ := pem.Decode(certPEM)
	if block == nil || block.Type != "CERTIFICATE" {
		t.Fatal("no CERTIFICATE block")
	}

	return testpki.Must[*x509.Certificate](t)(x509.ParseCertificate(block.Bytes))
}

func TestIssue(t *testing.T) {
	t.Parallel()

	ca := testpki.NewCA(t, "cluster")
	roots := testpki.Pool(t, ca.CertPEM)

	t.Run("node", func(t *testing.T) {
		t.Parallel()

		ips := []net.IP{net.ParseIP("10.0.0.1"), net.ParseIP("fd00::1")}

		certPEM, keyPEM, err := ca.IssueNode("cp-1.example", []string{"cp-1.example"}, ips, time.Hour, pki.KeyEd25519)
		if err != nil {
			t.Fatal(err)
		}

		c := parseCert(t, certPEM)
		checkValidity(t, c, time.Hour)

		if !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) {
			t.Errorf("EKU %v: a serving certificate is never a client's", c.ExtKeyUsage)
		}

		if len(certs.Roles(c)) != 0 || c.Subject.CommonName != "cp-1.example" {
			t.Errorf("subject %v", c.Subject)
		}

		fwdPEM, _, err := ca.IssueForwarding("cp-1.example", time.Hour, pki.KeyEd25519)
		if err != nil {
			t.Fatal(err)
		}

		fwd := parseCert(t, fwdPEM)
		if !slices.Equal(fwd.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) ||
			!slices.Equal(certs.Roles(fwd), []string{certs.RoleImpersonator}) || fwd.Subject.CommonName != "cp-1.example" {
			t.Errorf("forwarding identity: EKU %v, subject %v; want clientAuth only, O=os:impersonator", fwd.ExtKeyUsage, fwd.Subject)
		}

		for _, name := range []string{"cp-1.example", "10.0.0.1", "fd00::1"} {
			_, err := c.Verify(x509.VerifyOptions{Roots: roots, DNSName: name, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}})
			if err != nil {
				t.Errorf("verify as %s: %v", name, err)
			}
		}

		if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
			t.Errorf("certificate and key do not pair: %v", err)
		}
	})

	t.Run("client", func(t *testing.T) {
		t.Parallel()

		roles := []string{certs.RoleOperator, "custom:role"}

		certPEM, keyPEM, err := ca.IssueClient("alice", roles, 24*time.Hour, pki.KeyECDSA)
		if err != nil {
			t.Fatal(err)
		}

		c := parseCert(t, certPEM)
		checkValidity(t, c, 24*time.Hour)

		if !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) || len(c.DNSNames)+len(c.IPAddresses) != 0 {
			t.Errorf("EKU %v, SANs %v %v", c.ExtKeyUsage, c.DNSNames, c.IPAddresses)
		}

		got := certs.Roles(c)
		slices.Sort(got)

		if want := slices.Sorted(slices.Values(roles)); !slices.Equal(got, want) {
			t.Errorf("roles %q, want %q", got, want)
		}

		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Error(err)
		}

		block, _ := pem.Decode(keyPEM)
		if block.Type != "PRIVATE KEY" {
			t.Errorf("key PEM type %q", block.Type)
		}

		if _, err := tls.X509KeyPair(certPEM, keyPEM); err != nil {
			t.Error(err)
		}
	})

	t.Run("validity cut at the CA's", func(t *testing.T) {
		t.Parallel()

		certPEM, _, err := ca.IssueClient("c", []string{certs.RoleAdmin}, 48*time.Hour, pki.KeyECDSA)
		if err != nil {
			t.Fatal(err)
		}

		if c := parseCert(t, certPEM); !c.NotAfter.Equal(ca.Cert.NotAfter) {
			t.Errorf("NotAfter %s, want the CA's %s", c.NotAfter, ca.Cert.NotAfter)
		}
	})

	t.Run("serials differ", func(t *testing.T) {
		t.Parallel()

		a := parseCert(t, issueClient(t, ca, certs.RoleReader).cert)
		b := parseCert(t, issueClient(t, ca, certs.RoleReader).cert)

		if a.SerialNumber.Cmp(b.SerialNumber) == 0 {
			t.Error("two certificates share a serial number")
		}
	})

	t.Run("refused", func(t *testing.T) {
		t.Parallel()

		errs := map[string]error{}
		_, _, errs["node without SANs"] = ca.IssueNode("n", nil, nil, time.Hour, pki.KeyECDSA)
		_, _, errs["node without name"] = ca.IssueNode("", []string{"n"}, nil, time.Hour, pki.KeyECDSA)
		_, _, errs["client without roles"] = ca.IssueClient("c", nil, time.Hour, pki.KeyECDSA)
		_, _, errs["client with empty role"] = ca.IssueClient("c", []string{""}, time.Hour, pki.KeyECDSA)
		_, _, errs["zero ttl"] = ca.IssueClient("c", []string{certs.RoleAdmin}, 0, pki.KeyECDSA)
		_, _, errs["unknown key type"] = ca.IssueClient("c", []string{certs.RoleAdmin}, time.Hour, pki.KeyType(9))

		for name, err := range errs {
			if err == nil {
				t.Errorf("%s: no error", name)
			}
		}
	})
}

func TestLoadCA(t *testing.T) {
	t.Parallel()

	ca := testpki.Must[*pki.CA](t)(pki.NewCA("cluster", time.Hour, pki.KeyEd25519))
	other := testpki.NewCA(t, "other")

	// Talos stores Ed25519 keys as PKCS#8 under its own label.
	block, _ := pem.Decode(ca.KeyPEM)
	talosKey := pem.EncodeToMemory(&pem.Block{Type: "ED25519 PRIVATE KEY", Bytes: block.Bytes})

	loaded := testpki.Must[*pki.CA](t)(pki.LoadCA(ca.CertPEM, talosKey))
	if _, _, err := loaded.IssueClient("c", []string{certs.RoleAdmin}, time.Minute, pki.KeyECDSA); err != nil {
		t.Fatal(err)
	}

	// SEC 1 ECDSA keys load too.
	ecKey := other.Key.(*ecdsa.PrivateKey)
	sec1 := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: testpki.Must[[]byte](t)(x509.MarshalECPrivateKey(ecKey))})

	if _, err := pki.LoadCA(other.CertPEM, sec1); err != nil {
		t.Fatal(err)
	}

	leaf := issueClient(t, ca, certs.RoleAdmin)

	for name, in := range map[string][2][]byte{
		"key of another CA": {ca.CertPEM, other.KeyPEM},
		"leaf certificate":  {leaf.cert, leaf.key},
		"no certificate":    {nil, ca.KeyPEM},
		"no key":            {ca.CertPEM, ca.CertPEM},
	} {
		if _, err := pki.LoadCA(in[0], in[1]); err == nil {
			t.Errorf("%s: loaded", name)
		}
	}
}

func TestParseKeyType(t *testing.T) {
	t.Parallel()

	for in, want := range map[string]pki.KeyType{"ecdsa": pki.KeyECDSA, "P256": pki.KeyECDSA, "Ed25519": pki.KeyEd25519} {
		if got, err := pki.ParseKeyType(in); err != nil || got != want {
			t.Errorf("ParseKeyType(%q) = %v, %v", in, got, err)
		}
	}

	if _, err := pki.ParseKeyType("rsa"); err == nil {
		t.Error("rsa accepted")
	}
}

// issued is a certificate and key in PEM.
type issued struct{ cert, key []byte }

func issueClient(t *testing.T, ca *pki.CA, roles ...string) issued {
	t.Helper()
	crt, key, err := ca.IssueClient("client", roles, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	return issued{crt, key}
}
