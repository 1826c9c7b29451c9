package gateway

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/pki"
)

// testGateway is a whole gateway and its local node agent, a test backend
// on a unix socket, in this process, on 127.0.0.1.
type testGateway struct {
	t        testing.TB
	logs     *testkit.Buffer // the gateway's JSON log
	gw       *Gateway
	cfg      Config
	addr     string
	dir      string
	ca       *pki.CA
	agentSrv *testbackend.Server // the local node agent, node-1 among the cluster's members
	cancel   context.CancelFunc
	served   chan error
}

// startGateway starts a local node agent and a gateway whose configuration
// edit may change (the admin endpoint is on a free port of 127.0.0.1).
func startGateway(t *testing.T, edit func(*Config)) *testGateway {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "agent.sock")
	agentLis, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	agent := testbackend.New("node-1", testbackend.Behaviour{})
	if err := agent.SetMembers([]testbackend.Member{{Hostname: "node-1", Addresses: []string{"127.0.0.1"}, ControlPlane: true}}); err != nil {
		t.Fatal(err)
	}
	go func() { _ = agent.Serve(agentLis) }()
	t.Cleanup(agent.Stop)
	tg := serveGateway(t, dir, "unix://"+sock, edit)
	tg.agentSrv = agent
	return tg
}

// serveGateway starts a gateway whose local node agent is at backend, with
// key material for node-1 at 127.0.0.1 and a forwarding identity written
// in dir, its configuration changed by edit, serving until the test ends.
func serveGateway(t testing.TB, dir, backend string, edit func(*Config)) *testGateway {
	t.Helper()
	tg := &testGateway{t: t, dir: dir, served: make(chan error, 1), logs: &testkit.Buffer{}}
	var err error
	if tg.ca, err = pki.NewCA("test", time.Hour, pki.KeyECDSA); err != nil {
		t.Fatal(err)
	}
	nodeCrt, nodeKey, err := tg.ca.IssueNode("node-1", []string{"node-1"}, []net.IP{net.IPv4(127, 0, 0, 1)}, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	fwdCrt, fwdKey, err := tg.ca.IssueForwarding("node-1", time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	cfg := Default()
	cfg.TLS.CA, cfg.TLS.Cert, cfg.TLS.Key = tg.write("ca.crt", tg.ca.CertPEM), tg.write("node.crt", nodeCrt), tg.write("node.key", nodeKey)
	cfg.TLS.ClientCert, cfg.TLS.ClientKey = tg.write("node-client.crt", fwdCrt), tg.write("node-client.key", fwdKey)
	cfg.Backend = backend
	cfg.Routing.SelfNames = []string{"127.0.0.1", "node-1"}
	cfg.AdminListen = "127.0.0.1:0"
	cfg.DrainDelay = 0
	if edit != nil {
		edit(&cfg)
	}
	tg.cfg = cfg
	level := new(slog.LevelVar)
	if tg.gw, err = New(cfg, NewLogger(tg.logs, level, "json"), WithLogLevel(level)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tg.gw.Close)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	tg.addr = lis.Addr().String()
	ctx, cancel := context.WithCancel(context.Background())
	tg.cancel = cancel
	t.Cleanup(cancel)
	go func() { tg.served <- tg.gw.Serve(ctx, lis) }()
	select {
	case <-tg.gw.Serving():
	case err := <-tg.served:
		t.Fatalf("Serve: %v", err)
	}
	return tg
}

func (tg *testGateway) write(name string, data []byte) string {
	path := filepath.Join(tg.dir, name)
	if err := pki.WriteFile(path, data, 0o600, true); err != nil {
		tg.t.Fatal(err)
	}
	return path
}

// client connects to the gateway with a new client certificate for cn
// carrying roles.
func (tg *testGateway) client(cn string, roles ...string) *grpc.ClientConn {
	tg.t.Helper()
	cc, err := grpc.NewClient(tg.addr, grpc.WithTransportCredentials(credentials.NewTLS(tg.clientTLS(cn, roles...))))
	if err != nil {
		tg.t.Fatal(err)
	}
	tg.t.Cleanup(func() { cc.Close() })
	return cc
}

// clientTLS is the TLS configuration of a client with a new certificate for
// cn carrying roles.
func (tg *testGateway) clientTLS(cn string, roles ...string) *tls.Config {
	tg.t.Helper()
	crt, key, err := tg.ca.IssueClient(cn, roles, time.Hour, pki.KeyECDSA)
	if err != nil {
		tg.t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(crt, key)
	if err != nil {
		tg.t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(tg.ca.CertPEM)
	return &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}, ServerName: "127.0.0.1"}
}

// get fetches path from the admin endpoint: status code and body.
func (tg *testGateway) get(path string) (int, string) {
	tg.t.Helper()
	resp, err := http.Get("http://" + tg.gw.AdminAddr().String() + path)
	if err != nil {
		tg.t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, strings.TrimSpace(string(body))
}

// waitReady polls /readyz until it answers want (bounded: 10 s).
func (tg *testGateway) waitReady(want int) string {
	tg.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := tg.get("/readyz")
		if code == want {
			return body
		}
		if time.Now().After(deadline) {
			tg.t.Fatalf("/readyz still %d %q after 10 s, want %d", code, body, want)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestGatewayInProcess fans a call out to the node itself under two names.
func TestGatewayInProcess(t *testing.T) {
	tg := startGateway(t, nil)
	cc := tg.client("admin", certs.RoleAdmin)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := machine.NewMachineServiceClient(cc).Version(
		metadata.AppendToOutgoingContext(ctx, "nodes", "127.0.0.1", "nodes", "node-1"), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Messages) != 2 || resp.Messages[0].Metadata.GetHostname() != "127.0.0.1" || resp.Messages[1].Metadata.GetHostname() != "node-1" {
		t.Fatalf("fan-out to the node under two names gave %v", resp.Messages)
	}
	tg.cancel()
	if err := <-tg.served; err != nil {
		t.Fatal(err)
	}
}
