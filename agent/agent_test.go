package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/agent"
	"github.com/apid/apid/internal/testkit"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// etcd's members talk to each other over HTTP; the connections of
		// a stopped member close on their own timers, after the tests.
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreAnyFunction("net/http.(*conn).serve"),
		goleak.IgnoreAnyFunction("net/http.(*connReader).backgroundRead"))
}

// start serves a new agent on a fresh unix socket ("unix") or on
// 127.0.0.1:0 ("tcp") and returns a client for it.
func start(t *testing.T, cfg agent.Config, network string) (machine.MachineServiceClient, *grpc.ClientConn, *agent.Server) {
	t.Helper()
	var addr string
	switch network {
	case "unix":
		addr = "unix://" + filepath.Join(t.TempDir(), "a.sock")
	case "tcp":
		addr = "127.0.0.1:0"
	default:
		t.Fatalf("unknown network %q", network)
	}
	srv, lis := serve(t, cfg, addr)
	target := addr
	if network == "tcp" {
		target = "passthrough:///" + lis.Addr().String()
	}
	conn, err := grpc.NewClient(target, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return machine.NewMachineServiceClient(conn), conn, srv
}

// serve runs a new agent on addr until the test ends; cleanup stops the
// server, waits for Serve to return and closes the agent, which ends any
// lifecycle simulation still running.
func serve(t *testing.T, cfg agent.Config, addr string) (*agent.Server, net.Listener) {
	t.Helper()
	lis, err := agent.Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := agent.New(cfg)
	g := grpc.NewServer(srv.ServerOptions()...)
	srv.Register(g)
	served := make(chan error, 1)
	go func() { served <- g.Serve(lis) }()
	t.Cleanup(func() {
		g.Stop()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
		srv.Close()
	})
	return srv, lis
}

// recvAll collects a server stream's payloads until it ends.
func recvAll(stream grpc.ServerStreamingClient[common.Data]) ([][]byte, error) {
	var out [][]byte
	for {
		d, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, d.GetBytes())
	}
}

func wantCode(t *testing.T, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("code = %v (%v), want %v", got, err, want)
	}
}

func TestTransports(t *testing.T) {
	for _, network := range []string{"unix", "tcp"} {
		t.Run(network, func(t *testing.T) {
			c, _, _ := start(t, agent.Config{Hostname: "node-" + network}, network)
			ctx := testkit.Context(t)
			h, err := c.Hostname(ctx, &emptypb.Empty{})
			if err != nil {
				t.Fatal(err)
			}
			if len(h.GetMessages()) != 1 || h.GetMessages()[0].GetHostname() != "node-"+network {
				t.Fatalf("Hostname = %v", h)
			}
			if _, err := c.Version(ctx, &emptypb.Empty{}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestOfficialClient checks wire compatibility with the Talos Go client,
// whose helpers filter replies by their metadata and reassemble Read streams.
func TestOfficialClient(t *testing.T) {
	root := t.TempDir()
	mustWrite(t, filepath.Join(root, "f"), []byte("hello from the agent"))
	sock := filepath.Join(t.TempDir(), "a.sock")
	serve(t, agent.Config{Hostname: "official", ReadRoots: []string{root}}, "unix://"+sock)

	ctx := testkit.Context(t)
	c, err := talosclient.New(ctx, talosclient.WithUnixSocket(sock),
		talosclient.WithGRPCDialOptions(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	v, err := c.Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if tag := v.GetMessages()[0].GetVersion().GetTag(); tag != agent.VersionTag {
		t.Errorf("tag = %q", tag)
	}
	mem, err := c.Memory(ctx)
	if err != nil && status.Code(err) != codes.Unavailable {
		t.Fatal(err)
	}
	if err == nil && mem.GetMessages()[0].GetMeminfo().GetMemtotal() == 0 {
		t.Error("memtotal = 0")
	}
	r, err := c.Read(ctx, filepath.Join(root, "f"))
	if err != nil {
		t.Fatal(err)
	}
	data, err := io.ReadAll(r)
	r.Close()
	if err != nil || string(data) != "hello from the agent" {
		t.Errorf("Read = %q, %v", data, err)
	}
}

func TestVersion(t *testing.T) {
	c, _, _ := start(t, agent.Config{}, "unix")
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetMessages()) != 1 {
		t.Fatalf("got %d messages, want 1", len(resp.GetMessages()))
	}
	m := resp.GetMessages()[0]
	v := m.GetVersion()
	if v.GetTag() != agent.VersionTag || v.GetGoVersion() != runtime.Version() ||
		v.GetOs() != runtime.GOOS || v.GetArch() != runtime.GOARCH || v.GetSha() == "" {
		t.Errorf("version = %v", v)
	}
	if p := m.GetPlatform(); p.GetName() != agent.PlatformName || p.GetMode() != agent.PlatformMode {
		t.Errorf("platform = %v", p)
	}
	if m.GetMetadata() != nil {
		t.Errorf("metadata = %v, want none: stamping is the proxy's job", m.GetMetadata())
	}
}

func TestHostnameDefault(t *testing.T) {
	want, err := os.Hostname()
	if err != nil || want == "" {
		want = "localhost"
	}
	c, _, _ := start(t, agent.Config{}, "unix")
	resp, err := c.Hostname(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetMessages()[0].GetHostname(); got != want {
		t.Errorf("hostname = %q, want %q", got, want)
	}
}

func TestMemory(t *testing.T) {
	t.Run("host", func(t *testing.T) {
		if _, err := os.Stat(agent.DefaultMeminfoPath); err != nil {
			t.Skipf("no %s: %v", agent.DefaultMeminfoPath, err)
		}
		c, _, _ := start(t, agent.Config{}, "unix")
		resp, err := c.Memory(testkit.Context(t), &emptypb.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		mi := resp.GetMessages()[0].GetMeminfo()
		if mi.GetMemtotal() == 0 || mi.GetMemfree() > mi.GetMemtotal() {
			t.Errorf("meminfo = %v", mi)
		}
	})
	t.Run("fixture", func(t *testing.T) {
		c, _, _ := start(t, agent.Config{MeminfoPath: "testdata/meminfo"}, "unix")
		resp, err := c.Memory(testkit.Context(t), &emptypb.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		mi := resp.GetMessages()[0].GetMeminfo()
		if mi.GetMemtotal() != 1000 || mi.GetActiveanon() != 9008 || mi.GetCommittedas() != 34033 ||
			mi.GetHugepagestotal() != 46045 || mi.GetHugepagesize() != 50049 {
			t.Errorf("meminfo = %v", mi)
		}
	})
	t.Run("unreadable", func(t *testing.T) {
		c, _, _ := start(t, agent.Config{MeminfoPath: filepath.Join(t.TempDir(), "missing")}, "unix")
		_, err := c.Memory(testkit.Context(t), &emptypb.Empty{})
		wantCode(t, err, codes.Unavailable)
	})
}

func TestReboot(t *testing.T) {
	c, _, srv := start(t, agent.Config{}, "unix")
	resp, err := c.Reboot(testkit.Context(t), &machine.RebootRequest{Mode: machine.RebootRequest_POWERCYCLE})
	if err != nil {
		t.Fatal(err)
	}
	uuid := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	if id := resp.GetMessages()[0].GetActorId(); !uuid.MatchString(id) {
		t.Errorf("actor id %q is not a UUID", id)
	}
	got := srv.Reboots()
	if len(got) != 1 || got[0].GetMode() != machine.RebootRequest_POWERCYCLE {
		t.Fatalf("Reboots() = %v", got)
	}
	got[0].Mode = machine.RebootRequest_FORCE
	if srv.Reboots()[0].GetMode() != machine.RebootRequest_POWERCYCLE {
		t.Error("Reboots() exposes the recorded requests instead of copies")
	}
}

func TestRead(t *testing.T) {
	root := t.TempDir()
	outside := t.TempDir()
	big := make([]byte, 100<<10+123) // several 32 KiB chunks plus a partial one
	_, _ = rand.Read(big)
	mustWrite(t, filepath.Join(root, "big"), big)
	mustWrite(t, filepath.Join(root, "empty"), nil)
	mustWrite(t, filepath.Join(outside, "secret"), []byte("secret"))
	if err := os.Mkdir(filepath.Join(root, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	mustSymlink(t, "big", filepath.Join(root, "inner-link"))
	mustSymlink(t, filepath.Join(outside, "secret"), filepath.Join(root, "escape-file"))
	mustSymlink(t, outside, filepath.Join(root, "escape-dir"))

	c, _, _ := start(t, agent.Config{ReadRoots: []string{root}}, "unix")
	read := func(t *testing.T, path string) ([]byte, error) {
		stream, err := c.Read(testkit.Context(t), &machine.ReadRequest{Path: path})
		if err != nil {
			return nil, err
		}
		chunks, err := recvAll(stream)
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
			wantCode(t, err, tc.code)
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
	c, _, _ := start(t, agent.Config{}, "unix")
	stream, err := c.Read(testkit.Context(t), &machine.ReadRequest{Path: "/proc/self/status"})
	if err != nil {
		t.Fatal(err)
	}
	chunks, err := recvAll(stream)
	if err != nil || !bytes.Contains(bytes.Join(chunks, nil), []byte("Name:")) {
		t.Fatalf("read /proc/self/status: %q, %v", chunks, err)
	}
	if fi, err := os.Lstat("/etc/passwd"); err == nil && fi.Mode().IsRegular() {
		stream, err = c.Read(testkit.Context(t), &machine.ReadRequest{Path: "/etc/passwd"})
		if err == nil {
			chunks, err = recvAll(stream)
		}
		if err != nil || !bytes.Contains(bytes.Join(chunks, nil), []byte("root:")) {
			t.Fatalf("read /etc/passwd: %v", err)
		}
	}
	stream, err = c.Read(testkit.Context(t), &machine.ReadRequest{Path: "/var/log/nosuch"})
	if err == nil {
		_, err = recvAll(stream)
	}
	wantCode(t, err, codes.PermissionDenied)
}

func TestDmesg(t *testing.T) {
	c, _, _ := start(t, agent.Config{}, "unix")
	stream, err := c.Dmesg(testkit.Context(t), &machine.DmesgRequest{})
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := recvAll(stream)
	if err != nil {
		t.Fatal(err)
	}
	if len(msgs) == 0 {
		t.Fatal("no kernel log messages")
	}
	t.Logf("%d messages; first: %q", len(msgs), msgs[0])
	for _, m := range msgs {
		if !bytes.HasSuffix(m, []byte("\n")) || bytes.Count(m, []byte("\n")) != 1 {
			t.Fatalf("message %q is not one line", m)
		}
	}
}

func TestDmesgFallback(t *testing.T) {
	missing := filepath.Join(t.TempDir(), "kmsg")
	c, _, _ := start(t, agent.Config{KernelLogPath: missing}, "unix")

	t.Run("once", func(t *testing.T) {
		stream, err := c.Dmesg(testkit.Context(t), &machine.DmesgRequest{})
		if err != nil {
			t.Fatal(err)
		}
		msgs, err := recvAll(stream)
		if err != nil {
			t.Fatal(err)
		}
		if len(msgs) < 2 || !bytes.Contains(msgs[0], []byte("this is synthetic data")) ||
			!bytes.Contains(msgs[0], []byte(missing)) || !bytes.Contains(msgs[1], []byte("example agent ready")) {
			t.Fatalf("fallback = %q", msgs)
		}
	})
	t.Run("follow", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testkit.Context(t))
		defer cancel()
		stream, err := c.Dmesg(ctx, &machine.DmesgRequest{Follow: true, Tail: true})
		if err != nil {
			t.Fatal(err)
		}
		first, err := stream.Recv()
		if err != nil || !bytes.Contains(first.GetBytes(), []byte("synthetic")) {
			t.Fatalf("first message %q, %v", first.GetBytes(), err)
		}
		cancel()
		_, err = recvAll(stream)
		wantCode(t, err, codes.Canceled)
	})
}

// TestDmesgFollow drives the follow path with a FIFO standing in for
// /dev/kmsg: like the device, it is pollable and a read returns EAGAIN until
// a record is written.
func TestDmesgFollow(t *testing.T) {
	fifo := filepath.Join(t.TempDir(), "kmsg")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		t.Skipf("mkfifo: %v", err)
	}
	// O_RDWR neither blocks nor lets the reader see end-of-file.
	w, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	c, _, _ := start(t, agent.Config{KernelLogPath: fifo}, "unix")
	ctx, cancel := context.WithCancel(testkit.Context(t))
	defer cancel()
	stream, err := c.Dmesg(ctx, &machine.DmesgRequest{Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Header(); err != nil { // the log is open from here on
		t.Fatal(err)
	}
	if _, err := w.WriteString("3,42,2000001,-;disk on fire\n"); err != nil {
		t.Fatal(err)
	}
	d, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if got := string(d.GetBytes()); !strings.HasPrefix(got, "kern:     err: [") || !strings.HasSuffix(got, "]: disk on fire\n") {
		t.Fatalf("record = %q", got)
	}
	cancel()
	_, err = recvAll(stream)
	wantCode(t, err, codes.Canceled)
}

// TestDmesgFollowKernel writes a record to the real kernel log and expects a
// following stream to deliver it. Because it leaves a line in the host's
// kernel log it runs only when APID_AGENT_TEST_KMSG_WRITE=1.
func TestDmesgFollowKernel(t *testing.T) {
	if os.Getenv("APID_AGENT_TEST_KMSG_WRITE") != "1" {
		t.Skip("set APID_AGENT_TEST_KMSG_WRITE=1 to write a test record to the kernel log")
	}
	w, err := os.OpenFile(agent.DefaultKernelLogPath, os.O_WRONLY, 0)
	if err != nil {
		t.Skipf("kernel log not writable: %v", err)
	}
	defer w.Close()
	c, _, _ := start(t, agent.Config{}, "unix")
	ctx, cancel := context.WithCancel(testkit.Context(t))
	defer cancel()
	stream, err := c.Dmesg(ctx, &machine.DmesgRequest{Follow: true, Tail: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Header(); err != nil { // the log is open from here on
		t.Fatal(err)
	}
	marker := "apid agent test marker " + strconv.FormatInt(time.Now().UnixNano(), 36)
	if _, err := w.WriteString("<6>" + marker + "\n"); err != nil {
		t.Skipf("kernel log not writable: %v", err)
	}
	for {
		d, err := stream.Recv()
		if err != nil {
			t.Fatalf("waiting for %q: %v", marker, err)
		}
		if bytes.Contains(d.GetBytes(), []byte("synthetic data")) {
			t.Skipf("kernel log not readable: %s", d.GetBytes())
		}
		if bytes.Contains(d.GetBytes(), []byte(marker)) {
			if !bytes.Contains(d.GetBytes(), []byte("info")) {
				t.Errorf("record %q lacks its level", d.GetBytes())
			}
			break
		}
	}
	cancel()
	_, err = recvAll(stream)
	wantCode(t, err, codes.Canceled)
}

func TestLogs(t *testing.T) {
	c, _, srv := start(t, agent.Config{Hostname: "logs-node", BesideServices: []string{"apid"}}, "unix")
	logs := func(t *testing.T, req *machine.LogsRequest) ([][]byte, error) {
		stream, err := c.Logs(testkit.Context(t), req)
		if err != nil {
			return nil, err
		}
		return recvAll(stream)
	}
	// Two served calls so that the log holds more than the start-up line.
	for range 2 {
		if _, err := c.Hostname(testkit.Context(t), &emptypb.Empty{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("all", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "agent", TailLines: -1})
		if err != nil {
			t.Fatal(err)
		}
		if len(lines) < 3 || !bytes.Contains(lines[0], []byte("example agent ready")) ||
			!bytes.Contains(lines[1], []byte("grpc.method=Hostname")) {
			t.Fatalf("lines = %q", lines)
		}
	})
	t.Run("tail", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "apid-agent", TailLines: 1})
		if err != nil {
			t.Fatal(err)
		}
		if len(lines) != 1 || !bytes.Contains(lines[0], []byte("finished call")) {
			t.Fatalf("lines = %q", lines)
		}
	})
	t.Run("zero tail", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "agent"})
		if err != nil || len(lines) != 0 {
			t.Fatalf("lines = %q, %v; want none", lines, err)
		}
	})
	t.Run("unknown id", func(t *testing.T) {
		_, err := logs(t, &machine.LogsRequest{Id: "kubelet"})
		wantCode(t, err, codes.NotFound)
		if !strings.HasSuffix(status.Convert(err).Message(), `log "kubelet" was not registered`) {
			t.Errorf("not machined's words: %v", err)
		}
	})
	t.Run("machined is the agent's own", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "machined", TailLines: -1})
		if err != nil || len(lines) < 3 || !bytes.Contains(lines[0], []byte("example agent ready")) {
			t.Fatalf("lines = %q, %v", lines, err)
		}
	})
	t.Run("a simulated service's", func(t *testing.T) {
		if _, err := c.ServiceRestart(testkit.Context(t), &machine.ServiceRestartRequest{Id: agent.SimulatedServices[0]}); err != nil {
			t.Fatal(err)
		}
		lines, err := logs(t, &machine.LogsRequest{Id: agent.SimulatedServices[0], TailLines: -1})
		if err != nil {
			t.Fatal(err)
		}
		text := string(bytes.Join(lines, nil))
		for _, want := range []string{"service[" + agent.SimulatedServices[0] + "](Preparing): Simulated start (agent start)", "(Running)", "(Stopping): Simulated stop (restart requested through the API)"} {
			if !strings.Contains(text, want) {
				t.Errorf("no %q in\n%s", want, text)
			}
		}
		last, err := logs(t, &machine.LogsRequest{Id: agent.SimulatedServices[0], TailLines: 1})
		if err != nil || len(last) != 1 || !bytes.Contains(last[0], []byte("Health check successful")) {
			t.Errorf("tail 1: %q, %v", last, err)
		}
	})
	t.Run("kernel", func(t *testing.T) {
		lines, err := logs(t, &machine.LogsRequest{Id: "kernel", TailLines: 2})
		if err != nil || len(lines) == 0 || len(lines) > 2 {
			t.Fatalf("kernel tail 2: %d lines, %v", len(lines), err)
		}
		// (Not compared line for line: other tests' network namespaces
		// make the kernel log as this runs.)
		all, err := logs(t, &machine.LogsRequest{Id: "kernel", TailLines: -1})
		if err != nil || len(all) < len(lines) {
			t.Fatalf("kernel: %d lines, %v; its tail of 2 had %d", len(all), err, len(lines))
		}
	})
	t.Run("controller-runtime", func(t *testing.T) {
		// The runtime logs each controller it starts.
		var text string
		testkit.Eventually(5*time.Second, func() bool {
			lines, err := logs(t, &machine.LogsRequest{Id: "controller-runtime", TailLines: -1})
			if err != nil {
				t.Fatal(err)
			}
			text = string(bytes.Join(lines, nil))
			return strings.Contains(text, "MachineTypeController")
		})
		if !strings.Contains(text, "MachineTypeController") {
			t.Errorf("controller-runtime log:\n%s", text)
		}
	})
	t.Run("a service beside the agent", func(t *testing.T) {
		if srv.BesideLog("kubelet") != nil {
			t.Error("a log for a service not beside the agent")
		}
		fmt.Fprintln(srv.BesideLog("apid"), "apid: serving on 127.0.0.11:50000")
		lines, err := logs(t, &machine.LogsRequest{Id: "apid", TailLines: 1})
		if err != nil || len(lines) != 1 || !bytes.Contains(lines[0], []byte("serving on")) {
			t.Errorf("apid tail 1: %q, %v", lines, err)
		}
	})
	t.Run("containers", func(t *testing.T) {
		_, err := logs(t, &machine.LogsRequest{Id: "kube-apiserver", Driver: common.ContainerDriver_CRI})
		wantCode(t, err, codes.NotFound)
	})
	t.Run("follow", func(t *testing.T) {
		ctx, cancel := context.WithCancel(testkit.Context(t))
		defer cancel()
		stream, err := c.Logs(ctx, &machine.LogsRequest{Id: "agent", Follow: true})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := stream.Header(); err != nil { // the stream's start point is fixed
			t.Fatal(err)
		}
		if _, err := c.Reboot(ctx, &machine.RebootRequest{}); err != nil {
			t.Fatal(err)
		}
		d, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Contains(d.GetBytes(), []byte("reboot requested")) {
			t.Fatalf("first followed line = %q", d.GetBytes())
		}
		cancel()
		_, err = recvAll(stream)
		wantCode(t, err, codes.Canceled)
	})
}

func TestEtcdRecover(t *testing.T) {
	c, _, _ := start(t, agent.Config{}, "unix")
	stream, err := c.EtcdRecover(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	total := 0
	for i := range 5 {
		chunk := make([]byte, 10_000*i+1)
		_, _ = rand.Read(chunk)
		h.Write(chunk)
		total += len(chunk)
		if err := stream.Send(&common.Data{Bytes: chunk}); err != nil {
			t.Fatal(err)
		}
	}
	resp, err := stream.CloseAndRecv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetMessages()) != 1 {
		t.Errorf("got %d messages, want 1", len(resp.GetMessages()))
	}
	tr := stream.Trailer()
	if got := tr.Get(agent.TrailerReceivedBytes); !slices.Equal(got, []string{strconv.Itoa(total)}) {
		t.Errorf("%s = %q, want %d", agent.TrailerReceivedBytes, got, total)
	}
	if got, want := tr.Get(agent.TrailerReceivedSHA256), hex.EncodeToString(h.Sum(nil)); !slices.Equal(got, []string{want}) {
		t.Errorf("%s = %q, want %s", agent.TrailerReceivedSHA256, got, want)
	}
}

// TestUnimplemented: what the agent does not simulate says why, in a
// status a client can act on, never gRPC's bare "not implemented".
func TestUnimplemented(t *testing.T) {
	c, _, _ := start(t, agent.Config{}, "unix")
	ctx := testkit.Context(t)
	_, err := c.EtcdMemberList(ctx, &machine.EtcdMemberListRequest{})
	wantCode(t, err, codes.Unimplemented)
	for name, call := range map[string]func() error{
		"Bootstrap": func() error { _, err := c.Bootstrap(ctx, &machine.BootstrapRequest{}); return err },
		"Rollback":  func() error { _, err := c.Rollback(ctx, &machine.RollbackRequest{}); return err },
		"Reset":     func() error { _, err := c.Reset(ctx, &machine.ResetRequest{}); return err },
		"Restart":   func() error { _, err := c.Restart(ctx, &machine.RestartRequest{Id: "trustd"}); return err },
		"MetaWrite": func() error { _, err := c.MetaWrite(ctx, &machine.MetaWriteRequest{}); return err },
		"Kubeconfig": func() error {
			s, err := c.Kubeconfig(ctx, &emptypb.Empty{})
			if err == nil {
				_, err = s.Recv()
			}
			return err
		},
		"EtcdDowngradeCancel": func() error { _, err := c.EtcdDowngradeCancel(ctx, &emptypb.Empty{}); return err },
	} {
		err := call()
		if code := status.Code(err); (code != codes.Unimplemented && code != codes.FailedPrecondition) || strings.Contains(err.Error(), "not implemented") {
			t.Errorf("%s: %v, want a reason", name, err)
		}
	}
	if resp, err := c.LogsContainers(ctx, &emptypb.Empty{}); err != nil || len(resp.GetMessages()) != 1 {
		t.Errorf("LogsContainers: %v, %v", resp, err)
	}
}

func TestReflection(t *testing.T) {
	_, conn, _ := start(t, agent.Config{}, "unix")
	stream, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	defer stream.CloseSend()
	ask := func(req *reflectionpb.ServerReflectionRequest) *reflectionpb.ServerReflectionResponse {
		t.Helper()
		if err := stream.Send(req); err != nil {
			t.Fatal(err)
		}
		resp, err := stream.Recv()
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	list := ask(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{},
	})
	var names []string
	for _, s := range list.GetListServicesResponse().GetService() {
		names = append(names, s.GetName())
	}
	if !slices.Contains(names, "machine.MachineService") {
		t.Fatalf("services = %v", names)
	}
	desc := ask(&reflectionpb.ServerReflectionRequest{
		MessageRequest: &reflectionpb.ServerReflectionRequest_FileContainingSymbol{FileContainingSymbol: "machine.MachineService"},
	})
	if len(desc.GetFileDescriptorResponse().GetFileDescriptorProto()) == 0 {
		t.Fatalf("no descriptor for machine.MachineService: %v", desc)
	}
}

func TestListenUnix(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "s.sock")

	// A socket file left behind by a server that is gone.
	stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()

	l, err := agent.Listen("unix://" + sock)
	if err != nil {
		t.Fatalf("over a stale socket: %v", err)
	}
	defer l.Close()
	fi, err := os.Lstat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != os.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Errorf("socket mode = %v, want socket 0600", fi.Mode())
	}

	if l2, err := agent.Listen("unix://" + sock); err == nil {
		l2.Close()
		t.Error("Listen replaced a live socket")
	}
	regular := filepath.Join(dir, "file")
	mustWrite(t, regular, []byte("keep me"))
	if l3, err := agent.Listen("unix://" + regular); err == nil {
		l3.Close()
		t.Error("Listen replaced a regular file")
	}
	if data, _ := os.ReadFile(regular); string(data) != "keep me" {
		t.Error("regular file was modified")
	}
	if _, err := agent.Listen("unix://relative.sock"); err == nil || !strings.Contains(err.Error(), "absolute") {
		t.Errorf("unix://relative: err = %v", err)
	}
}

func TestListenTCP(t *testing.T) {
	l, err := agent.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.Addr().Network() != "tcp" {
		t.Errorf("network = %s", l.Addr().Network())
	}
	if _, err := agent.Listen("127.0.0.1:notaport"); err == nil {
		t.Error("bad port accepted")
	}
}

func mustWrite(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

func mustSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}

// TestCPUFreqStats: one message, one entry per CPU the kernel's cpufreq
// driver shows (none on many virtual machines), each with its limits in
// order.
func TestCPUFreqStats(t *testing.T) {
	c, _, _ := start(t, agent.Config{}, "unix")
	resp, err := c.CPUFreqStats(testkit.Context(t), &emptypb.Empty{})
	if err != nil || len(resp.GetMessages()) != 1 {
		t.Fatalf("%v, %v", resp, err)
	}
	dirs, _ := filepath.Glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq")
	stats := resp.GetMessages()[0].GetCpuFreqStats()
	if len(stats) != len(dirs) {
		t.Fatalf("%d entries for %d cpufreq directories", len(stats), len(dirs))
	}
	for i, s := range stats {
		if s.GetMaximumFrequency() < s.GetMinimumFrequency() {
			t.Errorf("cpu %d: max %d below min %d", i, s.GetMaximumFrequency(), s.GetMinimumFrequency())
		}
	}
}
