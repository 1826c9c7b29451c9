package pki_test

import (
	"errors"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testpki"
	"github.com/apid/apid/pki"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
)

func TestWriteFile(t *testing.T) {
	t.Parallel()

	dir := t.TempDir()

	for _, perm := range []fs.FileMode{0o600, 0o644} {
		path := filepath.Join(dir, perm.String())

		if err := pki.WriteFile(path, []byte("first"), perm, false); err != nil {
			t.Fatal(err)
		}

		info, err := os.Stat(path)
		if err != nil {
			t.Fatal(err)
		}

		if info.Mode().Perm() != perm {
			t.Errorf("mode %v, want %v", info.Mode().Perm(), perm)
		}

		err = pki.WriteFile(path, []byte("second"), perm, false)
		if !errors.Is(err, fs.ErrExist) {
			t.Errorf("overwrite without force: error %v, want fs.ErrExist", err)
		}

		if got := string(testpki.ReadFile(t, path)); got != "first" {
			t.Errorf("refused write changed the file to %q", got)
		}

		if err := pki.WriteFile(path, []byte("third"), perm, true); err != nil {
			t.Fatal(err)
		}

		if got := string(testpki.ReadFile(t, path)); got != "third" {
			t.Errorf("forced write left %q", got)
		}
	}

	// No temporary files are left behind, refused or not.
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}

	if len(entries) != 2 {
		for _, e := range entries {
			t.Log(e.Name())
		}

		t.Errorf("%d entries in the directory, want 2", len(entries))
	}

	if err := pki.WriteFile(filepath.Join(dir, "missing", "f"), nil, 0o600, false); err == nil {
		t.Error("write into a missing directory succeeded")
	}
}

// TestDirWritePair: the certificate is public and its key private, and
// without Force neither is written when either exists.
func TestDirWritePair(t *testing.T) {
	t.Parallel()

	var wrote []string
	d := pki.Dir{Path: t.TempDir(), Wrote: func(crt, key string) { wrote = append(wrote, crt, key) }}

	crt, key, err := d.WritePair("n", []byte("cert"), []byte("key"))
	if err != nil {
		t.Fatal(err)
	}

	if crt != filepath.Join(d.Path, "n.crt") || key != filepath.Join(d.Path, "n.key") || !slices.Equal(wrote, []string{crt, key}) {
		t.Errorf("wrote %s and %s, told %v", crt, key, wrote)
	}

	for path, perm := range map[string]fs.FileMode{crt: 0o644, key: 0o600} {
		if info, err := os.Stat(path); err != nil || info.Mode().Perm() != perm {
			t.Errorf("%s: %v, %v; want mode %v", path, info, err, perm)
		}
	}

	if err := os.Remove(crt); err != nil {
		t.Fatal(err)
	}

	_, _, err = d.WritePair("n", []byte("new cert"), []byte("new key"))

	var exists *pki.ExistsError
	if !errors.Is(err, fs.ErrExist) || !errors.As(err, &exists) || exists.Path != key || err.Error() != key+" exists" {
		t.Fatalf("over an existing key: %v, want %s named as existing", err, key)
	}

	if _, err := os.Stat(crt); !errors.Is(err, fs.ErrNotExist) || len(wrote) != 2 {
		t.Errorf("the certificate was written beside a key that was kept: %v, told %v", err, wrote)
	}

	d.Force = true
	if _, _, err := d.WritePair("n", []byte("new cert"), []byte("new key")); err != nil {
		t.Fatal(err)
	}

	if got, _ := os.ReadFile(key); string(got) != "new key" {
		t.Errorf("forced: key %q", got)
	}
}

// TestDirWriteNode: a node's serving pair and forwarding identity, side by
// side as apid gen node writes them, each told as it is written.
func TestDirWriteNode(t *testing.T) {
	t.Parallel()

	ca := testpki.NewCA(t, "cluster")

	var wrote []string
	d := pki.Dir{Path: t.TempDir(), Wrote: func(crt, key string) { wrote = append(wrote, crt, key) }}

	f, err := d.WriteNode(ca, "cp-1", []string{"cp-1", "lb.example"}, []net.IP{net.ParseIP("10.0.0.1")}, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}

	want := pki.NodeFiles{
		Cert: filepath.Join(d.Path, "cp-1.crt"), Key: filepath.Join(d.Path, "cp-1.key"),
		ClientCert: filepath.Join(d.Path, "cp-1-client.crt"), ClientKey: filepath.Join(d.Path, "cp-1-client.key"),
	}
	if f != want || !slices.Equal(wrote, []string{want.Cert, want.Key, want.ClientCert, want.ClientKey}) {
		t.Fatalf("files %+v, told %v; want %+v", f, wrote, want)
	}

	for path, wantFwd := range map[string]bool{f.Cert: false, f.ClientCert: true} {
		data, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}

		c := parseCert(t, data)
		if fwd := slices.Equal(certs.Roles(c), []string{certs.RoleImpersonator}); fwd != wantFwd || c.Subject.CommonName != "cp-1" {
			t.Errorf("%s: subject %v", path, c.Subject)
		}

		if !wantFwd && !slices.Equal(c.DNSNames, []string{"cp-1", "lb.example"}) {
			t.Errorf("%s: DNS names %v", path, c.DNSNames)
		}
	}

	if _, err := d.WriteNode(ca, "cp-1", []string{"cp-1"}, nil, time.Hour, pki.KeyECDSA); !errors.Is(err, fs.ErrExist) {
		t.Errorf("over an existing node: %v", err)
	}
}
