package files

import (
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// readChunkSize is the payload size of each message sent by Read.
const readChunkSize = 32 << 10

// bootIDPath is the kernel's boot ID, which Read serves from the simulated
// machine (WithBootID), or refuses: see bootIDRefused.
const bootIDPath = "/proc/sys/kernel/random/boot_id"

// bootIDRefused answers a request for the boot ID. talosctl reboot and
// upgrade read it before and after the operation and wait until it changes,
// which the host's never does when the agent only simulates the reboot;
// they treat PermissionDenied as "cannot tell" and finish instead of waiting
// for their 30-minute timeout.
func bootIDRefused() error {
	return status.Errorf(codes.PermissionDenied,
		"%s is not served: the example agent simulates reboots, so the host's boot ID would never change", bootIDPath)
}

// Read streams a regular file under one of the read roots in chunks of
// 32 KiB. Paths outside the roots, including ones that leave them through
// ".." or a symlink, get PermissionDenied; missing files get NotFound. The
// kernel's boot ID is the simulated machine's (WithBootID), or gets
// PermissionDenied (see bootIDRefused).
func (rs *Roots) Read(req *machine.ReadRequest, stream grpc.ServerStreamingServer[common.Data]) (err error) {
	if rs.bootID != nil && rs.namesBootID(req.GetPath()) {
		return stream.Send(&common.Data{Bytes: []byte(rs.bootID() + "\n")})
	}
	f, err := rs.openForRead(req.GetPath())
	if err != nil {
		return err
	}
	defer f.Close()
	for {
		// A fresh buffer per chunk: a sent message must not change afterwards.
		buf := make([]byte, readChunkSize)
		n, rerr := f.Read(buf)
		if n > 0 {
			if err := stream.Send(&common.Data{Bytes: buf[:n]}); err != nil {
				return err
			}
		}
		switch {
		case errors.Is(rerr, io.EOF):
			return nil
		case rerr != nil:
			return fsStatus(rerr, codes.Unavailable)
		}
	}
}

// rootedPath is a path that passed the read-roots rule.
type rootedPath struct {
	clean string // the path as requested, cleaned
	real  string // clean with every symlink resolved
	root  string // the resolved read root that contains real
	rel   string // real relative to root; "." for the root itself
}

// resolve applies the read-roots rule to p, which must be absolute. It is
// shared by every method that touches files (Read, List, DiskUsage, Copy).
//
// The lexical check runs first so that paths outside the roots are refused
// without touching the file system (no existence probing). Symlinks are then
// resolved and the real path must lie inside a root. Callers go on to open
// what they need through an os.Root for rootedPath.root, which refuses any
// path that escapes it, so a symlink swapped in after the check cannot widen
// access.
func (rs *Roots) resolve(p string) (rootedPath, error) {
	if p == "" {
		return rootedPath{}, status.Error(codes.InvalidArgument, "path is required")
	}
	if !filepath.IsAbs(p) {
		return rootedPath{}, status.Errorf(codes.InvalidArgument, "path %q is not absolute", p)
	}
	clean := filepath.Clean(p)
	if containingRoot(clean, rs.allowed) == "" && containingRoot(clean, rs.resolved) == "" {
		return rootedPath{}, status.Errorf(codes.PermissionDenied, "%s is outside the readable roots (this agent reads under %s; apid agent -read-root adds directories)",
			clean, strings.Join(rs.allowed, ", "))
	}
	real, err := filepath.EvalSymlinks(clean)
	if errors.Is(err, fs.ErrNotExist) {
		return rootedPath{}, rs.missingStatus(clean, err)
	}
	if err != nil {
		return rootedPath{}, fsStatus(err, codes.Internal)
	}
	root := containingRoot(real, rs.resolved)
	if root == "" {
		return rootedPath{}, status.Errorf(codes.PermissionDenied, "%s resolves outside the readable roots", clean)
	}
	rel, err := filepath.Rel(root, real)
	if err != nil {
		return rootedPath{}, status.Errorf(codes.Internal, "relate %s to %s: %v", real, root, err)
	}
	return rootedPath{clean: clean, real: real, root: root, rel: rel}, nil
}

// namesBootID reports whether p is the kernel's boot ID, written as such or
// through a symlink.
func (rs *Roots) namesBootID(p string) bool {
	if filepath.Clean(p) == bootIDPath {
		return true
	}
	rp, err := rs.resolve(p)
	return err == nil && rp.real == bootIDPath
}

// openForRead applies the read-roots rule to p (see resolve) and opens the
// regular file it names through an os.Root for its read root.
func (rs *Roots) openForRead(p string) (*os.File, error) {
	if filepath.Clean(p) == bootIDPath {
		return nil, bootIDRefused()
	}
	rp, err := rs.resolve(p)
	if err != nil {
		return nil, err
	}
	if rp.real == bootIDPath {
		return nil, bootIDRefused()
	}
	r, err := os.OpenRoot(rp.root)
	if err != nil {
		return nil, fsStatus(err, codes.Internal)
	}
	defer r.Close()
	// O_NONBLOCK keeps a FIFO from blocking the open; it is refused below.
	f, err := r.OpenFile(rp.rel, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		// Besides the errors fsStatus recognises, os.Root fails only when the
		// path escapes the root: the tree changed since it was resolved.
		return nil, fsStatus(err, codes.PermissionDenied)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, fsStatus(err, codes.Internal)
	}
	if !fi.Mode().IsRegular() {
		f.Close()
		return nil, status.Errorf(codes.InvalidArgument, "%s is not a regular file (%s)", rp.clean, fi.Mode().Type())
	}
	return f, nil
}

// missingStatus answers a request for a path that does not exist: NotFound
// if its nearest existing ancestor resolves inside the roots, otherwise
// PermissionDenied, so that a symlinked directory cannot be used to learn
// which files exist outside the roots.
func (rs *Roots) missingStatus(clean string, notExist error) error {
	for dir := filepath.Dir(clean); ; dir = filepath.Dir(dir) {
		if real, err := filepath.EvalSymlinks(dir); err == nil {
			if containingRoot(real, rs.resolved) == "" {
				return status.Errorf(codes.PermissionDenied, "%s resolves outside the readable roots", clean)
			}
			return fsStatus(notExist, codes.NotFound)
		}
		if dir == filepath.Dir(dir) {
			return fsStatus(notExist, codes.NotFound)
		}
	}
}

// containingRoot returns the first of roots that contains path (both clean
// and absolute), or "" if none does.
func containingRoot(path string, roots []string) string {
	for _, r := range roots {
		if path == r || strings.HasPrefix(path, strings.TrimSuffix(r, string(filepath.Separator))+string(filepath.Separator)) {
			return r
		}
	}
	return ""
}

// fsStatus converts a file-system error to a status, using fallback for
// errors without an obvious code.
func fsStatus(err error, fallback codes.Code) error {
	code := fallback
	switch {
	case errors.Is(err, fs.ErrNotExist), errors.Is(err, syscall.ENOTDIR):
		code = codes.NotFound
	case errors.Is(err, fs.ErrPermission):
		code = codes.PermissionDenied
	case errors.Is(err, syscall.EISDIR):
		code = codes.InvalidArgument
	}
	return status.Error(code, err.Error())
}
