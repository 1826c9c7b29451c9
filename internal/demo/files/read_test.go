package files_test

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"

	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

func TestRead(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	big := make([]byte, 100<<10+123) // several 32 KiB chunks plus a partial one
	_, _ = rand.Read(big)
	nodetest.MustWrite(t, filepath.Join(root, "big"), big)
	nodetest.MustWrite(t, filepath.Join(root, "empty"), nil)
	nodetest.MustWrite(t, filepath.Join(outside, "secret"), []byte("secret"))
	if err := os.Mkdir(filepath.Join(root, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	nodetest.MustSymlink(t, "big", filepath.Join(root, "inner-link"))
	nodetest.MustSymlink(t, filepath.Join(outside, "secret"), filepath.Join(root, "escape-file"))
	nodetest.MustSymlink(t, outside, filepath.Join(root, "escape-dir"))

	c, _, _ := nodetest.Start(t, node.Config{ReadRoots: []string{root}}, "unix")
	read := func(t *testing.T, path string) ([]byte, error) {
		stream, err := c.Read(testkit.Context(t), &machine.ReadRequest{Path: path})
		if err != nil {
			return nil, err
		}
		chunks, err := nodetest.RecvAll(stream)
		for _, ch := range chunks {
			if len(ch) > 32<<10 {
				t.Errorf("chunk of %d bytes, want at most 32 KiB", len(ch))
			}
		}
		return bytes.Join(chunks, nil), err
	}

	for _, tc := range []struct {
		name, path string
		want       []byte
		code       codes.Code
	}{
		{"file", filepath.Join(root, "big"), big, codes.OK},
		{"empty file", filepath.Join(root, "empty"), nil, codes.OK},
		{"symlink inside root", filepath.Join(root, "inner-link"), big, codes.OK},
		{"dot-dot staying inside", filepath.Join(root, "dir") + "/../big", big, codes.OK},
		{"outside roots", filepath.Join(outside, "secret"), nil, codes.PermissionDenied},
		{"dot-dot traversal", root + "/../" + filepath.Base(outside) + "/secret", nil, codes.PermissionDenied},
		{"deep dot-dot traversal", root + "/dir/../../../../../../etc/passwd", nil, codes.PermissionDenied},
		{"symlink escape", filepath.Join(root, "escape-file"), nil, codes.PermissionDenied},
		{"symlinked dir escape", filepath.Join(root, "escape-dir", "secret"), nil, codes.PermissionDenied},
		{"missing behind escape", filepath.Join(root, "escape-dir", "missing"), nil, codes.PermissionDenied},
		{"missing", filepath.Join(root, "missing"), nil, codes.NotFound},
		{"directory", filepath.Join(root, "dir"), nil, codes.InvalidArgument},
		{"relative", "big", nil, codes.InvalidArgument},
		{"empty path", "", nil, codes.InvalidArgument},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := read(t, tc.path)
			nodetest.WantCode(t, err, tc.code)
			if tc.code == codes.OK && !bytes.Equal(got, tc.want) {
				t.Errorf("read %d bytes, want the file's %d", len(got), len(tc.want))
			}
		})
	}
}

func TestReadDefaultRoots(t *testing.T) {
	if _, err := os.Stat("/proc/self/status"); err != nil {
		t.Skipf("no procfs: %v", err)
	}
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	stream, err := c.Read(testkit.Context(t), &machine.ReadRequest{Path: "/proc/self/status"})
	if err != nil {
		t.Fatal(err)
	}
	chunks, err := nodetest.RecvAll(stream)
	if err != nil || !bytes.Contains(bytes.Join(chunks, nil), []byte("Name:")) {
		t.Fatalf("read /proc/self/status: %q, %v", chunks, err)
	}
	if fi, err := os.Lstat("/etc/passwd"); err == nil && fi.Mode().IsRegular() {
		stream, err = c.Read(testkit.Context(t), &machine.ReadRequest{Path: "/etc/passwd"})
		if err == nil {
			chunks, err = nodetest.RecvAll(stream)
		}
		if err != nil || !bytes.Contains(bytes.Join(chunks, nil), []byte("root:")) {
			t.Fatalf("read /etc/passwd: %v", err)
		}
	}
	stream, err = c.Read(testkit.Context(t), &machine.ReadRequest{Path: "/var/log/nosuch"})
	if err == nil {
		_, err = nodetest.RecvAll(stream)
	}
	nodetest.WantCode(t, err, codes.PermissionDenied)
}

// TestReadBootIDIsTheSimulatedMachines: the kernel's boot ID, however the
// path is written, is the simulated machine's, not the host's: the host's
// never changes when the node reboots in simulation.
func TestReadBootIDIsTheSimulatedMachines(t *testing.T) {
	host, err := os.ReadFile("/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Skipf("no boot ID here: %v", err)
	}
	for _, tc := range []struct {
		name, path string
		roots      []string
	}{
		{"default roots", "/proc/sys/kernel/random/boot_id", nil},
		{"not under a root", "/proc/sys/kernel/random/boot_id", []string{t.TempDir()}},
		{"through a symlink", "/proc/self/root/proc/sys/kernel/random/boot_id", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, _, srv := nodetest.Start(t, node.Config{ReadRoots: tc.roots}, "unix")
			stream, err := c.Read(testkit.Context(t), &machine.ReadRequest{Path: tc.path})
			if err != nil {
				t.Fatal(err)
			}
			chunks, err := nodetest.RecvAll(stream)
			if err != nil {
				t.Fatal(err)
			}
			got := bytes.Join(chunks, nil)
			if want := srv.BootID() + "\n"; string(got) != want || string(got) == string(host) || len(got) != 37 {
				t.Errorf("boot ID %q, want the simulated machine's %q (the host's is %q)", got, want, host)
			}
		})
	}
}
