package node_test

import (
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/identity"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

func TestMain(m *testing.M) { nodetest.Main(m) }

func TestTransports(t *testing.T) {
	for _, network := range []string{"unix", "tcp"} {
		t.Run(network, func(t *testing.T) {
			c, _, _ := nodetest.Start(t, node.Config{Hostname: "node-" + network}, network)
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
	nodetest.MustWrite(t, filepath.Join(root, "f"), []byte("hello from the agent"))
	sock := filepath.Join(t.TempDir(), "a.sock")
	nodetest.Serve(t, node.Config{Hostname: "official", ReadRoots: []string{root}}, "unix://"+sock)

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
	if tag := v.GetMessages()[0].GetVersion().GetTag(); tag != identity.VersionTag {
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

func TestHostnameDefault(t *testing.T) {
	want, err := os.Hostname()
	if err != nil || want == "" {
		want = "localhost"
	}
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	resp, err := c.Hostname(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if got := resp.GetMessages()[0].GetHostname(); got != want {
		t.Errorf("hostname = %q, want %q", got, want)
	}
}

// TestUnimplemented: what the agent does not simulate says why, in a
// status a client can act on, never gRPC's bare "not implemented".
func TestUnimplemented(t *testing.T) {
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	ctx := testkit.Context(t)
	_, err := c.EtcdMemberList(ctx, &machine.EtcdMemberListRequest{})
	nodetest.WantCode(t, err, codes.Unimplemented)
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
	_, conn, _ := nodetest.Start(t, node.Config{}, "unix")
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

	l, err := node.Listen("unix://" + sock)
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

	if l2, err := node.Listen("unix://" + sock); err == nil {
		l2.Close()
		t.Error("Listen replaced a live socket")
	}
	regular := filepath.Join(dir, "file")
	nodetest.MustWrite(t, regular, []byte("keep me"))
	if l3, err := node.Listen("unix://" + regular); err == nil {
		l3.Close()
		t.Error("Listen replaced a regular file")
	}
	if data, _ := os.ReadFile(regular); string(data) != "keep me" {
		t.Error("regular file was modified")
	}
	if _, err := node.Listen("unix://relative.sock"); err == nil || !strings.Contains(err.Error(), "absolute") {
		t.Errorf("unix://relative: err = %v", err)
	}
}

func TestListenTCP(t *testing.T) {
	l, err := node.Listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if l.Addr().Network() != "tcp" {
		t.Errorf("network = %s", l.Addr().Network())
	}
	if _, err := node.Listen("127.0.0.1:notaport"); err == nil {
		t.Error("bad port accepted")
	}
}
