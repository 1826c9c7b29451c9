package files

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"syscall"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxWalkEntries bounds the files one List, DiskUsage or Copy call visits,
// so that a recursive request for /proc or /sys ends; a call that reaches it
// ends with ResourceExhausted after sending what it has. It is a variable so
// that tests can lower it.
var maxWalkEntries = 100_000

// List streams a directory listing under the read roots, with the fields
// talosctl ls shows: Name is the path (under the root as requested, or
// resolved when the root is itself a symlink), RelativeName the path
// relative to the root ("." for the root itself), Mode a Go fs.FileMode,
// Modified a Unix time and Link the target of a symlink.
//
// As in Talos, an empty root means "/" and a relative one is taken from "/";
// without Recurse the root and its entries are listed, with it the tree down
// to RecursionDepth levels (0 or less: no limit); Types keeps only the kinds
// given but directories are still descended. Entries that cannot be read
// are sent with only Name, RelativeName and Error. Extended attributes are
// not reported.
//
// Roots outside the read roots, including through ".." or a symlink, get
// PermissionDenied and missing ones NotFound, as for Read. Symlinks inside
// the tree are reported, never followed, and every path is opened through an
// os.Root, so the walk cannot leave the read root even if the tree changes
// while it runs. At most 100,000 entries are visited (ResourceExhausted).
func (rs *Roots) List(req *machine.ListRequest, stream grpc.ServerStreamingServer[machine.FileInfo]) (err error) {
	ctx := stream.Context()
	t, err := rs.openTree(talosPath(req.GetRoot()))
	if err != nil {
		return err
	}
	defer t.close()

	maxDepth := 1
	if req.GetRecurse() {
		maxDepth = int(req.GetRecursionDepth())
		if maxDepth <= 0 {
			maxDepth = -1 // talosctl ls --recurse sends -1
		}
	}
	w := &walker{ctx: ctx, root: t.root}
	err = w.walk(t.rel, t.startSub(), 0, maxDepth, func(e *walkEntry) error {
		name := t.entryName(e)
		if e.err != nil {
			if e.depth == 0 && e.info == nil {
				// The root vanished between resolution and the walk.
				return fsStatus(e.err, codes.Internal)
			}
			return stream.Send(&machine.FileInfo{Name: name, RelativeName: e.sub, Error: describeErr(e.err, name)})
		}
		if !typeWanted(e.info.Mode(), req.GetTypes()) {
			return nil
		}
		fi := &machine.FileInfo{
			Name:         name,
			RelativeName: e.sub,
			Size:         e.info.Size(),
			Mode:         uint32(e.info.Mode()),
			Modified:     e.info.ModTime().Unix(),
			IsDir:        e.info.IsDir(),
			Link:         e.link,
		}
		if st, ok := e.info.Sys().(*syscall.Stat_t); ok {
			fi.Uid, fi.Gid = st.Uid, st.Gid
		}
		return stream.Send(fi)
	})
	return walkStatus(err, t.name)
}

// typeWanted applies ListRequest.types: regular files, directories and
// symlinks can be asked for; with no types everything is wanted.
func typeWanted(mode fs.FileMode, types []machine.ListRequest_Type) bool {
	if len(types) == 0 {
		return true
	}
	for _, t := range types {
		switch {
		case t == machine.ListRequest_REGULAR && mode.IsRegular(),
			t == machine.ListRequest_DIRECTORY && mode.IsDir(),
			t == machine.ListRequest_SYMLINK && mode&fs.ModeSymlink != 0:
			return true
		}
	}
	return false
}

// DiskUsage streams the apparent size (in bytes, like du --apparent-size
// --bytes) of each path and of what lies under it, children before their
// directory. A directory's size is its own plus everything below it; a file
// with several hard links is counted once per call, and entries on procfs
// count 0 because their sizes describe no storage (/proc/kcore reports the
// kernel's address space, /proc/<pid>/fd the number of open files).
//
// The request's fields behave as in Talos and talosctl usage: the whole
// tree is always summed, but only entries fewer than RecursionDepth levels
// below a path are sent (0 or less: all), files only with All, and
// Threshold drops entries smaller than it when positive or larger than its
// absolute value when negative. Each requested path itself is always sent
// (subject to Threshold), even when it is a file; its RelativeName is ".",
// or the file's name. Entries that cannot be read are sent with Error set
// and count 0.
//
// All paths are checked against the read roots before anything is sent:
// one outside them fails the call with PermissionDenied, a missing one with
// NotFound, and no paths with InvalidArgument. Relative paths are taken
// from "/" as in Talos. The walk is bounded and confined like List's.
func (rs *Roots) DiskUsage(req *machine.DiskUsageRequest, stream grpc.ServerStreamingServer[machine.DiskUsageInfo]) (err error) {
	ctx := stream.Context()
	if len(req.GetPaths()) == 0 {
		return status.Error(codes.InvalidArgument, "at least one path is required")
	}
	for _, p := range req.GetPaths() {
		if _, err := rs.resolve(talosPath(p)); err != nil {
			return err
		}
	}
	du := &diskUsage{
		req:  req,
		send: stream.Send,
		w:    &walker{ctx: ctx},
		seen: map[fileID]bool{},
	}
	for _, p := range req.GetPaths() {
		t, err := rs.openTree(talosPath(p))
		if err != nil {
			return err
		}
		du.w.root = t.root
		_, err = du.usage(t, t.rel, t.startSub(), 0, du.w.onProcfs(filepath.Dir(t.rel)))
		t.close()
		if err != nil {
			return walkStatus(err, t.name)
		}
	}
	return nil
}

// diskUsage is the state of one DiskUsage call.
type diskUsage struct {
	req  *machine.DiskUsageRequest
	send func(*machine.DiskUsageInfo) error
	w    *walker
	seen map[fileID]bool // files with several links already counted
}

type fileID struct{ dev, ino uint64 }

// usage sums rel and everything under it, sending the entries the request
// asks for; procfs tells whether rel lies on procfs.
func (d *diskUsage) usage(t *tree, rel, sub string, depth int, procfs bool) (int64, error) {
	e, err := d.w.visit(rel, sub, depth)
	if err != nil {
		return 0, err
	}
	name := t.entryName(e)
	if e.err != nil {
		if depth == 0 {
			return 0, fsStatus(e.err, codes.Internal) // the path vanished since it was checked
		}
		return 0, d.send(&machine.DiskUsageInfo{Name: name, RelativeName: sub, Error: describeErr(e.err, name)})
	}
	size := d.ownSize(e.info, procfs)
	if e.info.IsDir() {
		names, fsType, err := d.w.children(rel)
		if err != nil {
			if err := d.send(&machine.DiskUsageInfo{Name: name, RelativeName: sub, Error: describeErr(err, name)}); err != nil {
				return 0, err
			}
		}
		for _, n := range names {
			childSize, err := d.usage(t, filepath.Join(rel, n), joinSub(sub, n), depth+1, fsType == unix.PROC_SUPER_MAGIC)
			if err != nil {
				return 0, err
			}
			size += childSize
		}
	}
	if d.wanted(depth, e.info.IsDir(), size) {
		if err := d.send(&machine.DiskUsageInfo{Name: name, RelativeName: sub, Size: size}); err != nil {
			return 0, err
		}
	}
	return size, nil
}

// ownSize is what one file adds to the total.
func (d *diskUsage) ownSize(fi fs.FileInfo, procfs bool) int64 {
	if procfs {
		return 0 // procfs directories report odd sizes too (the open fds of fd/)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && !fi.IsDir() && st.Nlink > 1 {
		id := fileID{dev: st.Dev, ino: st.Ino}
		if d.seen[id] {
			return 0
		}
		d.seen[id] = true
	}
	return max(fi.Size(), 0)
}

// wanted applies recursion_depth, all and threshold to an entry.
func (d *diskUsage) wanted(depth int, isDir bool, size int64) bool {
	if depth > 0 {
		if limit := int(d.req.GetRecursionDepth()); limit > 0 && depth >= limit {
			return false
		}
		if !isDir && !d.req.GetAll() {
			return false
		}
	}
	switch th := d.req.GetThreshold(); {
	case th > 0 && size < th:
		return false
	case th < 0 && size > -th:
		return false
	}
	return true
}

// talosPath makes a List or DiskUsage path absolute the way Talos does:
// empty means "/" and a relative path is taken from "/".
func talosPath(p string) string {
	if !filepath.IsAbs(p) {
		p = "/" + p
	}
	return p
}

// tree is the start of a walk: a path that passed the read-roots rule, and
// the os.Root of its read root that the walk goes through.
type tree struct {
	rootedPath
	name string // how entries are named; see List
	root *os.Root
}

func (rs *Roots) openTree(p string) (*tree, error) {
	rp, err := rs.resolve(p)
	if err != nil {
		return nil, err
	}
	r, err := os.OpenRoot(rp.root)
	if err != nil {
		return nil, fsStatus(err, codes.Internal)
	}
	// As in Talos, entries are named under the path as given, unless the
	// path is itself a symlink: then under what it resolves to.
	name := rp.clean
	if fi, err := os.Lstat(rp.clean); err == nil && fi.Mode()&fs.ModeSymlink != 0 {
		name = rp.real
	}
	return &tree{rootedPath: rp, name: name, root: r}, nil
}

func (t *tree) close() { t.root.Close() }

// startSub is the relative name of the walk's start: "." for a directory,
// its own name for a file (a start that cannot be read is named ".").
func (t *tree) startSub() string {
	if fi, err := t.root.Lstat(t.rel); err == nil && !fi.IsDir() {
		return filepath.Base(t.real)
	}
	return "."
}

// entryName is the full name reported for an entry.
func (t *tree) entryName(e *walkEntry) string {
	if e.depth == 0 {
		return t.name
	}
	return filepath.Join(t.name, e.sub)
}

// walker visits a tree below a read root through an os.Root, depth first
// and in lexical order. It never follows symlinks: they are reported with
// their targets. It stops at ctx's end and after maxWalkEntries entries.
type walker struct {
	ctx     context.Context
	root    *os.Root
	visited int
}

// walkEntry is one visited file.
type walkEntry struct {
	rel   string      // path under the os.Root
	sub   string      // path relative to the walk's start
	depth int         // 0 for the start
	info  fs.FileInfo // from lstat; nil if that failed
	link  string      // a symlink's target
	err   error       // why the entry could not be described or, for a directory, read
}

// errWalkLimit ends a walk that reached maxWalkEntries.
var errWalkLimit = errors.New("too many entries")

// walkStatus turns the error that ended a walk into the call's status.
func walkStatus(err error, name string) error {
	if errors.Is(err, errWalkLimit) {
		return status.Errorf(codes.ResourceExhausted,
			"stopped after %d entries under %s; ask for a narrower path or a lower recursion depth", maxWalkEntries, name)
	}
	return err
}

// visit describes one entry. Its error is non-nil only when the walk must
// stop; problems with the entry itself are in walkEntry.err.
func (w *walker) visit(rel, sub string, depth int) (*walkEntry, error) {
	if err := w.ctx.Err(); err != nil {
		return nil, status.FromContextError(err).Err()
	}
	if w.visited >= maxWalkEntries {
		return nil, errWalkLimit
	}
	w.visited++
	e := &walkEntry{rel: rel, sub: sub, depth: depth}
	e.info, e.err = w.root.Lstat(rel)
	if e.err == nil && e.info.Mode()&fs.ModeSymlink != 0 {
		e.link, e.err = w.root.Readlink(rel)
	}
	return e, nil
}

// walk visits rel and, when it is a directory less than maxDepth levels
// below the start (or maxDepth < 0), what lies under it, calling fn for each
// entry before its children. A directory that cannot be read gets a second
// call, with the error.
func (w *walker) walk(rel, sub string, depth, maxDepth int, fn func(*walkEntry) error) error {
	e, err := w.visit(rel, sub, depth)
	if err != nil {
		return err
	}
	if err := fn(e); err != nil {
		return err
	}
	if e.err != nil || !e.info.IsDir() || depth > 0 && maxDepth >= 0 && depth >= maxDepth {
		return nil
	}
	names, _, err := w.children(rel)
	if err != nil {
		return fn(&walkEntry{rel: rel, sub: sub, depth: depth, info: e.info, err: err})
	}
	for _, n := range names {
		if err := w.walk(filepath.Join(rel, n), joinSub(sub, n), depth+1, maxDepth, fn); err != nil {
			return err
		}
	}
	return nil
}

// children returns the sorted names in directory rel and the type of its
// file system (statfs f_type). It reads at most one name more than the walk
// may still visit, so that a huge directory costs no more than the limit.
func (w *walker) children(rel string) ([]string, int64, error) {
	// O_DIRECTORY|O_NONBLOCK: a directory swapped for a FIFO must not block.
	d, err := w.root.OpenFile(rel, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return nil, 0, err
	}
	defer d.Close()
	fsType := fileSystemType(d)
	budget := maxWalkEntries - w.visited + 1
	var names []string
	for len(names) < budget {
		batch, err := d.Readdirnames(min(1024, budget-len(names)))
		names = append(names, batch...)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fsType, err
		}
	}
	slices.Sort(names)
	return names, fsType, nil
}

// onProcfs reports whether directory dir lies on procfs. DiskUsage asks it
// for the directory holding a walk's start; the other entries learn it from
// the directory that lists them.
func (w *walker) onProcfs(dir string) bool {
	d, err := w.root.OpenFile(dir, os.O_RDONLY|syscall.O_DIRECTORY|syscall.O_NONBLOCK, 0)
	if err != nil {
		return false
	}
	defer d.Close()
	return fileSystemType(d) == unix.PROC_SUPER_MAGIC
}

// fileSystemType returns the statfs f_type of the file system holding f, or
// 0 if it cannot be found.
func fileSystemType(f *os.File) int64 {
	rc, err := f.SyscallConn()
	if err != nil {
		return 0
	}
	var st unix.Statfs_t
	var serr error
	if err := rc.Control(func(fd uintptr) { serr = unix.Fstatfs(int(fd), &st) }); err != nil || serr != nil {
		return 0
	}
	return int64(st.Type)
}

// joinSub extends a relative name by one element.
func joinSub(sub, name string) string {
	if sub == "." {
		return name
	}
	return sub + "/" + name
}

// describeErr words a per-entry error with the entry's full name: os.Root
// reports paths relative to the read root, which would confuse a reader.
func describeErr(err error, name string) string {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Op + " " + name + ": " + pe.Err.Error()
	}
	return name + ": " + err.Error()
}
