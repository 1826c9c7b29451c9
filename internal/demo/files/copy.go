package files

import (
	"archive/tar"
	"compress/gzip"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// copyChunkSize is the largest payload Copy sends in one message.
const copyChunkSize = 64 << 10

// maxCopyBytes bounds the file content one Copy archives. It is a variable
// so that tests can lower it.
var maxCopyBytes int64 = 1 << 30

// maxPseudoFileSize bounds what Copy reads of a file whose size the kernel
// does not report (procfs, sysfs and other files of size 0).
const maxPseudoFileSize = 1 << 20

// Copy streams a gzip-compressed tar archive of root_path, which talosctl
// cp extracts (or writes out with "-"), in messages of at most 64 KiB.
//
// As in Talos, a directory's archive holds what lies under it, named
// relative to it, and a file's archive holds that file under its own name;
// a root_path that is a symlink is archived as what it resolves to. Entries
// keep their mode, owner and modification time; symlinks are archived as
// symlinks, never followed, and device files and FIFOs as headers only.
// Files on procfs and sysfs, and other files that report size 0, are read
// up to 1 MiB to learn their real size.
//
// root_path must be absolute and is checked against the read roots like
// Read's path (PermissionDenied, NotFound), and everything is opened through
// an os.Root. Entries that cannot be archived are left out: unreadable ones
// (including pseudo files the kernel gives no content, which Talos archives
// as empty when the error is EINVAL), sockets, pseudo files over 1 MiB or
// with nothing to read yet, files that vanish, and /proc/kmsg and the
// tracing pipes, whose reading would take data from their other readers.
// The archive is still completed; the call then ends with DataLoss, a code
// Copy uses for nothing else, naming the first few (Talos ends such a copy
// with an error too). At most 100,000 entries and 1 GiB of file content are
// archived: beyond that the archive is closed and the call ends with
// ResourceExhausted.
func (rs *Roots) Copy(req *machine.CopyRequest, stream grpc.ServerStreamingServer[common.Data]) (err error) {
	ctx := stream.Context()
	t, err := rs.openTree(req.GetRootPath())
	if err != nil {
		return err
	}
	defer t.close()

	out := &chunkWriter{send: func(b []byte) error { return stream.Send(&common.Data{Bytes: b}) }}
	zw := gzip.NewWriter(out)
	a := &archiver{
		w:      &walker{ctx: ctx, root: t.root},
		tw:     tar.NewWriter(zw),
		budget: maxCopyBytes,
	}
	werr := a.w.walk(t.rel, t.startSub(), 0, -1, a.add)
	if out.err != nil {
		return out.err // the client went away
	}
	if werr != nil && !errors.Is(werr, errWalkLimit) && !errors.Is(werr, errCopyLimit) {
		return werr // the call was cancelled, or the start vanished
	}
	// Close the archive even when a limit stopped it, so that the client
	// has a valid archive of what was sent.
	if err := errors.Join(a.tw.Close(), zw.Close(), out.flush()); err != nil {
		if out.err != nil {
			return out.err
		}
		return status.Errorf(codes.Internal, "finish archive: %v", err)
	}
	switch {
	case errors.Is(werr, errWalkLimit):
		return walkStatus(werr, t.name)
	case errors.Is(werr, errCopyLimit):
		return status.Errorf(codes.ResourceExhausted,
			"stopped after %d bytes of file content under %s; copy a narrower path", maxCopyBytes-a.budget, t.name)
	}
	return a.skippedStatus(t.name)
}

// errCopyLimit ends a Copy that reached maxCopyBytes.
var errCopyLimit = errors.New("too much data")

// archiver writes the entries of one Copy call.
type archiver struct {
	w       *walker
	tw      *tar.Writer
	budget  int64    // file content that may still be archived
	skipped []string // why entries were left out, the first few
	nskip   int
}

// maxSkipNotes bounds how many left-out entries the final error names.
const maxSkipNotes = 5

func (a *archiver) skip(sub string, err error) {
	a.nskip++
	if len(a.skipped) < maxSkipNotes {
		a.skipped = append(a.skipped, describeErr(err, sub))
	}
}

// skippedStatus is the call's final status: OK, or the error listing the
// entries left out.
func (a *archiver) skippedStatus(name string) error {
	if a.nskip == 0 {
		return nil
	}
	more := ""
	if a.nskip > len(a.skipped) {
		more = fmt.Sprintf("; and %d more", a.nskip-len(a.skipped))
	}
	return status.Errorf(codes.DataLoss,
		"archive of %s is incomplete, %d entries left out: %s%s", name, a.nskip, strings.Join(a.skipped, "; "), more)
}

// add archives one walk entry. Only errors that must end the walk (the
// client gone, a limit reached) are returned.
func (a *archiver) add(e *walkEntry) error {
	if e.err != nil {
		if e.depth == 0 && e.info == nil {
			return fsStatus(e.err, codes.Internal) // the start vanished since it was checked
		}
		a.skip(e.sub, e.err)
		return nil
	}
	if e.depth == 0 && e.info.IsDir() {
		return nil // a directory's archive holds its contents, not itself
	}
	hdr, err := tar.FileInfoHeader(e.info, e.link)
	if err != nil {
		a.skip(e.sub, err) // sockets have no tar representation
		return nil
	}
	hdr.Name = e.sub
	if e.info.IsDir() {
		hdr.Name += "/"
	}
	if !e.info.Mode().IsRegular() {
		return a.tw.WriteHeader(hdr)
	}
	return a.addFile(e, hdr)
}

// addFile archives a regular file's header and content.
func (a *archiver) addFile(e *walkEntry, hdr *tar.Header) error {
	// O_NONBLOCK: a file swapped for a FIFO must not block the open, and
	// readCapped relies on it for pseudo files that are streams.
	f, err := a.w.root.OpenFile(e.rel, os.O_RDONLY|syscall.O_NONBLOCK, 0)
	if err != nil {
		a.skip(e.sub, err)
		return nil
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		a.skip(e.sub, err)
		return nil
	}
	if !fi.Mode().IsRegular() {
		a.skip(e.sub, fmt.Errorf("changed to %s while archiving", fi.Mode().Type()))
		return nil
	}
	if fsType := fileSystemType(f); fi.Size() == 0 || isPseudoFS(fsType) {
		if consumedByReading(fsType, e.rel) {
			a.skip(e.sub, errors.New("not read: reading it would take data from its other readers"))
			return nil
		}
		// The reported size says nothing about the content: read it all
		// (up to the cap) first so that the header can carry its length.
		data, err := readCapped(f, maxPseudoFileSize)
		switch {
		case err != nil:
			a.skip(e.sub, err)
			return nil
		case int64(len(data)) > a.budget:
			return errCopyLimit
		}
		a.budget -= int64(len(data))
		hdr.Size = int64(len(data))
		if err := a.tw.WriteHeader(hdr); err != nil {
			return err
		}
		_, err = a.tw.Write(data)
		return err
	}
	if fi.Size() > a.budget {
		return errCopyLimit
	}
	a.budget -= fi.Size()
	hdr.Size = fi.Size()
	if err := a.tw.WriteHeader(hdr); err != nil {
		return err
	}
	// Exactly hdr.Size bytes must follow the header: a file that grows is
	// cut at that size, one that shrinks or fails is padded with zeros and
	// reported.
	n, rerr, err := a.copyContent(f, hdr.Size)
	if err != nil {
		return err
	}
	if n < hdr.Size {
		if rerr == nil || errors.Is(rerr, io.EOF) {
			rerr = fmt.Errorf("shrank from %d to %d bytes while archiving; padded with zeros", hdr.Size, n)
		} else {
			rerr = fmt.Errorf("read failed after %d of %d bytes, the rest padded with zeros: %w", n, hdr.Size, rerr)
		}
		if _, err := io.CopyN(a.tw, zeroReader{}, hdr.Size-n); err != nil {
			return err
		}
		a.skip(e.sub, rerr)
	}
	return nil
}

// copyContent copies up to size bytes of f into the archive, checking for
// cancellation between chunks. It returns how many bytes it copied and why
// it stopped early: rerr for a failed read, err when the call must end
// (cancelled, or the archive could not be written because the client went
// away).
func (a *archiver) copyContent(f *os.File, size int64) (n int64, rerr, err error) {
	buf := make([]byte, 32<<10)
	for n < size {
		if err := a.w.ctx.Err(); err != nil {
			return n, nil, status.FromContextError(err).Err()
		}
		k, rerr := f.Read(buf[:min(int64(len(buf)), size-n)])
		if k > 0 {
			if _, err := a.tw.Write(buf[:k]); err != nil {
				return n, nil, err
			}
			n += int64(k)
		}
		if rerr != nil {
			return n, rerr, nil
		}
	}
	return n, nil, nil
}

// isPseudoFS reports whether files on a file system of this statfs type
// report sizes unrelated to their content (0, or 4096 for sysfs attributes,
// or the address space for /proc/kcore).
func isPseudoFS(fsType int64) bool {
	switch fsType {
	case unix.PROC_SUPER_MAGIC, unix.SYSFS_MAGIC, unix.DEBUGFS_MAGIC, unix.TRACEFS_MAGIC,
		unix.SECURITYFS_MAGIC, unix.CGROUP_SUPER_MAGIC, unix.CGROUP2_SUPER_MAGIC, unix.BPF_FS_MAGIC:
		return true
	}
	return false
}

// consumedByReading reports whether reading a pseudo file takes its data
// away from other readers (the kernel log's /proc/kmsg, the tracing pipes),
// which the agent, changing nothing on the host, must not do.
func consumedByReading(fsType int64, rel string) bool {
	base := filepath.Base(rel)
	switch fsType {
	case unix.PROC_SUPER_MAGIC:
		return base == "kmsg"
	case unix.TRACEFS_MAGIC, unix.DEBUGFS_MAGIC:
		return strings.HasPrefix(base, "trace_pipe")
	}
	return false
}

// readCapped reads f, which was opened with O_NONBLOCK, to its end. It
// fails when f holds more than limit bytes, and when f would make it wait:
// the file is a stream that has nothing to read now, and os.File would park
// the call on the poller until data comes.
func readCapped(f *os.File, limit int) ([]byte, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var data []byte
	buf := make([]byte, 32<<10)
	for {
		var n int
		var rerr error
		if err := rc.Control(func(fd uintptr) {
			for {
				n, rerr = syscall.Read(int(fd), buf)
				if rerr != syscall.EINTR {
					return
				}
			}
		}); err != nil {
			return nil, err
		}
		switch {
		case errors.Is(rerr, syscall.EAGAIN):
			return nil, errors.New("not read: it has no data without waiting")
		case rerr != nil:
			return nil, &os.PathError{Op: "read", Path: f.Name(), Err: rerr}
		case n == 0:
			return data, nil
		case len(data)+n > limit:
			return nil, fmt.Errorf("has more than %d bytes, the most read from a file of unknown size", limit)
		}
		data = append(data, buf[:n]...)
	}
}

type zeroReader struct{}

func (zeroReader) Read(p []byte) (int, error) {
	clear(p)
	return len(p), nil
}

// chunkWriter sends what is written to it in messages of copyChunkSize
// bytes; flush sends the rest. After a failed send every call fails with
// that error.
type chunkWriter struct {
	send func([]byte) error
	buf  []byte
	err  error
}

func (c *chunkWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	written := 0
	for len(p) > 0 {
		if c.buf == nil {
			// A fresh buffer per message: a sent message must not change.
			c.buf = make([]byte, 0, copyChunkSize)
		}
		k := copy(c.buf[len(c.buf):cap(c.buf)], p)
		c.buf = c.buf[:len(c.buf)+k]
		p = p[k:]
		written += k
		if len(c.buf) == cap(c.buf) {
			if err := c.flush(); err != nil {
				return written, err
			}
		}
	}
	return written, nil
}

func (c *chunkWriter) flush() error {
	if c.err != nil || len(c.buf) == 0 {
		return c.err
	}
	c.err = c.send(c.buf)
	c.buf = nil
	return c.err
}
