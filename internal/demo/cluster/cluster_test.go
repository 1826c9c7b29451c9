package cluster_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/cluster"
	"github.com/apid/apid/internal/demo/identity"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/pki"
)

func TestMain(m *testing.M) {
	// A gateway's idle proxy workers wait a few seconds for more work.
	nodetest.Main(m, goleak.IgnoreTopFunction("github.com/apid/apid/proxy.(*workers).loop"))
}

// TestRunInProcess starts a one-node cluster in this process: it says it is
// up, its apid answers the admin it wrote a certificate for with the demo
// node's version, under the node's name, and it stops when its context
// ends.
func TestRunInProcess(t *testing.T) {
	const ip = "127.0.98.11"
	l, err := net.Listen("tcp", ip+":0")
	if err != nil {
		t.Skipf("no %s here: %v", ip, err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(testkit.Context(t))
	defer cancel()
	var out testkit.Buffer
	ran := make(chan error, 1)
	go func() {
		ran <- cluster.Run(ctx, cluster.Options{Dir: dir, Nodes: 1, Port: port, FirstIP: netip.MustParseAddr(ip),
			LogLevel: "warn", LogFormat: "text"}, &out)
	}()
	if !testkit.Eventually(time.Minute, func() bool { return strings.Contains(out.String(), "1 nodes up") }) {
		cancel()
		t.Fatalf("not up: %v\n%s", <-ran, out.String())
	}

	ca, err := pki.ReadCA(filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	admin, err := tls.LoadX509KeyPair(filepath.Join(dir, "admin.crt"), filepath.Join(dir, "admin.key"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AddCert(ca.Cert)
	cc, err := grpc.NewClient(net.JoinHostPort(ip, strconv.Itoa(port)),
		grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{admin}})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	// By name, as the demo's inventory knows its nodes.
	resp, err := machine.NewMachineServiceClient(cc).Version(metadata.AppendToOutgoingContext(ctx, "nodes", "node-1"), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if m := resp.GetMessages(); len(m) != 1 || m[0].GetVersion().GetTag() != identity.VersionTag || m[0].GetMetadata().GetHostname() != "node-1" {
		t.Errorf("Version of node-1 through the demo's apid: %v", m)
	}

	// The talosconfig names the first node by name: talosctl, which sends
	// the talosconfig's nodes as nodes, reaches node-1, stamped so.
	cfg, err := clientconfig.Open(filepath.Join(dir, "talosconfig"))
	if err != nil {
		t.Fatal(err)
	}
	if nodes := cfg.Contexts[cfg.Context].Nodes; len(nodes) != 1 || nodes[0] != "node-1" {
		t.Errorf("talosconfig nodes %v, want [node-1]", nodes)
	}
	cl, err := client.New(ctx, client.WithConfig(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if v, err := cl.Version(client.WithNodes(ctx, cfg.Contexts[cfg.Context].Nodes...)); err != nil || len(v.GetMessages()) != 1 || v.GetMessages()[0].GetMetadata().GetHostname() != "node-1" {
		t.Errorf("the talosconfig's own node: %v, %v", v, err)
	}

	// A second demo on the same addresses says so before writing anything.
	second := t.TempDir()
	err = cluster.Run(ctx, cluster.Options{Dir: second, Nodes: 1, Port: port, FirstIP: netip.MustParseAddr(ip), LogLevel: "warn", LogFormat: "text"}, io.Discard)
	if err == nil || !strings.Contains(err.Error(), ip+":"+strconv.Itoa(port)+" is taken") || !strings.Contains(err.Error(), "-first-ip 127.0.98.22") {
		t.Errorf("a second demo on the same addresses: %v", err)
	}
	if entries, _ := os.ReadDir(second); len(entries) != 0 {
		t.Errorf("the refused demo wrote %d files", len(entries))
	}

	cancel()
	if err := <-ran; err != nil {
		t.Errorf("Run after its context ended: %v", err)
	}
}

func TestRunNeedsANode(t *testing.T) {
	if err := cluster.Run(testkit.Context(t), cluster.Options{Dir: t.TempDir()}, &testkit.Buffer{}); err == nil {
		t.Error("a cluster of no nodes ran")
	}
}
