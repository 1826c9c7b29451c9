package nodetest

import (
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/testkit"
)

// Main runs a package's tests and fails them if goroutines are left
// running at the end, but for those opts name; call it from TestMain.
func Main(m *testing.M, opts ...goleak.Option) {
	goleak.VerifyTestMain(m, append([]goleak.Option{
		// etcd's members talk to each other over HTTP; the connections of
		// a stopped member close on their own timers, after the tests.
		goleak.IgnoreAnyFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreAnyFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreAnyFunction("net/http.(*conn).serve"),
		goleak.IgnoreAnyFunction("net/http.(*connReader).backgroundRead"),
	}, opts...)...)
}

// Start serves a new node on a fresh unix socket ("unix") or on
// 127.0.0.1:0 ("tcp") and returns a client for it.
func Start(t *testing.T, cfg node.Config, network string) (machine.MachineServiceClient, *grpc.ClientConn, *node.Server) {
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
	srv, lis := Serve(t, cfg, addr)
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

// Serve runs a new node on addr until the test ends; cleanup stops the
// server, waits for Serve to return and closes the node, which ends any
// lifecycle simulation still running.
func Serve(t *testing.T, cfg node.Config, addr string) (*node.Server, net.Listener) {
	t.Helper()
	lis, err := node.Listen(addr)
	if err != nil {
		t.Fatal(err)
	}
	srv := node.New(cfg)
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

// OfficialClient serves a new node on a unix socket and returns the Talos
// Go client for it, whose helpers also check reply metadata; for the
// methods it has no helper for, its MachineClient field is the generated
// client on the same connection.
func OfficialClient(t *testing.T, cfg node.Config) (*talosclient.Client, *node.Server) {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "a.sock")
	srv, _ := Serve(t, cfg, "unix://"+sock)
	c, err := talosclient.New(testkit.Context(t), talosclient.WithUnixSocket(sock),
		talosclient.WithGRPCDialOptions(grpc.WithTransportCredentials(insecure.NewCredentials())))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, srv
}

// RecvAll collects a server stream's payloads until it ends.
func RecvAll(stream grpc.ServerStreamingClient[common.Data]) ([][]byte, error) {
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

// WantCode fails the test unless err has the status code want.
func WantCode(t *testing.T, err error, want codes.Code) {
	t.Helper()
	if got := status.Code(err); got != want {
		t.Fatalf("code = %v (%v), want %v", got, err, want)
	}
}

// MustWrite writes a file of mode 0644.
func MustWrite(t *testing.T, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o644); err != nil {
		t.Fatal(err)
	}
}

// MustSymlink makes link point to target.
func MustSymlink(t *testing.T, target, link string) {
	t.Helper()
	if err := os.Symlink(target, link); err != nil {
		t.Fatal(err)
	}
}
