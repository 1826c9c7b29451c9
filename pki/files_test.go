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
