package pki_test

import (
	"errors"
	"github.com/apid/apid/internal/testpki"
	"github.com/apid/apid/pki"
	"io/fs"
	"os"
	"path/filepath"
	"testing"
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

// TestWritePair: the certificate is public and its key private, and
// without force neither is written when either exists.
func TestWritePair(t *testing.T) {
	t.Parallel()

	dir := t.TempDir()
	crt, key := filepath.Join(dir, "n.crt"), filepath.Join(dir, "n.key")

	if err := pki.WritePair(crt, []byte("cert"), key, []byte("key"), false); err != nil {
		t.Fatal(err)
	}

	for path, perm := range map[string]fs.FileMode{crt: 0o644, key: 0o600} {
		if info, err := os.Stat(path); err != nil || info.Mode().Perm() != perm {
			t.Errorf("%s: %v, %v; want mode %v", path, info, err, perm)
		}
	}

	if err := os.Remove(crt); err != nil {
		t.Fatal(err)
	}

	if err := pki.WritePair(crt, []byte("new cert"), key, []byte("new key"), false); !errors.Is(err, fs.ErrExist) {
		t.Fatalf("over an existing key: %v, want fs.ErrExist", err)
	}

	if _, err := os.Stat(crt); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the certificate was written beside a key that was kept: %v", err)
	}

	if err := pki.WritePair(crt, []byte("new cert"), key, []byte("new key"), true); err != nil {
		t.Fatal(err)
	}

	if got, _ := os.ReadFile(key); string(got) != "new key" {
		t.Errorf("forced: key %q", got)
	}
}
