package files_test

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"

	"github.com/apid/apid/internal/demo/files"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

// fileTree is a small tree under an allowed root, with symlinks inside and
// out of it, and a directory outside the roots.
type fileTree struct {
	root, outside string
	two           []byte // the content of a/b/two.bin
}

func newFileTree(t *testing.T) fileTree {
	t.Helper()
	ft := fileTree{root: t.TempDir(), outside: t.TempDir(), two: make([]byte, 150_000)}
	_, _ = rand.Read(ft.two) // incompressible, so that the archive spans several messages
	for _, d := range []string{"a", "a/b"} {
		if err := os.Mkdir(filepath.Join(ft.root, d), 0o750); err != nil {
			t.Fatal(err)
		}
	}
	nodetest.MustWrite(t, filepath.Join(ft.root, "top.txt"), []byte("top"))
	nodetest.MustWrite(t, filepath.Join(ft.root, "a", "one.txt"), []byte("one"))
	nodetest.MustWrite(t, filepath.Join(ft.root, "a", "empty"), nil)
	nodetest.MustWrite(t, filepath.Join(ft.root, "a", "b", "two.bin"), ft.two)
	if err := os.Link(filepath.Join(ft.root, "a", "b", "two.bin"), filepath.Join(ft.root, "a", "hard")); err != nil {
		t.Fatal(err)
	}
	nodetest.MustWrite(t, filepath.Join(ft.outside, "secret"), []byte("secret outside the roots"))
	nodetest.MustSymlink(t, "one.txt", filepath.Join(ft.root, "a", "link-in"))
	nodetest.MustSymlink(t, filepath.Join(ft.outside, "secret"), filepath.Join(ft.root, "a", "link-out"))
	nodetest.MustSymlink(t, ft.outside, filepath.Join(ft.root, "a", "dir-out"))
	return ft
}

// allNames is every relative name under the tree's root, in walk order.
var allNames = []string{".", "a", "a/b", "a/b/two.bin", "a/dir-out", "a/empty", "a/hard", "a/link-in", "a/link-out", "a/one.txt", "top.txt"}

// deniedPaths are ways out of the tree's root that must be refused.
func (ft fileTree) deniedPaths() map[string]string {
	return map[string]string{
		"outside":               ft.outside,
		"dot-dot":               ft.root + "/../" + filepath.Base(ft.outside),
		"deep dot-dot":          ft.root + "/a/../../../../../../etc",
		"symlinked dir escape":  filepath.Join(ft.root, "a", "dir-out"),
		"symlinked file escape": filepath.Join(ft.root, "a", "link-out"),
		"behind symlink escape": filepath.Join(ft.root, "a", "dir-out", "secret"),
		"missing behind escape": filepath.Join(ft.root, "a", "dir-out", "missing"),
	}
}

func list(t *testing.T, c machine.MachineServiceClient, req *machine.ListRequest) ([]*machine.FileInfo, error) {
	t.Helper()
	stream, err := c.List(testkit.Context(t), req)
	if err != nil {
		return nil, err
	}
	var out []*machine.FileInfo
	for {
		fi, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, fi)
	}
}

func relNames(infos []*machine.FileInfo) []string {
	var out []string
	for _, fi := range infos {
		out = append(out, fi.GetRelativeName())
	}
	return out
}

func TestList(t *testing.T) {
	ft := newFileTree(t)
	c, _, _ := nodetest.Start(t, node.Config{ReadRoots: []string{ft.root}}, "unix")

	t.Run("one level", func(t *testing.T) {
		infos, err := list(t, c, &machine.ListRequest{Root: ft.root})
		if err != nil {
			t.Fatal(err)
		}
		if got := relNames(infos); !slices.Equal(got, []string{".", "a", "top.txt"}) {
			t.Fatalf("names = %q", got)
		}
	})
	t.Run("recursive, every field", func(t *testing.T) {
		infos, err := list(t, c, &machine.ListRequest{Root: ft.root, Recurse: true, RecursionDepth: -1})
		if err != nil {
			t.Fatal(err)
		}
		if got := relNames(infos); !slices.Equal(got, allNames) {
			t.Fatalf("names = %q, want %q", got, allNames)
		}
		for _, fi := range infos {
			path := filepath.Join(ft.root, fi.GetRelativeName())
			st, err := os.Lstat(path)
			if err != nil {
				t.Fatal(err)
			}
			sys := st.Sys().(*syscall.Stat_t)
			link, _ := os.Readlink(path)
			if fi.GetName() != path || fi.GetSize() != st.Size() || fs.FileMode(fi.GetMode()) != st.Mode() ||
				fi.GetModified() != st.ModTime().Unix() || fi.GetIsDir() != st.IsDir() || fi.GetLink() != link ||
				fi.GetUid() != sys.Uid || fi.GetGid() != sys.Gid || fi.GetError() != "" || fi.GetMetadata() != nil {
				t.Errorf("%s: got %v; lstat says size %d mode %v link %q", path, fi, st.Size(), st.Mode(), link)
			}
		}
		if fi := infos[slices.Index(allNames, "a/b/two.bin")]; fi.GetSize() != int64(len(ft.two)) {
			t.Errorf("two.bin size %d", fi.GetSize())
		}
		if fi := infos[slices.Index(allNames, "a/dir-out")]; fi.GetLink() != ft.outside || fi.GetIsDir() {
			t.Errorf("dir-out = %v: want a symlink to %s, not followed", fi, ft.outside)
		}
	})
	t.Run("depth", func(t *testing.T) {
		infos, err := list(t, c, &machine.ListRequest{Root: ft.root, Recurse: true, RecursionDepth: 2})
		if err != nil {
			t.Fatal(err)
		}
		want := slices.DeleteFunc(slices.Clone(allNames), func(n string) bool { return n == "a/b/two.bin" })
		if got := relNames(infos); !slices.Equal(got, want) {
			t.Fatalf("names = %q, want %q", got, want)
		}
	})
	t.Run("types", func(t *testing.T) {
		infos, err := list(t, c, &machine.ListRequest{Root: ft.root, Recurse: true,
			Types: []machine.ListRequest_Type{machine.ListRequest_REGULAR, machine.ListRequest_SYMLINK}})
		if err != nil {
			t.Fatal(err)
		}
		want := []string{"a/b/two.bin", "a/dir-out", "a/empty", "a/hard", "a/link-in", "a/link-out", "a/one.txt", "top.txt"}
		if got := relNames(infos); !slices.Equal(got, want) {
			t.Fatalf("names = %q, want %q", got, want)
		}
	})
	t.Run("file", func(t *testing.T) {
		infos, err := list(t, c, &machine.ListRequest{Root: filepath.Join(ft.root, "a", "one.txt")})
		if err != nil {
			t.Fatal(err)
		}
		if len(infos) != 1 || infos[0].GetRelativeName() != "one.txt" || infos[0].GetSize() != 3 ||
			infos[0].GetName() != filepath.Join(ft.root, "a", "one.txt") {
			t.Fatalf("infos = %v", infos)
		}
	})
	t.Run("symlink root inside", func(t *testing.T) {
		infos, err := list(t, c, &machine.ListRequest{Root: filepath.Join(ft.root, "a", "link-in")})
		if err != nil {
			t.Fatal(err)
		}
		if len(infos) != 1 || infos[0].GetName() != filepath.Join(ft.root, "a", "one.txt") || infos[0].GetLink() != "" {
			t.Fatalf("infos = %v; want the target, one.txt", infos)
		}
	})
	t.Run("relative root, taken from /", func(t *testing.T) {
		infos, err := list(t, c, &machine.ListRequest{Root: strings.TrimPrefix(ft.root, "/") + "/a/b"})
		if err != nil {
			t.Fatal(err)
		}
		if got := relNames(infos); !slices.Equal(got, []string{".", "two.bin"}) || infos[1].GetName() != filepath.Join(ft.root, "a/b/two.bin") {
			t.Fatalf("infos = %v", infos)
		}
	})
	for name, path := range ft.deniedPaths() {
		t.Run(name, func(t *testing.T) {
			infos, err := list(t, c, &machine.ListRequest{Root: path, Recurse: true})
			nodetest.WantCode(t, err, codes.PermissionDenied)
			if len(infos) != 0 {
				t.Errorf("sent %v before refusing", infos)
			}
		})
	}
	t.Run("default root /", func(t *testing.T) {
		_, err := list(t, c, &machine.ListRequest{})
		nodetest.WantCode(t, err, codes.PermissionDenied)
	})
	t.Run("missing", func(t *testing.T) {
		_, err := list(t, c, &machine.ListRequest{Root: filepath.Join(ft.root, "missing")})
		nodetest.WantCode(t, err, codes.NotFound)
	})
}

// TestListLimits checks that walks end: after the entry limit, and when the
// client goes away, even under /proc.
func TestListLimits(t *testing.T) {
	ft := newFileTree(t)
	c, _, _ := nodetest.Start(t, node.Config{ReadRoots: []string{ft.root, "/proc"}}, "unix")

	t.Run("entry limit", func(t *testing.T) {
		files.SetFileLimits(t, 4, 1<<30)
		infos, err := list(t, c, &machine.ListRequest{Root: ft.root, Recurse: true})
		nodetest.WantCode(t, err, codes.ResourceExhausted)
		if got := relNames(infos); !slices.Equal(got, allNames[:4]) {
			t.Errorf("sent %q before stopping, want %q", got, allNames[:4])
		}
	})
	t.Run("cancelled", func(t *testing.T) {
		if _, err := os.Stat("/proc/self"); err != nil {
			t.Skipf("no procfs: %v", err)
		}
		ctx, cancel := context.WithCancel(testkit.Context(t))
		defer cancel()
		stream, err := c.List(ctx, &machine.ListRequest{Root: "/proc", Recurse: true})
		if err != nil {
			t.Fatal(err)
		}
		if fi, err := stream.Recv(); err != nil || fi.GetName() != "/proc" {
			t.Fatalf("first entry %v, %v", fi, err)
		}
		cancel()
		for err == nil {
			_, err = stream.Recv()
		}
		nodetest.WantCode(t, err, codes.Canceled)
	})
}

// duSizes computes what du --apparent-size --bytes reports for the tree:
// every entry's size, counting a file with several links once.
func duSizes(t *testing.T, root string) map[string]int64 {
	t.Helper()
	sizes := map[string]int64{}
	seen := map[uint64]bool{}
	var walk func(rel string) int64
	walk = func(rel string) int64 {
		st, err := os.Lstat(filepath.Join(root, rel))
		if err != nil {
			t.Fatal(err)
		}
		size := st.Size()
		if sys := st.Sys().(*syscall.Stat_t); !st.IsDir() && sys.Nlink > 1 {
			if seen[sys.Ino] {
				size = 0
			}
			seen[sys.Ino] = true
		}
		if st.IsDir() {
			entries, err := os.ReadDir(filepath.Join(root, rel))
			if err != nil {
				t.Fatal(err)
			}
			for _, e := range entries {
				size += walk(filepath.Join(rel, e.Name()))
			}
		}
		sizes[filepath.ToSlash(rel)] = size
		return size
	}
	walk(".")
	return sizes
}

func TestDiskUsage(t *testing.T) {
	ft := newFileTree(t)
	want := duSizes(t, ft.root)
	c, _ := nodetest.OfficialClient(t, node.Config{ReadRoots: []string{ft.root, "/proc"}})
	du := func(t *testing.T, req *machine.DiskUsageRequest) ([]*machine.DiskUsageInfo, error) {
		t.Helper()
		stream, err := c.DiskUsage(testkit.Context(t), req)
		if err != nil {
			return nil, err
		}
		var out []*machine.DiskUsageInfo
		for {
			info, err := stream.Recv()
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			if err != nil {
				return out, err
			}
			out = append(out, info)
		}
	}
	names := func(infos []*machine.DiskUsageInfo) []string {
		var out []string
		for _, i := range infos {
			out = append(out, i.GetRelativeName())
		}
		return out
	}

	t.Run("all", func(t *testing.T) {
		infos, err := du(t, &machine.DiskUsageRequest{Paths: []string{ft.root}, All: true})
		if err != nil {
			t.Fatal(err)
		}
		// Children before their directory, in lexical order.
		order := []string{"a/b/two.bin", "a/b", "a/dir-out", "a/empty", "a/hard", "a/link-in", "a/link-out", "a/one.txt", "a", "top.txt", "."}
		if got := names(infos); !slices.Equal(got, order) {
			t.Fatalf("order = %q, want %q", got, order)
		}
		for _, i := range infos {
			if i.GetSize() != want[i.GetRelativeName()] || i.GetName() != filepath.Join(ft.root, i.GetRelativeName()) || i.GetError() != "" {
				t.Errorf("%s: %v, want size %d", i.GetRelativeName(), i, want[i.GetRelativeName()])
			}
		}
		// The hard link shares two.bin's data: the total holds it once.
		if total := infos[len(infos)-1].GetSize(); total >= 2*int64(len(ft.two)) {
			t.Errorf("total %d counts the hard-linked data twice", total)
		}
	})
	t.Run("talosctl default depth", func(t *testing.T) {
		infos, err := du(t, &machine.DiskUsageRequest{Paths: []string{ft.root}, RecursionDepth: 1})
		if err != nil {
			t.Fatal(err)
		}
		if len(infos) != 1 || infos[0].GetRelativeName() != "." || infos[0].GetSize() != want["."] {
			t.Fatalf("infos = %v, want the root's total %d", infos, want["."])
		}
	})
	t.Run("directories two levels", func(t *testing.T) {
		infos, err := du(t, &machine.DiskUsageRequest{Paths: []string{ft.root}, RecursionDepth: 2})
		if err != nil {
			t.Fatal(err)
		}
		if got := names(infos); !slices.Equal(got, []string{"a", "."}) {
			t.Fatalf("names = %q", got)
		}
	})
	t.Run("threshold", func(t *testing.T) {
		infos, err := du(t, &machine.DiskUsageRequest{Paths: []string{ft.root}, All: true, Threshold: 100})
		if err != nil {
			t.Fatal(err)
		}
		for _, i := range infos {
			if i.GetSize() < 100 {
				t.Errorf("%v is below the threshold", i)
			}
		}
		if !slices.Contains(names(infos), "a/b/two.bin") {
			t.Error("two.bin missing")
		}
		infos, err = du(t, &machine.DiskUsageRequest{Paths: []string{ft.root}, All: true, Threshold: -10})
		if err != nil {
			t.Fatal(err)
		}
		if got := names(infos); !slices.Equal(got, []string{"a/empty", "a/hard", "a/link-in", "a/one.txt", "top.txt"}) {
			t.Errorf("entries of at most 10 bytes: %q", got)
		}
	})
	t.Run("several paths, a file among them", func(t *testing.T) {
		infos, err := du(t, &machine.DiskUsageRequest{Paths: []string{filepath.Join(ft.root, "a", "b"), filepath.Join(ft.root, "top.txt")}})
		if err != nil {
			t.Fatal(err)
		}
		if len(infos) != 2 || infos[0].GetSize() != want["a/b"] || infos[1].GetRelativeName() != "top.txt" || infos[1].GetSize() != 3 {
			t.Fatalf("infos = %v", infos)
		}
	})
	t.Run("procfs counts 0", func(t *testing.T) {
		// The size of a procfs fd directory is the number of open files.
		if st, err := os.Stat("/proc/self/fd"); err != nil || st.Size() == 0 {
			t.Skipf("no procfs fd directory with a size: %v", err)
		}
		infos, err := du(t, &machine.DiskUsageRequest{Paths: []string{"/proc/self/fd"}, All: true})
		if err != nil {
			t.Fatal(err)
		}
		// A descriptor another test closes between the listing and its
		// stat is reported as gone, which is the truth.
		gone := func(i *machine.DiskUsageInfo) bool {
			return strings.Contains(i.GetError(), "no such file or directory")
		}
		if len(infos) < 2 || slices.ContainsFunc(infos, func(i *machine.DiskUsageInfo) bool { return !gone(i) && (i.GetSize() != 0 || i.GetError() != "") }) {
			t.Fatalf("infos = %v, want the descriptors and their directory, all of size 0", infos)
		}
	})
	for name, path := range ft.deniedPaths() {
		t.Run(name, func(t *testing.T) {
			infos, err := du(t, &machine.DiskUsageRequest{Paths: []string{ft.root, path}})
			nodetest.WantCode(t, err, codes.PermissionDenied)
			if len(infos) != 0 {
				t.Errorf("sent %v before refusing", infos)
			}
		})
	}
	t.Run("missing", func(t *testing.T) {
		_, err := du(t, &machine.DiskUsageRequest{Paths: []string{filepath.Join(ft.root, "missing")}})
		nodetest.WantCode(t, err, codes.NotFound)
	})
	t.Run("no paths", func(t *testing.T) {
		_, err := du(t, &machine.DiskUsageRequest{})
		nodetest.WantCode(t, err, codes.InvalidArgument)
	})
}

// tarEntry is what a test compares of an archived file.
type tarEntry struct {
	typ  byte
	mode int64
	link string
	data string
}

func readTarGz(t *testing.T, r io.Reader) (map[string]tarEntry, []string, error) {
	t.Helper()
	zr, err := gzip.NewReader(r)
	if err != nil {
		return nil, nil, err
	}
	tr := tar.NewReader(zr)
	entries := map[string]tarEntry{}
	var order []string
	for {
		hdr, err := tr.Next()
		if errors.Is(err, io.EOF) {
			// Drain the stream so that an error sent after the archive shows.
			_, err = io.Copy(io.Discard, zr)
			return entries, order, err
		}
		if err != nil {
			return entries, order, err
		}
		data, err := io.ReadAll(tr)
		if err != nil {
			return entries, order, err
		}
		entries[hdr.Name] = tarEntry{typ: hdr.Typeflag, mode: hdr.Mode, link: hdr.Linkname, data: string(data)}
		order = append(order, hdr.Name)
	}
}

// copyArchive calls Copy with the generated client and checks the chunk size.
func copyArchive(t *testing.T, c machine.MachineServiceClient, path string) (map[string]tarEntry, []string, error) {
	t.Helper()
	stream, err := c.Copy(testkit.Context(t), &machine.CopyRequest{RootPath: path})
	if err != nil {
		return nil, nil, err
	}
	chunks, err := nodetest.RecvAll(stream)
	for _, ch := range chunks {
		if len(ch) > 64<<10 {
			t.Errorf("chunk of %d bytes, want at most 64 KiB", len(ch))
		}
	}
	if err != nil {
		entries, order, _ := readTarGz(t, bytes.NewReader(bytes.Join(chunks, nil)))
		return entries, order, err
	}
	return readTarGz(t, bytes.NewReader(bytes.Join(chunks, nil)))
}

func TestCopy(t *testing.T) {
	ft := newFileTree(t)
	mode := func(rel string) int64 {
		st, err := os.Lstat(filepath.Join(ft.root, rel))
		if err != nil {
			t.Fatal(err)
		}
		return int64(st.Mode().Perm())
	}
	want := map[string]tarEntry{
		"a/":          {typ: tar.TypeDir, mode: mode("a")},
		"a/b/":        {typ: tar.TypeDir, mode: mode("a/b")},
		"a/b/two.bin": {typ: tar.TypeReg, mode: mode("a/b/two.bin"), data: string(ft.two)},
		"a/dir-out":   {typ: tar.TypeSymlink, mode: mode("a/dir-out"), link: ft.outside},
		"a/empty":     {typ: tar.TypeReg, mode: mode("a/empty")},
		"a/hard":      {typ: tar.TypeReg, mode: mode("a/hard"), data: string(ft.two)},
		"a/link-in":   {typ: tar.TypeSymlink, mode: mode("a/link-in"), link: "one.txt"},
		"a/link-out":  {typ: tar.TypeSymlink, mode: mode("a/link-out"), link: filepath.Join(ft.outside, "secret")},
		"a/one.txt":   {typ: tar.TypeReg, mode: mode("a/one.txt"), data: "one"},
		"top.txt":     {typ: tar.TypeReg, mode: mode("top.txt"), data: "top"},
	}

	t.Run("official client", func(t *testing.T) {
		c, _ := nodetest.OfficialClient(t, node.Config{ReadRoots: []string{ft.root}})
		r, err := c.Copy(testkit.Context(t), ft.root)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		got, order, err := readTarGz(t, r)
		if err != nil {
			t.Fatal(err)
		}
		for name, w := range want {
			if g, ok := got[name]; !ok || g != w {
				t.Errorf("%s: got %+v (present %v), want %+v", name, abbreviate(g), ok, abbreviate(w))
			}
		}
		if len(got) != len(want) {
			t.Errorf("archive holds %q, want %d entries", order, len(want))
		}
		if !slices.IsSorted(order) {
			t.Errorf("entries out of walk order: %q", order)
		}
	})

	c, _, _ := nodetest.Start(t, node.Config{ReadRoots: []string{ft.root, "/proc"}}, "unix")
	t.Run("file", func(t *testing.T) {
		got, _, err := copyArchive(t, c, filepath.Join(ft.root, "a", "b", "two.bin"))
		if err != nil {
			t.Fatal(err)
		}
		if len(got) != 1 || got["two.bin"].data != string(ft.two) {
			t.Fatalf("archive = %v", abbreviateAll(got))
		}
	})
	t.Run("procfs file of size 0", func(t *testing.T) {
		if _, err := os.Stat("/proc/self/status"); err != nil {
			t.Skipf("no procfs: %v", err)
		}
		got, _, err := copyArchive(t, c, "/proc/self/status")
		if err != nil {
			t.Fatal(err)
		}
		if e := got["status"]; len(got) != 1 || !strings.HasPrefix(e.data, "Name:") {
			t.Fatalf("archive = %v", abbreviateAll(got))
		}
	})
	for name, path := range ft.deniedPaths() {
		t.Run(name, func(t *testing.T) {
			got, _, err := copyArchive(t, c, path)
			nodetest.WantCode(t, err, codes.PermissionDenied)
			if len(got) != 0 {
				t.Errorf("sent %v before refusing", abbreviateAll(got))
			}
		})
	}
	for name, tc := range map[string]struct {
		path string
		code codes.Code
	}{
		"missing":  {filepath.Join(ft.root, "missing"), codes.NotFound},
		"relative": {"a/one.txt", codes.InvalidArgument},
		"empty":    {"", codes.InvalidArgument},
	} {
		t.Run(name, func(t *testing.T) {
			_, _, err := copyArchive(t, c, tc.path)
			nodetest.WantCode(t, err, tc.code)
		})
	}
}

// TestCopyIncomplete checks the endings of a Copy that cannot archive
// everything: the archive is still complete and the call says what is
// missing.
func TestCopyIncomplete(t *testing.T) {
	ft := newFileTree(t)
	c, _, _ := nodetest.Start(t, node.Config{ReadRoots: []string{ft.root}}, "unix")

	t.Run("socket left out", func(t *testing.T) {
		lis, err := net.Listen("unix", filepath.Join(ft.root, "a", "sock"))
		if err != nil {
			t.Skipf("unix socket: %v", err)
		}
		defer lis.Close()
		got, _, err := copyArchive(t, c, ft.root)
		nodetest.WantCode(t, err, codes.DataLoss)
		if msg := err.Error(); !strings.Contains(msg, "a/sock") || !strings.Contains(msg, "1 entries left out") {
			t.Fatalf("err = %v, want one entry, a/sock, left out", err)
		}
		if _, ok := got["a/sock"]; ok || got["top.txt"].data != "top" || got["a/b/two.bin"].data != string(ft.two) {
			t.Errorf("archive = %v", abbreviateAll(got))
		}
	})
	t.Run("byte limit", func(t *testing.T) {
		files.SetFileLimits(t, 1000, 1000) // two.bin does not fit
		_, order, err := copyArchive(t, c, ft.root)
		nodetest.WantCode(t, err, codes.ResourceExhausted)
		if !slices.Equal(order, []string{"a/", "a/b/"}) {
			t.Errorf("archive holds %q, want what precedes a/b/two.bin", order)
		}
	})
	t.Run("entry limit", func(t *testing.T) {
		files.SetFileLimits(t, 3, 1<<30)
		_, order, err := copyArchive(t, c, ft.root)
		nodetest.WantCode(t, err, codes.ResourceExhausted)
		if !slices.Equal(order, []string{"a/", "a/b/"}) {
			t.Errorf("archive holds %q", order)
		}
	})
}

// abbreviate keeps failure messages short when an entry holds two.bin.
func abbreviate(e tarEntry) tarEntry {
	if len(e.data) > 40 {
		e.data = e.data[:40] + "..."
	}
	return e
}

func abbreviateAll(m map[string]tarEntry) map[string]tarEntry {
	out := map[string]tarEntry{}
	for k, v := range m {
		out[k] = abbreviate(v)
	}
	return out
}
