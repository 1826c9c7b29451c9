package test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/testbackend"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/pki"
)

// The security tests run two apid processes on 127.0.91.1 (A) and
// 127.0.91.2 (B), each in front of a recording agent, plus impostors on
// 127.0.91.3-5 that A may be asked to forward to.
const (
	ipA     = "127.0.91.1"
	ipB     = "127.0.91.2"
	ipSpy   = "127.0.91.3" // a genuine node certificate: sees what A forwards
	ipRogue = "127.0.91.4" // a certificate from another CA
	ipThief = "127.0.91.5" // node B's certificate, served under the wrong address
	ipDead  = "127.0.91.50"
)

const (
	methodVersion = "/machine.MachineService/Version"
	methodReboot  = "/machine.MachineService/Reboot"
	methodRestart = "/machine.MachineService/Restart"
	methodRead    = "/machine.MachineService/Read"
)

// transportKeys are the headers gRPC itself adds to every call; what the
// tests look at is everything else.
var transportKeys = []string{":authority", "content-type", "user-agent", "grpc-accept-encoding", "grpc-encoding", "te"}

func appKeys(md metadata.MD) []string {
	var keys []string
	for k := range md {
		if !slices.Contains(transportKeys, k) {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	return keys
}

// agentCall is one call a recording agent received.
type agentCall struct {
	method string
	md     metadata.MD
}

// recordingAgent is the local node agent of one apid: a testbackend (which
// implements Version and Dmesg) served behind interceptors that record
// every call that arrives, including the methods the testbackend does not
// implement and paths no service matches. Nothing that reaches it can go
// unnoticed.
type recordingAgent struct {
	*testbackend.Server
	mu    sync.Mutex
	calls []agentCall
}

func startAgent(t *testing.T, name string) *recordingAgent {
	t.Helper()
	a := &recordingAgent{Server: testbackend.New(name, testbackend.Behaviour{})}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(
		grpc.ChainUnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			a.record(ctx, info.FullMethod)
			return h(ctx, req)
		}),
		grpc.ChainStreamInterceptor(func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			a.record(ss.Context(), info.FullMethod)
			return h(srv, ss)
		}),
		grpc.UnknownServiceHandler(func(any, grpc.ServerStream) error {
			return status.Error(codes.Unimplemented, "no such service on the agent")
		}),
	)
	machine.RegisterMachineServiceServer(srv, a.Server)
	a.Addr = lis.Addr().String()
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return a
}

// budgetReads are the calls the disruption budget makes to a node before
// and after a disruptive call (to see it down and back); these tests count
// what callers' calls reach, the budget's reads are the demo cluster's
// rolling tests' subject.
var budgetReads = []string{"/machine.MachineService/SystemStat", "/machine.MachineService/ServiceList", "/machine.MachineService/EtcdStatus"}

func (a *recordingAgent) record(ctx context.Context, method string) {
	md, _ := metadata.FromIncomingContext(ctx)
	if slices.Contains(budgetReads, method) && slices.Equal(md["talos-role"], []string{"os:reader"}) {
		return
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.calls = append(a.calls, agentCall{method: method, md: md.Copy()})
}

func (a *recordingAgent) total() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.calls)
}

func (a *recordingAgent) since(n int) []agentCall {
	a.mu.Lock()
	defer a.mu.Unlock()
	return slices.Clone(a.calls[n:])
}

// testPKI is what `apid gen` produced for the tests, plus the CA loaded so that
// the tests can mint the certificates apid gen refuses to make.
type testPKI struct {
	dir  string
	ca   *pki.CA
	pool *x509.CertPool
}

func runGen(args ...string) (string, error) {
	out, err := exec.Command(apidBin, append([]string{"gen"}, args...)...).CombinedOutput()
	return string(out), err
}

func mustGen(t *testing.T, args ...string) {
	t.Helper()
	if out, err := runGen(args...); err != nil {
		t.Fatalf("apid gen %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// genAll runs every command in parallel: each is a process start of a
// race-instrumented binary, and the tests need a dozen.
func genAll(t *testing.T, cmds [][]string) {
	t.Helper()
	errs := make([]error, len(cmds))
	outs := make([]string, len(cmds))
	var wg sync.WaitGroup
	for i, c := range cmds {
		wg.Go(func() { outs[i], errs[i] = runGen(c...) })
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("apid gen %s: %v\n%s", strings.Join(cmds[i], " "), err, outs[i])
		}
	}
}

func newPKI(t *testing.T, dir string) *testPKI {
	t.Helper()
	mustGen(t, "ca", "-out", dir, "-name", "security test CA")
	crt, err := os.ReadFile(filepath.Join(dir, "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile(filepath.Join(dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	ca, err := pki.LoadCA(crt, key)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	return &testPKI{dir: dir, ca: ca, pool: pool}
}

func (p *testPKI) path(name string) string { return filepath.Join(p.dir, name) }

// nodeConfig is the configuration lines of node name's key material as
// apid gen node wrote it: its serving pair and its forwarding identity.
func (p *testPKI) nodeConfig(name string) string {
	return fmt.Sprintf("ca: %q\ncert: %q\nkey: %q\nclientCert: %q\nclientKey: %q\n",
		p.path("ca.crt"), p.path(name+".crt"), p.path(name+".key"), p.path(name+"-client.crt"), p.path(name+"-client.key"))
}

func (p *testPKI) load(t *testing.T, base string) tls.Certificate {
	t.Helper()
	c, err := tls.LoadX509KeyPair(p.path(base+".crt"), p.path(base+".key"))
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// mint signs tmpl with parent's key (the CA when parent is nil; tmpl itself
// when selfSigned) and returns it with a fresh key, for certificates that
// apid gen, rightly, will not produce.
func (p *testPKI) mint(t *testing.T, tmpl *x509.Certificate, parent *tls.Certificate, selfSigned bool) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 120))
	if err != nil {
		t.Fatal(err)
	}
	tmpl.SerialNumber = serial.Add(serial, big.NewInt(1))
	if tmpl.NotBefore.IsZero() {
		tmpl.NotBefore = time.Now().Add(-time.Hour)
		tmpl.NotAfter = time.Now().Add(time.Hour)
	}
	tmpl.KeyUsage |= x509.KeyUsageDigitalSignature
	tmpl.BasicConstraintsValid = true
	issuer, signer := p.ca.Cert, crypto.Signer(p.ca.Key)
	switch {
	case selfSigned:
		issuer, signer = tmpl, key
	case parent != nil:
		issuer, signer = parent.Leaf, parent.PrivateKey.(crypto.Signer)
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, issuer, key.Public(), signer)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}
}

func clientCert(cn string, roles []string, eku ...x509.ExtKeyUsage) *x509.Certificate {
	return &x509.Certificate{Subject: pkix.Name{CommonName: cn, Organization: roles}, ExtKeyUsage: eku}
}

// clientTLS presents cert whatever the server asks for (crypto/tls would
// otherwise quietly withhold a certificate from a CA the server does not
// list, and the test would only ever try "no certificate").
func clientTLS(roots *x509.CertPool, cert *tls.Certificate) *tls.Config {
	cfg := &tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}
	if cert != nil {
		cfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return cert, nil }
	}
	return cfg
}

// handshake completes a TLS handshake with addr and waits for the server's
// first bytes (its HTTP/2 settings). With TLS 1.3 the client's Handshake
// returns before the server has judged the client's certificate; a refusal
// arrives as an alert on the first read.
func handshake(addr string, cfg *tls.Config) (tls.ConnectionState, error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return tls.ConnectionState{}, err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); err != nil {
		return tls.ConnectionState{}, err
	}
	return conn.ConnectionState(), nil
}

func writeAtomic(t *testing.T, path string, data []byte, mode os.FileMode) {
	t.Helper()
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	data, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, to, data, 0o600)
}

func call(ctx context.Context, cc grpc.ClientConnInterface, method string) error {
	mc := machine.NewMachineServiceClient(cc)
	switch method {
	case methodVersion:
		_, err := mc.Version(ctx, &emptypb.Empty{})
		return err
	case methodReboot:
		_, err := mc.Reboot(ctx, &machine.RebootRequest{})
		return err
	case methodRestart:
		_, err := mc.Restart(ctx, &machine.RestartRequest{Id: "kubelet"})
		return err
	case methodRead:
		s, err := mc.Read(ctx, &machine.ReadRequest{Path: "/etc/hostname"})
		if err != nil {
			return err
		}
		for {
			if _, err := s.Recv(); err != nil {
				if err == io.EOF {
					return nil
				}
				return err
			}
		}
	}
	panic("no call for " + method)
}

func callContext(t *testing.T, kv ...string) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	return metadata.AppendToOutgoingContext(ctx, kv...)
}

// spyNode holds a genuine node certificate for ipSpy and records what a
// forwarding apid sends it: the metadata and the forwarder's certificate.
type spyNode struct {
	mu    sync.Mutex
	md    []metadata.MD
	peers []*x509.Certificate
}

func startSpy(t *testing.T, p *testPKI, port int) *spyNode {
	t.Helper()
	src, err := certs.NewSource(certs.Files{CA: p.path("ca.crt"), Cert: p.path("spy.crt"), Key: p.path("spy.key")})
	if err != nil {
		t.Fatal(err)
	}
	s := &spyNode{}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(certs.ServerConfig(src, certs.ServerOptions{}))),
		grpc.UnknownServiceHandler(func(_ any, ss grpc.ServerStream) error {
			md, _ := metadata.FromIncomingContext(ss.Context())
			cert, _ := certs.PeerCertificate(ss.Context())
			s.mu.Lock()
			s.md = append(s.md, md.Copy())
			s.peers = append(s.peers, cert)
			s.mu.Unlock()
			return status.Error(codes.Aborted, "spy node")
		}))
	lis, err := net.Listen("tcp", net.JoinHostPort(ipSpy, fmt.Sprint(port)))
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	t.Cleanup(srv.Stop)
	return s
}

func (s *spyNode) calls() ([]metadata.MD, []*x509.Certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.md), slices.Clone(s.peers)
}

// impostor is a TLS listener with a certificate apid must not accept for
// its address. It counts the handshakes it was offered and notes whether a
// client certificate ever reached it.
type impostor struct {
	hellos    atomic.Int64
	completed atomic.Int64
	sawCert   atomic.Bool
}

func startImpostor(t *testing.T, addr string, cert tls.Certificate) *impostor {
	t.Helper()
	im := &impostor{}
	cfg := &tls.Config{
		NextProtos: []string{"h2"},
		ClientAuth: tls.RequestClientCert,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			im.hellos.Add(1)
			return &cert, nil
		},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			if len(raw) > 0 {
				im.sawCert.Store(true)
			}
			return nil
		},
	}
	lis, err := tls.Listen("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	wg.Go(func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Go(func() {
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
				if conn.(*tls.Conn).Handshake() == nil {
					im.completed.Add(1)
				}
			})
		}
	})
	t.Cleanup(func() { lis.Close(); wg.Wait() })
	return im
}

// secCluster is the system under test.
type secCluster struct {
	pki            *testPKI
	port           int
	procA, procB   *process
	agentA, agentB *recordingAgent
	spy            *spyNode
	certA, keyA    string // A's certificate files, replaced by the reload test
	caB            string // B's CA bundle, extended by the rotation test
	clients        map[string]tls.Certificate
}

func (c *secCluster) addr(ip string) string { return net.JoinHostPort(ip, fmt.Sprint(c.port)) }

func (c *secCluster) dial(t *testing.T, ip string, cert tls.Certificate) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(c.addr(ip), grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(c.pki.pool, &cert))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

func (c *secCluster) totals() [2]int { return [2]int{c.agentA.total(), c.agentB.total()} }

// expectNoAgentCall fails if either agent received a call since before.
func (c *secCluster) expectNoAgentCall(t *testing.T, before [2]int, what string) {
	t.Helper()
	if after := c.totals(); after != before {
		t.Errorf("%s: agent calls went from %v to %v, want no call to reach an agent", what, before, after)
	}
}

func startSecCluster(t *testing.T) *secCluster {
	t.Helper()
	dir := t.TempDir()
	p := newPKI(t, filepath.Join(dir, "pki"))
	c := &secCluster{pki: p, port: freePort(t, ipA, ipB, ipSpy, ipRogue, ipThief)}

	t.Run("gen writes keys 0600 and refuses to overwrite", func(t *testing.T) {
		checkModes(t, p.path("ca.crt"), p.path("ca.key"))
		before, _ := os.ReadFile(p.path("ca.crt"))
		if out, err := runGen("ca", "-out", p.dir); err == nil || !strings.Contains(out, "exists") {
			t.Errorf("second gen ca without -force: %v\n%s", err, out)
		}
		if after, _ := os.ReadFile(p.path("ca.crt")); !bytes.Equal(before, after) {
			t.Error("a refused gen ca changed ca.crt")
		}
	})

	ca := []string{"-ca-dir", p.dir, "-out", p.dir}
	genAll(t, [][]string{
		append([]string{"node", "-name", "node-a", "-ip", ipA}, ca...),
		append([]string{"node", "-name", "node-b", "-ip", ipB}, ca...),
		append([]string{"node", "-name", "spy", "-ip", ipSpy}, ca...),
		append([]string{"client", "-name", "admin", "-roles", "os:admin"}, ca...),
		append([]string{"client", "-name", "operator", "-roles", "os:operator"}, ca...),
		append([]string{"client", "-name", "reader", "-roles", "os:reader"}, ca...),
		append([]string{"client", "-name", "etcd-backup", "-roles", "os:etcd:backup"}, ca...),
		append([]string{"client", "-name", "wizard", "-roles", "os:wizard,team:ops", "-allow-unknown-roles"}, ca...),
	})
	t.Run("gen output", func(t *testing.T) {
		for _, base := range []string{"node-a", "node-b", "reader", "admin"} {
			checkModes(t, p.path(base+".crt"), p.path(base+".key"))
		}
		if out, err := runGen(append([]string{"client", "-name", "reader", "-roles", "os:admin"}, ca...)...); err == nil {
			t.Errorf("gen client over an existing client certificate without -force succeeded:\n%s", out)
		}
		if r := p.load(t, "reader").Leaf; !slices.Equal(r.Subject.Organization, []string{"os:reader"}) {
			t.Errorf("reader.crt now carries %q", r.Subject.Organization)
		}
		node := p.load(t, "node-a").Leaf
		if !slices.Equal(node.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}) ||
			len(node.Subject.Organization) != 0 ||
			len(node.IPAddresses) != 1 || node.IPAddresses[0].String() != ipA {
			t.Errorf("node certificate: EKU %v, O %q, IPs %v", node.ExtKeyUsage, node.Subject.Organization, node.IPAddresses)
		}
		// The forwarding identity, as Talos control planes hold it.
		checkModes(t, p.path("node-a-client.crt"), p.path("node-a-client.key"))
		fwd := p.load(t, "node-a-client").Leaf
		if !slices.Equal(fwd.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) ||
			!slices.Equal(fwd.Subject.Organization, []string{certs.RoleImpersonator}) || fwd.Subject.CommonName != "node-a" {
			t.Errorf("forwarding certificate: EKU %v, subject %v", fwd.ExtKeyUsage, fwd.Subject)
		}
		if cl := p.load(t, "reader").Leaf; !slices.Equal(cl.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) || cl.IsCA {
			t.Errorf("client certificate: EKU %v, CA %v", cl.ExtKeyUsage, cl.IsCA)
		}
	})

	c.clients = map[string]tls.Certificate{}
	for _, name := range []string{"admin", "operator", "reader", "etcd-backup", "wizard"} {
		c.clients[name] = p.load(t, name)
	}
	c.clients["no-role"] = p.mint(t, clientCert("nobody", nil, x509.ExtKeyUsageClientAuth), nil, false)

	c.agentA, c.agentB = startAgent(t, "agent-a"), startAgent(t, "agent-b")
	c.spy = startSpy(t, p, c.port)

	// A's certificate files and B's CA bundle are copies, so the tests that
	// replace them touch one process only.
	c.certA, c.keyA = filepath.Join(dir, "a.crt"), filepath.Join(dir, "a.key")
	copyFile(t, p.path("node-a.crt"), c.certA)
	copyFile(t, p.path("node-a.key"), c.keyA)
	c.caB = filepath.Join(dir, "b-ca.crt")
	copyFile(t, p.path("ca.crt"), c.caB)

	// A: reloads only on SIGHUP, at most 3 nodes per call, and lets
	// readers and operators restart services. B: the default policy, lets
	// x-custom through, reloads every 300 ms, a 1 s handshake limit and 2
	// streams per connection.
	cfgA := writeConfig(t, dir, "a.yaml", fmt.Sprintf(`ca: %q
cert: %q
key: %q
clientCert: %q
clientKey: %q
maxNodes: 3
reloadInterval: 1h
policy:
  rules:
    - method: %s
      roles: [os:reader, os:operator]
`, p.path("ca.crt"), c.certA, c.keyA, p.path("node-a-client.crt"), p.path("node-a-client.key"), methodRestart))
	cfgB := writeConfig(t, dir, "b.yaml", fmt.Sprintf(`ca: %q
cert: %q
key: %q
clientCert: %q
clientKey: %q
forwardMetadata: [x-custom]
reloadInterval: 300ms
handshakeTimeout: 1s
maxConcurrentStreams: 2
`, c.caB, p.path("node-b.crt"), p.path("node-b.key"), p.path("node-b-client.crt"), p.path("node-b-client.key")))
	serve := func(cfg, ip string, agent *recordingAgent) *process {
		return start(t, "apid serving", "serve", "-config", cfg, "-listen", c.addr(ip), "-self", ip,
			"-remote-port", fmt.Sprint(c.port), "-backend", agent.Addr, "-admin-listen", "", "-drain-delay", "0")
	}
	c.procA = serve(cfgA, ipA, c.agentA)
	c.procB = serve(cfgB, ipB, c.agentB)
	return c
}

func writeConfig(t *testing.T, dir, name, text string) string {
	t.Helper()
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func checkModes(t *testing.T, crt, key string) {
	t.Helper()
	for path, want := range map[string]os.FileMode{crt: 0o644, key: 0o600} {
		fi, err := os.Stat(path)
		if err != nil {
			t.Error(err)
			continue
		}
		if fi.Mode().Perm() != want {
			t.Errorf("%s has mode %v, want %v", filepath.Base(path), fi.Mode().Perm(), want)
		}
	}
}

func TestSecurity(t *testing.T) {
	c := startSecCluster(t)
	t.Run("handshake", c.testHandshake)
	t.Run("roles", c.testRoles)
	t.Run("spoofing", c.testSpoofing)
	t.Run("forwarding targets", c.testForwardingTargets)
	t.Run("policy extension", c.testPolicyExtension)
	t.Run("forward metadata", c.testForwardMetadata)
	t.Run("non-canonical paths", c.testPaths)
	t.Run("handshake timeout", c.testHandshakeTimeout)
	t.Run("concurrent streams", c.testConcurrentStreams)
	t.Run("CA rotation", c.testCARotation)
	t.Run("certificate reload", c.testReload)
	t.Run("talos client", c.testTalosClient)
}

func (c *secCluster) testHandshake(t *testing.T) {
	p := c.pki
	admin := []string{certs.RoleAdmin}
	clientAuth := x509.ExtKeyUsageClientAuth
	otherCA, err := pki.NewCA("another CA", time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	otherCrt, otherKey, err := otherCA.IssueClient("admin", admin, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	wrongCA, err := tls.X509KeyPair(otherCrt, otherKey)
	if err != nil {
		t.Fatal(err)
	}
	nodeA := p.load(t, "node-a")

	expired := clientCert("admin", admin, clientAuth)
	expired.NotBefore, expired.NotAfter = time.Now().Add(-2*time.Hour), time.Now().Add(-time.Hour)
	future := clientCert("admin", admin, clientAuth)
	future.NotBefore, future.NotAfter = time.Now().Add(time.Hour), time.Now().Add(2*time.Hour)

	bad := []struct {
		name string
		cert *tls.Certificate
		max  uint16
	}{
		{"no certificate", nil, 0},
		{"expired", ptr(p.mint(t, expired, nil, false)), 0},
		{"not yet valid", ptr(p.mint(t, future, nil, false)), 0},
		{"another CA", &wrongCA, 0},
		{"self-signed", ptr(p.mint(t, clientCert("admin", admin, clientAuth), nil, true)), 0},
		{"signed by a node certificate", ptr(p.mint(t, clientCert("admin", admin, clientAuth), &nodeA, false)), 0},
		{"serverAuth only", ptr(p.mint(t, clientCert("admin", admin, x509.ExtKeyUsageServerAuth), nil, false)), 0},
		// Talos's rule: a client certificate has exactly clientAuth.
		{"clientAuth and serverAuth", ptr(p.mint(t, clientCert("admin", admin, x509.ExtKeyUsageServerAuth, clientAuth), nil, false)), 0},
		{"a node's serving certificate", &nodeA, 0},
		{"no extended key usage", ptr(p.mint(t, clientCert("admin", admin), nil, false)), 0},
		{"TLS 1.2", ptr(c.clients["admin"]), tls.VersionTLS12},
	}
	for _, tc := range bad {
		t.Run(tc.name, func(t *testing.T) {
			before := c.totals()
			for _, ip := range []string{ipA, ipB} {
				cfg := clientTLS(p.pool, tc.cert)
				cfg.MaxVersion = tc.max
				if _, err := handshake(c.addr(ip), cfg); err == nil {
					t.Errorf("%s accepted the handshake", ip)
				}
				cc, err := grpc.NewClient(c.addr(ip), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
				if err != nil {
					t.Fatal(err)
				}
				err = call(callContext(t), cc, methodVersion)
				cc.Close()
				if status.Code(err) != codes.Unavailable {
					t.Errorf("%s: Version = %v, want Unavailable", ip, err)
				}
			}
			c.expectNoAgentCall(t, before, tc.name)
		})
	}

	t.Run("accepted", func(t *testing.T) {
		for name, cert := range map[string]tls.Certificate{"admin": c.clients["admin"], "no role": c.clients["no-role"], "a forwarding identity": p.load(t, "node-b-client")} {
			st, err := handshake(c.addr(ipA), clientTLS(p.pool, &cert))
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			if st.Version != tls.VersionTLS13 || st.NegotiatedProtocol != "h2" {
				t.Errorf("%s: version %x, ALPN %q; want TLS 1.3 and h2", name, st.Version, st.NegotiatedProtocol)
			}
		}
		before := c.totals()
		if err := call(callContext(t), c.dial(t, ipA, c.clients["admin"]), methodVersion); err != nil {
			t.Errorf("admin: %v", err)
		}
		if after := c.totals(); after[0] != before[0]+1 {
			t.Errorf("agent A calls %d -> %d, want one more", before[0], after[0])
		}
	})
}

func ptr[T any](v T) *T { return &v }

// testRoles calls Version, Reboot and Read as every role, locally, through
// A to B with node, and to A and B with nodes. Allowed calls must reach
// exactly the agents the route names (the agents do not implement Reboot
// or Read, so Unimplemented comes back from them); denied calls must be
// PermissionDenied naming the method and reach no agent at all.
func (c *secCluster) testRoles(t *testing.T) {
	allowed := map[string][]string{
		"admin":       {methodVersion, methodReboot, methodRead},
		"operator":    {methodVersion, methodReboot},
		"reader":      {methodVersion},
		"etcd-backup": {methodVersion},
		"no-role":     nil,
		"wizard":      nil,
	}
	routes := []struct {
		name  string
		md    []string
		reach [2]int
	}{
		{"local", nil, [2]int{1, 0}},
		{"node B", []string{"node", ipB}, [2]int{0, 1}},
		{"nodes A,B", []string{"nodes", ipA, "nodes", ipB}, [2]int{1, 1}},
	}
	for _, role := range []string{"admin", "operator", "reader", "etcd-backup", "no-role", "wizard"} {
		cc := c.dial(t, ipA, c.clients[role])
		for _, rt := range routes {
			for _, m := range []string{methodVersion, methodReboot, methodRead} {
				what := fmt.Sprintf("%s %s %s", role, rt.name, m)
				before := c.totals()
				err := call(callContext(t, rt.md...), cc, m)
				after := c.totals()
				if !slices.Contains(allowed[role], m) {
					if status.Code(err) != codes.PermissionDenied || !strings.Contains(status.Convert(err).Message(), m) {
						t.Errorf("%s: %v, want PermissionDenied naming the method", what, err)
					}
					c.expectNoAgentCall(t, before, what)
					continue
				}
				if code := status.Code(err); code != codes.OK && code != codes.Unimplemented {
					t.Errorf("%s: %v, want it to reach the agent", what, err)
				}
				if got := [2]int{after[0] - before[0], after[1] - before[1]}; got != rt.reach {
					t.Errorf("%s: agents A, B received %v calls, want %v", what, got, rt.reach)
				}
				for i, a := range []*recordingAgent{c.agentA, c.agentB} {
					for _, ac := range a.since(before[i]) {
						if ac.method != m {
							t.Errorf("%s: agent %d received %s", what, i, ac.method)
						}
					}
				}
			}
		}
	}
}

// forgedMD is what a hostile client adds to its calls: identity and routing
// keys only apids may set, a credential, an arbitrary key, and two keys
// that are meant to cross (so that the test sees the allowlist work, not
// just everything dropped).
func forgedMD(extra ...string) []string {
	return append([]string{
		"talos-role", "os:admin",
		"talos-role", "os:impersonator",
		"proxyfrom", "x",
		"token", "secret",
		"authorization", "Bearer stolen",
		"x-custom", "1",
		"context", "prod",
		"traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
	}, extra...)
}

// expectReaderMD checks the metadata an agent received for a reader's
// forged call: its role alone, the two allowlisted keys, nothing else.
func expectReaderMD(t *testing.T, what string, md metadata.MD) {
	t.Helper()
	if got, want := appKeys(md), []string{"context", "talos-role", "traceparent"}; !slices.Equal(got, want) {
		t.Errorf("%s: keys %q arrived, want exactly %q", what, got, want)
	}
	if got := md.Get("talos-role"); !slices.Equal(got, []string{certs.RoleReader}) {
		t.Errorf("%s: talos-role = %q, want [os:reader]", what, got)
	}
	if got := md.Get("context"); !slices.Equal(got, []string{"prod"}) {
		t.Errorf("%s: context = %q", what, got)
	}
}

func (c *secCluster) testSpoofing(t *testing.T) {
	reader := c.dial(t, ipA, c.clients["reader"])
	nobody := c.dial(t, ipA, c.clients["no-role"])
	wizard := c.dial(t, ipA, c.clients["wizard"])

	t.Run("forged roles open nothing", func(t *testing.T) {
		for _, rt := range [][]string{nil, {"node", ipB}, {"nodes", ipA, "nodes", ipB}, {"nodes", ipB + "," + ipB}} {
			before := c.totals()
			for _, m := range []string{methodReboot, methodRead} {
				if err := call(callContext(t, forgedMD(rt...)...), reader, m); status.Code(err) != codes.PermissionDenied {
					t.Errorf("reader %v %s with forged roles: %v, want PermissionDenied", rt, m, err)
				}
			}
			for name, cc := range map[string]*grpc.ClientConn{"no-role": nobody, "unknown-role": wizard} {
				for _, m := range []string{methodVersion, methodReboot} {
					if err := call(callContext(t, forgedMD(rt...)...), cc, m); status.Code(err) != codes.PermissionDenied {
						t.Errorf("%s %v %s with forged roles: %v, want PermissionDenied", name, rt, m, err)
					}
				}
			}
			c.expectNoAgentCall(t, before, fmt.Sprintf("forged roles %v", rt))
		}
	})

	t.Run("local", func(t *testing.T) {
		before := c.totals()
		if err := call(callContext(t, forgedMD()...), reader, methodVersion); err != nil {
			t.Fatal(err)
		}
		got := c.agentA.since(before[0])
		if len(got) != 1 || c.agentB.total() != before[1] {
			t.Fatalf("%d calls at A, %d at B; want one at A", len(got), c.agentB.total()-before[1])
		}
		expectReaderMD(t, "agent A", got[0].md)
	})

	t.Run("node B", func(t *testing.T) {
		before, versions := c.totals(), c.agentB.Calls()
		if err := call(callContext(t, forgedMD("node", ipB)...), reader, methodVersion); err != nil {
			t.Fatal(err)
		}
		// The forged proxyfrom did not make A serve the call itself.
		if got := c.totals(); got != [2]int{before[0], before[1] + 1} || c.agentB.Calls() != versions+1 {
			t.Fatalf("agent calls %v -> %v; want one more at B only", before, got)
		}
		// B trusted the role A vouched for, and only that.
		expectReaderMD(t, "agent B", c.agentB.LastMetadata())
	})

	t.Run("nodes A,B", func(t *testing.T) {
		before := c.totals()
		resp, err := machine.NewMachineServiceClient(reader).Version(callContext(t, forgedMD("nodes", ipA, "nodes", ipB)...), &emptypb.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		var hosts []string
		for _, m := range resp.Messages {
			hosts = append(hosts, m.Metadata.GetHostname())
			if m.Metadata.GetError() != "" {
				t.Errorf("%s: %s", m.Metadata.GetHostname(), m.Metadata.GetError())
			}
		}
		if !slices.Equal(hosts, []string{ipA, ipB}) {
			t.Errorf("entries from %q, want A then B", hosts)
		}
		for i, a := range []*recordingAgent{c.agentA, c.agentB} {
			got := a.since(before[i])
			if len(got) != 1 {
				t.Fatalf("agent %d received %d calls, want 1", i, len(got))
			}
			expectReaderMD(t, fmt.Sprintf("agent %d", i), got[0].md)
		}
	})

	t.Run("the same node twice is called once", func(t *testing.T) {
		for _, md := range [][]string{{"nodes", ipB, "nodes", ipB}, {"nodes", ipB + "," + ipB}, {"nodes", ipB + ", " + ipB, "nodes", ipB}} {
			before := c.totals()
			resp, err := machine.NewMachineServiceClient(reader).Version(callContext(t, forgedMD(md...)...), &emptypb.Empty{})
			if err != nil {
				t.Fatal(err)
			}
			if len(resp.Messages) != 1 || resp.Messages[0].Metadata.GetHostname() != ipB {
				t.Errorf("%q: %d entries, want one from B", md, len(resp.Messages))
			}
			if got := c.totals(); got != [2]int{before[0], before[1] + 1} {
				t.Errorf("%q: agent calls %v -> %v; want one more at B only", md, before, got)
			}
		}
	})

	t.Run("malformed routing is refused before any node is called", func(t *testing.T) {
		for _, md := range [][]string{
			{"node", ipB, "node", ipB},
			{"node", ipB, "nodes", ipB},
			{"node", ""},
			{"node", ipB + ":" + fmt.Sprint(c.port)},
			{"nodes", ipA + ",," + ipB},
			{"nodes", ipA, "nodes", ""},
			{"nodes", fmt.Sprintf("%s,%s,%s,%s", ipA, ipB, ipSpy, ipDead)},
			{"nodes", ipB, "apid-node-timeout", "forever"},
		} {
			before := c.totals()
			spied, _ := c.spy.calls()
			if err := call(callContext(t, forgedMD(md...)...), reader, methodVersion); status.Code(err) != codes.InvalidArgument {
				t.Errorf("%q: %v, want InvalidArgument", md, err)
			}
			c.expectNoAgentCall(t, before, fmt.Sprint(md))
			if now, _ := c.spy.calls(); len(now) != len(spied) {
				t.Errorf("%q reached the spy node", md)
			}
		}
	})

	t.Run("a node certificate alone grants nothing", func(t *testing.T) {
		// A node's forwarding identity may speak for a caller, but it must
		// name the caller's roles: without talos-role it has none of its
		// own.
		node := c.dial(t, ipA, c.pki.load(t, "node-b-client"))
		before := c.totals()
		for _, md := range [][]string{nil, {"proxyfrom", ipB}, {"proxyfrom", ipB, "node", ipB}, {"nodes", ipA}} {
			if err := call(callContext(t, md...), node, methodVersion); status.Code(err) != codes.PermissionDenied {
				t.Errorf("node certificate with %q: %v, want PermissionDenied", md, err)
			}
		}
		c.expectNoAgentCall(t, before, "node certificate without roles")
	})

	t.Run("what A sends to the next apid", func(t *testing.T) {
		for _, rt := range [][]string{{"node", ipSpy}, {"nodes", ipSpy}} {
			spied, _ := c.spy.calls()
			err := call(callContext(t, forgedMD(rt...)...), reader, methodVersion)
			if rt[0] == "node" && status.Code(err) != codes.Aborted {
				t.Errorf("%v: %v, want the spy's own Aborted, untouched", rt, err)
			}
			mds, peers := c.spy.calls()
			if len(mds) != len(spied)+1 {
				t.Fatalf("%v: the spy received %d calls, want 1", rt, len(mds)-len(spied))
			}
			md, peerCert := mds[len(mds)-1], peers[len(peers)-1]
			if got, want := appKeys(md), []string{"context", "proxyfrom", "talos-role", "traceparent"}; !slices.Equal(got, want) {
				t.Errorf("%v: keys %q arrived, want exactly %q", rt, got, want)
			}
			if got := md.Get("talos-role"); !slices.Equal(got, []string{certs.RoleReader}) {
				t.Errorf("%v: talos-role = %q, want [os:reader]", rt, got)
			}
			if got := md.Get("proxyfrom"); !slices.Equal(got, []string{c.addr(ipA)}) {
				t.Errorf("%v: proxyfrom = %q, want A's address as the client dialled it", rt, got)
			}
			if peerCert == nil || peerCert.Subject.CommonName != "node-a" || !slices.Equal(certs.Roles(peerCert), []string{certs.RoleImpersonator}) {
				t.Errorf("%v: A forwarded with certificate %v", rt, peerCert)
			}
		}
	})
}

// testForwardingTargets asks A to forward to addresses where something
// other than a genuine apid for that address listens. A must refuse the
// server's certificate, and its own (impersonating) certificate must never
// reach the impostor.
func (c *secCluster) testForwardingTargets(t *testing.T) {
	otherCA, err := pki.NewCA("impostor CA", time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	crt, key, err := otherCA.IssueNode("rogue", nil, []net.IP{net.ParseIP(ipRogue)}, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	rogueCert, err := tls.X509KeyPair(crt, key)
	if err != nil {
		t.Fatal(err)
	}
	impostors := map[string]*impostor{
		ipRogue: startImpostor(t, c.addr(ipRogue), rogueCert),
		ipThief: startImpostor(t, c.addr(ipThief), c.pki.load(t, "node-b")),
	}
	admin := c.dial(t, ipA, c.clients["admin"])
	for ip, im := range impostors {
		before := c.totals()
		if err := call(callContext(t, "node", ip), admin, methodVersion); status.Code(err) != codes.Unavailable {
			t.Errorf("forwarding to the impostor at %s: %v, want Unavailable", ip, err)
		}
		if im.hellos.Load() == 0 {
			t.Errorf("A never contacted %s: the test proves nothing", ip)
		}
		if im.sawCert.Load() || im.completed.Load() != 0 {
			t.Errorf("A completed %d handshakes with the impostor at %s (client certificate sent: %v)", im.completed.Load(), ip, im.sawCert.Load())
		}
		c.expectNoAgentCall(t, before, "forward to "+ip)
	}
}

func (c *secCluster) testPolicyExtension(t *testing.T) {
	reader := c.dial(t, ipA, c.clients["reader"])
	operator := c.dial(t, ipA, c.clients["operator"])
	etcd := c.dial(t, ipA, c.clients["etcd-backup"])

	before := c.totals()
	for name, cc := range map[string]*grpc.ClientConn{"reader": reader, "operator": operator} {
		if err := call(callContext(t), cc, methodRestart); status.Code(err) != codes.Unimplemented {
			t.Errorf("%s Restart at A, whose policy allows it: %v, want the agent's Unimplemented", name, err)
		}
	}
	if got := c.agentA.since(before[0]); len(got) != 2 || got[0].method != methodRestart || got[1].method != methodRestart {
		t.Errorf("agent A received %v, want two Restart calls", got)
	}
	if err := call(callContext(t), etcd, methodRestart); status.Code(err) != codes.PermissionDenied {
		t.Errorf("etcd-backup Restart: %v, want PermissionDenied", err)
	}

	// B keeps the default policy and authorizes the forwarded reader on
	// its own: every hop decides, not only the first.
	before = c.totals()
	err := call(callContext(t, "node", ipB), reader, methodRestart)
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), methodRestart) {
		t.Errorf("reader Restart through A to B: %v, want B's PermissionDenied", err)
	}
	c.expectNoAgentCall(t, before, "reader Restart at B")
	if err := call(callContext(t), reader, methodReboot); status.Code(err) != codes.PermissionDenied {
		t.Errorf("reader Reboot at A: %v, want PermissionDenied (the extension names Restart only)", err)
	}
}

// testForwardMetadata: B lists x-custom in forwardMetadata, A does not. A
// caller's x-custom reaches B's agent when the caller talks to B, and is
// dropped when the call goes through A.
func (c *secCluster) testForwardMetadata(t *testing.T) {
	reader := c.dial(t, ipB, c.clients["reader"])
	before := c.agentB.total()
	if err := call(callContext(t, forgedMD()...), reader, methodVersion); err != nil {
		t.Fatal(err)
	}
	got := c.agentB.since(before)
	if len(got) != 1 {
		t.Fatalf("agent B received %d calls", len(got))
	}
	md := got[0].md
	if want := []string{"context", "talos-role", "traceparent", "x-custom"}; !slices.Equal(appKeys(md), want) {
		t.Errorf("keys %q arrived, want exactly %q", appKeys(md), want)
	}
	if v := md.Get("x-custom"); !slices.Equal(v, []string{"1"}) {
		t.Errorf("x-custom = %q, want [1]", v)
	}
}

// rawGRPC sends one gRPC request with :path set to path over a fresh
// HTTP/2 connection built by hand (Go's HTTP/2 client will not send a path
// without its leading slash), and returns the grpc-status and grpc-message it got, or the
// stream error.
func rawGRPC(addr, path string, cfg *tls.Config) (code, msg string, err error) {
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		return "", "", err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(conn, http2.ClientPreface); err != nil {
		return "", "", err
	}
	fr := http2.NewFramer(conn, conn)
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	if err := fr.WriteSettings(); err != nil {
		return "", "", err
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range [][2]string{
		{":method", "POST"}, {":scheme", "https"}, {":path", path}, {":authority", addr},
		{"content-type", "application/grpc"}, {"te", "trailers"},
	} {
		if err := enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]}); err != nil {
			return "", "", err
		}
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block.Bytes(), EndHeaders: true}); err != nil {
		return "", "", err
	}
	// One empty message (a google.protobuf.Empty), then the end of stream.
	if err := fr.WriteData(1, true, []byte{0, 0, 0, 0, 0}); err != nil {
		return "", "", err
	}
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return code, msg, err
		}
		switch f := f.(type) {
		case *http2.SettingsFrame:
			if !f.IsAck() {
				if err := fr.WriteSettingsAck(); err != nil {
					return "", "", err
				}
			}
		case *http2.PingFrame:
			if !f.IsAck() {
				_ = fr.WritePing(true, f.Data)
			}
		case *http2.MetaHeadersFrame:
			if f.StreamID != 1 {
				continue
			}
			for _, hf := range f.Fields {
				switch hf.Name {
				case "grpc-status":
					code = hf.Value
				case "grpc-message":
					msg = hf.Value
				case ":status":
					if hf.Value != "200" {
						return code, msg, fmt.Errorf("HTTP status %s", hf.Value)
					}
				}
			}
			if f.StreamEnded() {
				return code, msg, nil
			}
		case *http2.RSTStreamFrame:
			return code, msg, fmt.Errorf("stream reset: %v", f.ErrCode)
		case *http2.GoAwayFrame:
			return code, msg, fmt.Errorf("connection closed: %v", f.ErrCode)
		}
	}
}

// testPaths sends the admin's calls with method paths that are not
// canonical. An admin may call anything, so only the path check stands
// between these requests and the agent (which records even paths it has
// no service for).
func (c *secCluster) testPaths(t *testing.T) {
	admin := c.clients["admin"]
	cfg := clientTLS(c.pki.pool, &admin)

	before := c.totals()
	code, msg, err := rawGRPC(c.addr(ipA), methodVersion, cfg)
	if err != nil || code != "0" {
		t.Fatalf("canonical path by hand: status %q %q, %v; the raw client is broken", code, msg, err)
	}
	if got := c.agentA.since(before[0]); len(got) != 1 || got[0].method != methodVersion {
		t.Fatalf("agent A received %v for the canonical path", got)
	}

	for _, path := range []string{
		"machine.MachineService/Version",
		"//machine.MachineService/Version",
		"/machine.MachineService/Version/",
		"/machine.MachineService//Version",
		"/machine.MachineService/Version/../Reboot",
		"/machine.MachineService/",
		"///",
	} {
		for _, ip := range []string{ipA, ipB} {
			before := c.totals()
			code, msg, err := rawGRPC(c.addr(ip), path, cfg)
			if err == nil && (code == "0" || code == "") {
				t.Errorf("%s %q: status %q %q, want an error", ip, path, code, msg)
			}
			t.Logf("%s %q: grpc-status %s %q, %v", ip, path, code, msg, err)
			c.expectNoAgentCall(t, before, path)
		}
	}
}

// testHandshakeTimeout: B closes a connection that never starts TLS, and
// one that finishes TLS but never sends the HTTP/2 preface, after its
// handshakeTimeout (1 s), long before the 10 s default.
func (c *secCluster) testHandshakeTimeout(t *testing.T) {
	t.Run("silent TCP", func(t *testing.T) {
		t.Parallel()
		conn, err := net.DialTimeout("tcp", c.addr(ipB), 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		expectClosedSoon(t, conn)
	})
	t.Run("silent after TLS", func(t *testing.T) {
		t.Parallel()
		admin := c.clients["admin"]
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", c.addr(ipB), clientTLS(c.pki.pool, &admin))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		expectClosedSoon(t, conn)
	})
}

// expectClosedSoon reads from conn, which the test never writes to, until
// the server closes it; that must happen well within 10 s.
func expectClosedSoon(t *testing.T, conn net.Conn) {
	t.Helper()
	start := time.Now()
	_ = conn.SetReadDeadline(start.Add(10 * time.Second))
	buf := make([]byte, 512)
	var err error
	for err == nil {
		_, err = conn.Read(buf) // the server's HTTP/2 settings may come first
	}
	elapsed := time.Since(start)
	var ne net.Error
	switch {
	case errors.As(err, &ne) && ne.Timeout():
		t.Fatalf("the connection was still open after %s", elapsed)
	case elapsed > 5*time.Second:
		t.Fatalf("closed after %s, want about 1 s", elapsed)
	}
	t.Logf("closed after %s: %v", elapsed, err)
}

// testConcurrentStreams: B allows 2 streams per connection; a third call
// waits for a free one instead of reaching the agent.
func (c *secCluster) testConcurrentStreams(t *testing.T) {
	c.agentB.Set(testbackend.Behaviour{Stuck: true})
	defer c.agentB.Set(testbackend.Behaviour{})
	cc := c.dial(t, ipB, c.clients["admin"])
	mc := machine.NewMachineServiceClient(cc)
	var cancels []context.CancelFunc
	defer func() {
		for _, cancel := range cancels {
			cancel()
		}
	}()
	for i := 0; i < 2; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		cancels = append(cancels, cancel)
		s, err := mc.Dmesg(ctx, &machine.DmesgRequest{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := s.Recv(); err != nil {
			t.Fatalf("stream %d: %v", i, err)
		}
	}
	before := c.agentB.total()
	ctx, cancel := context.WithTimeout(context.Background(), 1500*time.Millisecond)
	err := call(ctx, cc, methodVersion)
	cancel()
	if status.Code(err) != codes.DeadlineExceeded {
		t.Errorf("third call on a connection with 2 open streams: %v, want DeadlineExceeded", err)
	}
	if got := c.agentB.total(); got != before {
		t.Errorf("the third call reached the agent")
	}
	cancels[0]()
	if err := call(callContext(t), cc, methodVersion); err != nil {
		t.Errorf("after one stream ended: %v", err)
	}
}

// testCARotation adds a second CA to B's bundle while B runs. Clients of
// either CA are then accepted by B; A, whose bundle did not change, still
// refuses the new CA's clients.
func (c *secCluster) testCARotation(t *testing.T) {
	next := newPKI(t, filepath.Join(filepath.Dir(c.pki.dir), "pki-next"))
	mustGen(t, "client", "-name", "reader", "-roles", "os:reader", "-ca-dir", next.dir, "-out", next.dir)
	newReader := next.load(t, "reader")
	// The client trusts both CAs: B's serving certificate is still the
	// old CA's.
	roots := c.pki.pool.Clone()
	roots.AddCert(next.ca.Cert)
	cfg := clientTLS(roots, &newReader)

	if _, err := handshake(c.addr(ipB), cfg); err == nil {
		t.Fatal("B accepted the new CA's client before the rotation")
	}
	oldCA, err := os.ReadFile(c.pki.path("ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	writeAtomic(t, c.caB, append(oldCA, next.ca.CertPEM...), 0o644)
	if !testkit.Eventually(10*time.Second, func() bool { _, err := handshake(c.addr(ipB), cfg); return err == nil }) {
		t.Fatalf("B did not accept the new CA's clients within 10 s of the bundle change:\n%s", c.procB.log())
	}

	cc, err := grpc.NewClient(c.addr(ipB), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	if err := call(callContext(t), cc, methodVersion); err != nil {
		t.Errorf("new CA's reader, Version at B: %v", err)
	}
	if err := call(callContext(t), cc, methodReboot); status.Code(err) != codes.PermissionDenied {
		t.Errorf("new CA's reader, Reboot at B: %v, want PermissionDenied", err)
	}
	if err := call(callContext(t), c.dial(t, ipB, c.clients["admin"]), methodVersion); err != nil {
		t.Errorf("old CA's admin at B after the rotation: %v", err)
	}
	if _, err := handshake(c.addr(ipA), cfg); err == nil {
		t.Error("A accepted the new CA's client, yet its bundle never changed")
	}
}

// testReload replaces A's certificate while a stream runs through A. A
// half-done replacement (new certificate, old key) is refused and the
// current pair kept; the complete one is served to new connections after
// SIGHUP, and the running stream is not cut.
func (c *secCluster) testReload(t *testing.T) {
	c.agentA.Set(testbackend.Behaviour{Stuck: true})
	defer c.agentA.Set(testbackend.Behaviour{})
	admin := c.clients["admin"]
	cfg := clientTLS(c.pki.pool, &admin)
	served := func() *big.Int {
		st, err := handshake(c.addr(ipA), cfg)
		if err != nil || len(st.PeerCertificates) == 0 {
			return nil
		}
		return st.PeerCertificates[0].SerialNumber
	}
	oldSerial := served()
	if oldSerial == nil {
		t.Fatal("no handshake with A")
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := machine.NewMachineServiceClient(c.dial(t, ipA, admin)).Dmesg(ctx, &machine.DmesgRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}

	dir := filepath.Join(filepath.Dir(c.certA), "renewed")
	mustGen(t, "node", "-name", "node-a", "-ip", ipA, "-ca-dir", c.pki.dir, "-out", dir)
	newCrt, err := os.ReadFile(filepath.Join(dir, "node-a.crt"))
	if err != nil {
		t.Fatal(err)
	}
	newKey, err := os.ReadFile(filepath.Join(dir, "node-a.key"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(newCrt)
	renewed, err := x509.ParseCertificate(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}

	writeAtomic(t, c.certA, newCrt, 0o644)
	if err := c.procA.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if !c.procA.waitOutput("certificate reload failed", 1, 10*time.Second) {
		t.Fatalf("A did not report the mismatched key pair:\n%s", c.procA.log())
	}
	if got := served(); got == nil || got.Cmp(oldSerial) != 0 {
		t.Fatalf("after a failed reload A serves serial %v, want the old %v", got, oldSerial)
	}

	writeAtomic(t, c.keyA, newKey, 0o600)
	if err := c.procA.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	if !testkit.Eventually(10*time.Second, func() bool { s := served(); return s != nil && s.Cmp(renewed.SerialNumber) == 0 }) {
		t.Fatalf("A did not serve the renewed certificate within 10 s of SIGHUP:\n%s", c.procA.log())
	}
	if err := call(callContext(t), c.dial(t, ipA, admin), methodVersion); err != nil {
		t.Errorf("new connection after the reload: %v", err)
	}
	// Forwarding uses the renewed certificate too; B accepts it.
	if err := call(callContext(t, "node", ipB), c.dial(t, ipA, admin), methodVersion); err != nil {
		t.Errorf("forwarding after the reload: %v", err)
	}

	// The stream opened before the reload is still alive: it ends because
	// the client cancels it, not because its connection was dropped.
	active := c.agentA.Active()
	// Ended has a signal queued for every earlier call; only the stream's
	// end counts from here.
	for drained := false; !drained; {
		select {
		case <-c.agentA.Ended():
		default:
			drained = true
		}
	}
	cancel()
	_, err = stream.Recv()
	if status.Code(err) != codes.Canceled {
		t.Errorf("stream opened before the reload ended with %v, want Canceled", err)
	}
	if active < 1 {
		t.Errorf("the agent had no running call at cancel time: the stream was already gone")
	}
	select {
	case <-c.agentA.Ended():
	case <-time.After(10 * time.Second):
		t.Error("the agent's stream did not end after the client cancelled")
	}
}

// testTalosClient: a talosconfig written by `apid gen client` works with
// the official Talos client, and the role it names is enforced.
func (c *secCluster) testTalosClient(t *testing.T) {
	dir := t.TempDir()
	tc := filepath.Join(dir, "talosconfig")
	mustGen(t, "client", "-name", "talos-reader", "-roles", "os:reader", "-ca-dir", c.pki.dir, "-out", dir,
		"-talosconfig", tc, "-endpoints", c.addr(ipA), "-nodes", ipA)
	checkModes(t, filepath.Join(dir, "talos-reader.crt"), filepath.Join(dir, "talos-reader.key"))
	if fi, err := os.Stat(tc); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("talosconfig: %v, %v; want mode 0600 (it holds a key)", fi.Mode(), err)
	}
	cfg, err := clientconfig.Open(tc)
	if err != nil {
		t.Fatal(err)
	}
	nodes := cfg.Contexts[cfg.Context].Nodes
	if !slices.Equal(nodes, []string{ipA}) {
		t.Fatalf("talosconfig nodes %q", nodes)
	}
	cl, err := client.New(context.Background(), client.WithConfigFromFile(tc))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()

	before := c.totals()
	resp, err := cl.Version(client.WithNodes(callContext(t), nodes...))
	if err != nil {
		t.Fatalf("Version as os:reader: %v", err)
	}
	if len(resp.Messages) != 1 || resp.Messages[0].Metadata.GetHostname() != ipA || !strings.HasPrefix(resp.Messages[0].Version.GetTag(), "agent-a/") {
		t.Errorf("Version reply %v", resp)
	}
	if got := c.totals(); got != [2]int{before[0] + 1, before[1]} {
		t.Errorf("agent calls %v -> %v", before, got)
	}

	before = c.totals()
	err = cl.Reboot(client.WithNodes(callContext(t), nodes...))
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), methodReboot) {
		t.Errorf("Reboot as os:reader: %v, want PermissionDenied naming Reboot", err)
	}
	c.expectNoAgentCall(t, before, "Talos client Reboot")
}

// TestGenForce: apid gen keeps existing files unless -force.
func TestGenForce(t *testing.T) {
	dir := t.TempDir()
	mustGen(t, "ca", "-out", dir)
	first, _ := os.ReadFile(filepath.Join(dir, "ca.key"))
	if out, err := runGen("ca", "-out", dir); err == nil {
		t.Fatalf("gen ca over an existing CA succeeded:\n%s", out)
	}
	if again, _ := os.ReadFile(filepath.Join(dir, "ca.key")); !bytes.Equal(first, again) {
		t.Fatal("a refused gen ca changed ca.key")
	}
	mustGen(t, "ca", "-out", dir, "-force")
	if forced, _ := os.ReadFile(filepath.Join(dir, "ca.key")); bytes.Equal(first, forced) {
		t.Fatal("gen ca -force kept the old key")
	}
	checkModes(t, filepath.Join(dir, "ca.crt"), filepath.Join(dir, "ca.key"))
}
