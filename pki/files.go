package pki

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// WriteFile writes data to path atomically: readers see either the old
// content or the new one, never a partial file. The file gets exactly perm,
// whatever the umask; private keys and talosconfigs must be written with
// 0o600.
//
// Unless force is set, an existing path is left alone and the returned error
// wraps fs.ErrExist. With force an existing file (or a symlink at path) is
// replaced.
func WriteFile(path string, data []byte, perm fs.FileMode, force bool) error {
	if !force {
		if _, err := os.Lstat(path); err == nil {
			return fmt.Errorf("write %s: %w", path, errExist)
		}
	}

	dir := filepath.Dir(path)

	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}

	tmpName := tmp.Name()

	// After a rename or fallback the name is gone and this is a no-op; after
	// a hard link it drops the extra name.
	defer os.Remove(tmpName) //nolint:errcheck

	err = writeAndClose(tmp, data, perm)
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}

	if force {
		err = os.Rename(tmpName, path)
	} else {
		err = linkNoReplace(tmpName, path)
	}

	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}

	// Make the new directory entry durable; a failure here does not undo
	// the write, so it is not reported.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}

	return nil
}

func writeAndClose(f *os.File, data []byte, perm fs.FileMode) error {
	err := f.Chmod(perm)
	if err == nil {
		_, err = f.Write(data)
	}

	if err == nil {
		err = f.Sync()
	}

	if cerr := f.Close(); err == nil {
		err = cerr
	}

	return err
}

// linkNoReplace publishes tmp at path only if nothing is there yet. A hard
// link fails atomically when path exists, which a check followed by a rename
// cannot guarantee; file systems without hard links fall back to that.
func linkNoReplace(tmp, path string) error {
	err := os.Link(tmp, path)
	if err == nil {
		return nil
	}

	if _, serr := os.Lstat(path); errors.Is(err, fs.ErrExist) || serr == nil {
		return errExist
	}

	return os.Rename(tmp, path)
}

// errExist reports an existing destination; it wraps fs.ErrExist so callers
// can test for it with errors.Is.
var errExist = fmt.Errorf("refusing to overwrite an existing file: %w", fs.ErrExist)
