package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/agent"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/pki"
)

// TestGatewayInProcess starts an agent and a whole gateway in this process
// on 127.0.0.1 and fans a call out to the node itself under two names.
func TestGatewayInProcess(t *testing.T) {
	dir := t.TempDir()
	ca, err := pki.NewCA("test", time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) string {
		path := filepath.Join(dir, name)
		if err := pki.WriteFile(path, data, 0o600, false); err != nil {
			t.Fatal(err)
		}
		return path
	}
	nodeCrt, nodeKey, err := ca.IssueNode("node-1", nil, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	adminCrt, adminKey, err := ca.IssueClient("admin", []string{certs.RoleAdmin}, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}

	sock := filepath.Join(dir, "agent.sock")
	agentLis, err := agent.Listen("unix://" + sock)
	if err != nil {
		t.Fatal(err)
	}
	agentSrv := grpc.NewServer()
	agent.New(agent.Config{Hostname: "node-1"}).Register(agentSrv)
	go func() { _ = agentSrv.Serve(agentLis) }()
	t.Cleanup(agentSrv.Stop)

	cfg := Default()
	cfg.CA, cfg.Cert, cfg.Key = write("ca.crt", ca.CertPEM), write("node.crt", nodeCrt), write("node.key", nodeKey)
	cfg.Backend = "unix://" + sock
	cfg.SelfNames = []string{"127.0.0.1", "node-1"}
	gw, err := New(cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(gw.Close)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	served := make(chan error, 1)
	go func() { served <- gw.Serve(ctx, lis) }()

	pair, err := tls.X509KeyPair(adminCrt, adminKey)
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(ca.CertPEM)
	cc, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(
		&tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}, ServerName: "127.0.0.1"})))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	resp, err := machine.NewMachineServiceClient(cc).Version(
		metadata.AppendToOutgoingContext(ctx, "nodes", "127.0.0.1", "nodes", "node-1"), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Messages) != 2 || resp.Messages[0].Metadata.GetHostname() != "127.0.0.1" || resp.Messages[1].Metadata.GetHostname() != "node-1" {
		t.Fatalf("fan-out to the node under two names gave %v", resp.Messages)
	}
	cancel()
	if err := <-served; err != nil {
		t.Fatal(err)
	}
}
