package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/apid/apid/pki"
)

// TestCheckRefusesWhatCannotWork: each configuration below validates key
// by key but cannot work with the files it names; apid check says why on a
// line of its own naming the key, and serve refuses to start on it.
func TestCheckRefusesWhatCannotWork(t *testing.T) {
	dir := t.TempDir()
	other := filepath.Join(dir, "other")
	for _, args := range [][]string{
		{"gen", "ca", "-out", dir},
		{"gen", "ca", "-out", other, "-name", "another CA"},
		{"gen", "node", "-ca-dir", dir, "-out", dir, "-name", "cp-1", "-ip", "127.0.0.1"},
		{"gen", "client", "-ca-dir", dir, "-out", dir, "-name", "admin", "-roles", "os:admin"},
		{"gen", "node", "-ca-dir", other, "-out", other, "-name", "cp-9", "-ip", "127.0.0.1"},
	} {
		if _, _, err := runCmd(t, args...); err != nil {
			t.Fatalf("%v: %v", args, err)
		}
	}
	noSAN := craftServerCert(t, dir, "nosan")
	base := func(ca, cert, key string) string {
		return "ca: " + ca + "\ncert: " + cert + "\nkey: " + key + "\nbackend: 127.0.0.1:1\n"
	}
	own := base(dir+"/ca.crt", dir+"/cp-1.crt", dir+"/cp-1.key")
	fwd := "clientCert: " + dir + "/cp-1-client.crt\nclientKey: " + dir + "/cp-1-client.key\n"
	for _, tc := range []struct {
		name, config, want string
	}{
		{"the CA bundle lacks the node certificate's issuer", base(other+"/ca.crt", dir+"/cp-1.crt", dir+"/cp-1.key") + fwd,
			"does not hold the CA that issued cert"},
		{"a client certificate as the node certificate", base(dir+"/ca.crt", dir+"/admin.crt", dir+"/admin.key") + fwd,
			"does not allow server authentication"},
		{"a node certificate without SANs", base(dir+"/ca.crt", noSAN+".crt", noSAN+".key") + fwd,
			"names no DNS name or IP address (SAN)"},
		{"selfNames the certificate lacks", own + fwd + "selfNames: [127.0.0.1, cp-1, lb.example.internal]\n",
			`selfNames "lb.example.internal": cert`},
		{"a forwarding certificate Talos refuses", own + "clientCert: " + dir + "/admin.crt\nclientKey: " + dir + "/admin.key\n",
			"lacks the os:impersonator role"},
		{"a forwarding certificate of another CA", own + "clientCert: " + other + "/cp-9-client.crt\nclientKey: " + other + "/cp-9-client.key\n",
			"is not issued by a CA in ca"},
		{"a typo in a nested key", own + fwd + "limits:\n  bufferdBytes: 1MiB\n",
			"limits.bufferdBytes is not a configuration key: did you mean limits.bufferedBytes?"},
		{"no identity to forward with", own + "selfNames: [127.0.0.1, cp-1]\n",
			"clientCert: not set, and cert"},
		{"the forwarding key as the etcd client's", own + fwd + "disruption:\n  etcd:\n    endpoints: [https://127.0.0.1:2379]\n    ca: " + dir + "/ca.crt\n    cert: " + dir + "/cp-1-client.crt\n    key: " + dir + "/cp-1-client.key\n",
			"disruption.etcd.key " + dir + "/cp-1-client.key is also apid's own key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(dir, strings.ReplaceAll(tc.name, " ", "-")+".yaml")
			writeFile(t, file, tc.config)
			_, errOut, err := runCmd(t, "check", "-config", file)
			if err == nil || !strings.Contains(errOut+err.Error(), tc.want) {
				t.Fatalf("check: %v\n%s\nwant a problem containing %q", err, errOut, tc.want)
			}
			if strings.Contains(tc.want, "not a configuration key") {
				return // refused before anything is read
			}
			if err := runServeOnce(t, file); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("serve started anyway, or for another reason: %v", err)
			}
		})
	}

	// What works, but needs a word: a warning, not a failure.
	file := filepath.Join(dir, "wildcard.yaml")
	writeFile(t, file, own+fwd+"listen: \":50000\"\n")
	out, errOut, err := runCmd(t, "check", "-config", file)
	if err != nil || !strings.Contains(out, "configuration is valid") || !strings.Contains(errOut, "warning: listen :50000 is every address of this machine") {
		t.Fatalf("check of a wildcard listen: %v\n%s%s", err, out, errOut)
	}
	// Without disruption.etcd, the disruption budget is this gateway's
	// alone: a warning.
	if !strings.Contains(errOut, "warning: disruption.etcd: not set, so the disruption budget is this gateway's alone") {
		t.Errorf("check without disruption.etcd does not say the budget is per gateway:\n%s", errOut)
	}

	// A listen address the certificate lacks: a warning (behind a TCP
	// balancer clients may reach it by a name it carries).
	file = filepath.Join(dir, "listen.yaml")
	writeFile(t, file, own+fwd+"listen: 127.0.0.9:50000\n")
	if _, errOut, err := runCmd(t, "check", "-config", file); err != nil || !strings.Contains(errOut, "warning: listen 127.0.0.9:50000: cert") || !strings.Contains(errOut, "does not carry the IP address 127.0.0.9") {
		t.Fatalf("check of a listen address the certificate lacks: %v\n%s", err, errOut)
	}

	// Every bad value in one run, each with its key: values of the wrong
	// type and what validation finds in the rest.
	file = filepath.Join(dir, "types.yaml")
	writeFile(t, file, own+fwd+"nodeTimeout: 30\nlogFormat: txt\nmaxNodes: -1\n")
	_, errOut, err = runCmd(t, "check", "-config", file)
	for _, want := range []string{"nodeTimeout: 30 is not a duration: write 30s", `logFormat "txt"`, "maxNodes -1"} {
		if err == nil || !strings.Contains(errOut+err.Error(), want) {
			t.Errorf("check of bad values: %v\n%s\nwant %q", err, errOut, want)
		}
	}
}

// runServeOnce starts apid serve on file with a free listener and returns
// its error if it refuses to start; a gateway that starts is stopped.
func runServeOnce(t *testing.T, file string) error {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() {
		done <- run(ctx, []string{"serve", "-config", file, "-listen", "127.0.0.1:0", "-admin-listen", "", "-drain-delay", "0"}, io.Discard, io.Discard)
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(3 * time.Second):
		cancel()
		<-done
		return nil
	}
}

// craftServerCert writes name.crt and name.key into dir: a serverAuth
// certificate from dir's CA that names nothing, which apid gen refuses to
// make.
func craftServerCert(t *testing.T, dir, name string) string {
	t.Helper()
	ca, err := pki.ReadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: name},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca.Cert, key.Public(), ca.Key)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, _ := x509.MarshalPKCS8PrivateKey(key)
	base := filepath.Join(dir, name)
	writeFile(t, base+".crt", string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	writeFile(t, base+".key", string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})))
	return base
}

// TestGenRefusesFlagsOfAnotherKind: each kind takes its own flags only.
func TestGenRefusesFlagsOfAnotherKind(t *testing.T) {
	dir := t.TempDir()
	for _, args := range [][]string{
		{"gen", "ca", "-out", dir, "-roles", "os:admin"},
		{"gen", "ca", "-out", dir, "-ip", "1.2.3.4"},
		{"gen", "node", "-out", dir, "-name", "n", "-roles", "os:admin"},
		{"gen", "client", "-out", dir, "-name", "c", "-roles", "os:reader", "-ip", "1.2.3.4"},
	} {
		if _, _, err := runCmd(t, args...); err == nil || !strings.Contains(err.Error(), "flag provided but not defined") {
			t.Errorf("%v: %v, want the flag refused", args, err)
		}
	}
	if _, err := os.Stat(filepath.Join(dir, "ca.crt")); err == nil {
		t.Error("a refused gen ca wrote ca.crt")
	}
}

// TestServeWithoutArgumentsSaysHowToStart: no configuration at all is met
// with the ways to get one.
func TestServeWithoutArgumentsSaysHowToStart(t *testing.T) {
	_, _, err := runCmd(t, "serve")
	for _, want := range []string{"-config", "apid gen", "apid demo"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("serve without arguments: %v, want a hint naming %s", err, want)
		}
	}
}
