// Package testpki holds the helpers that the certs and pki tests share:
// a CA made in memory, CA pools and checked results.
package testpki

import (
	"crypto/x509"
	"os"
	"testing"
	"time"

	"github.com/apid/apid/pki"
)

// Must returns a function that returns v, failing t if err is not nil:
// Must[T](t)(f()) for a call f that returns a T and an error.
func Must[T any](t testing.TB) func(T, error) T {
	t.Helper()
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// NewCA returns a fresh ECDSA CA named name, valid for a day.
func NewCA(t testing.TB, name string) *pki.CA {
	t.Helper()
	return Must[*pki.CA](t)(pki.NewCA(name, 24*time.Hour, pki.KeyECDSA))
}

// Pool returns a pool of the certificates in pems.
func Pool(t testing.TB, pems ...[]byte) *x509.CertPool {
	t.Helper()
	p := x509.NewCertPool()
	for _, b := range pems {
		if !p.AppendCertsFromPEM(b) {
			t.Fatal("no certificates in PEM")
		}
	}
	return p
}

// ReadFile returns the content of path.
func ReadFile(t testing.TB, path string) []byte {
	t.Helper()
	return Must[[]byte](t)(os.ReadFile(path))
}
