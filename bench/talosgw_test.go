package bench

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	siderolabs "github.com/siderolabs/grpc-proxy/proxy"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/internal/testpki"
)

// The anchor of the whole-gateway benchmarks: siderolabs/grpc-proxy wired
// as Talos v1.13's apid wires it (internal/app/apid of siderolabs/talos:
// runService's server options and streamed-method list, its router, its
// APID and local backends, the authz injector, and pkg/grpc/factory's log
// and recovery interceptors), written here from that design, run in a
// process of its own so that its CPU can be read from /proc. The test
// binary runs it when talosGatewayEnv holds its configuration (JSON).
// Replies of a fan-out are stamped with the aggregate package (see
// siderolabsBackend), the rest is as Talos does it.
const talosGatewayEnv = "APID_BENCH_TALOS_GATEWAY"

type talosGatewayConfig struct {
	CA, Cert, Key, ClientCert, ClientKey string
	Listen                               string
	Local                                string // the local node agent (host:port, plain text)
	RemotePort                           int
}

// talosStreamed is runService's list of streamed methods, then "Stream$".
var talosStreamed = func() []*regexp.Regexp {
	var out []*regexp.Regexp
	for _, m := range []string{
		"/machine.MachineService/Copy", "/machine.MachineService/DiskUsage", "/machine.MachineService/Dmesg",
		"/machine.MachineService/EtcdSnapshot", "/machine.MachineService/Events", "/machine.MachineService/ImageList",
		"/machine.MachineService/Kubeconfig", "/machine.MachineService/List", "/machine.MachineService/DebugContainer",
		"/machine.MachineService/Logs", "/machine.MachineService/PacketCapture", "/machine.MachineService/Read",
		"/machine.LifecycleService/Install", "/machine.LifecycleService/Upgrade", "/os.OSService/Dmesg",
		"/cluster.ClusterService/HealthCheck",
	} {
		out = append(out, regexp.MustCompile("^"+regexp.QuoteMeta(m)+"$"))
	}
	return append(out, regexp.MustCompile("Stream$"))
}()

// talosRolesKey is where Talos's authz injector puts the caller's roles.
type talosRolesKey struct{}

// talosInjector is authz.Injector in its Enabled mode: the roles are the
// Organization of the peer's certificate, or, for an impersonator (another
// apid forwarding), the talos-role metadata.
func talosInjector(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	ctx := ss.Context()
	p, _ := peer.FromContext(ctx)
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return status.Error(codes.Unauthenticated, "no client certificate")
	}
	var roles []string
	for _, o := range info.State.PeerCertificates[0].Subject.Organization {
		if strings.HasPrefix(o, "os:") {
			roles = append(roles, o)
		}
	}
	if slices.Contains(roles, "os:impersonator") {
		if md, _ := metadata.FromIncomingContext(ctx); len(md.Get("talos-role")) > 0 {
			roles = md.Get("talos-role")
		}
	}
	return handler(srv, &ctxStream{ServerStream: ss, ctx: context.WithValue(ctx, talosRolesKey{}, roles)})
}

type ctxStream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *ctxStream) Context() context.Context { return s.ctx }

// talosLog is the factory's log interceptor: a line per call.
func talosLog(logger *log.Logger) grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		start := time.Now()
		err := handler(srv, ss)
		msg := "Success"
		if err != nil {
			msg = err.Error()
		}
		md, _ := metadata.FromIncomingContext(ss.Context())
		logger.Printf("%s [%s] %s stream %s (%v)", status.Code(err), info.FullMethod, time.Since(start), msg, md)
		return err
	}
}

// talosRecover is the factory's recovery interceptor.
func talosRecover(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = status.Errorf(codes.Internal, "%v", p)
		}
	}()
	return handler(srv, ss)
}

// talosBackend is Talos's APID backend (a remote node) or its local one:
// the caller's metadata copied, the roles set as talos-role, node and
// nodes removed, proxyfrom set; one connection, made on first use.
type talosBackend struct {
	target string
	dial   func() (*grpc.ClientConn, error)
	local  bool

	mu   sync.Mutex
	conn *grpc.ClientConn
}

func (b *talosBackend) String() string { return b.target }

func (b *talosBackend) GetConnection(ctx context.Context, _ string) (context.Context, *grpc.ClientConn, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	md = md.Copy()
	roles, _ := ctx.Value(talosRolesKey{}).([]string)
	md.Set("talos-role", roles...)
	if !b.local {
		if authority := md[":authority"]; len(authority) > 0 {
			md.Set("proxyfrom", authority...)
		} else {
			md.Set("proxyfrom", "unknown")
		}
		delete(md, ":authority")
		delete(md, "nodes")
		delete(md, "node")
	}
	out := metadata.NewOutgoingContext(ctx, md)
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.conn != nil {
		return out, b.conn, nil
	}
	var err error
	b.conn, err = b.dial()
	return out, b.conn, err
}

func (b *talosBackend) AppendInfo(streaming bool, resp []byte) ([]byte, error) {
	return (&siderolabsBackend{name: b.target}).AppendInfo(streaming, resp)
}

func (b *talosBackend) BuildError(streaming bool, err error) ([]byte, error) {
	return (&siderolabsBackend{name: b.target}).BuildError(streaming, err)
}

// talosRouter is Talos's director: proxyfrom or no node → local; node →
// one-to-one to that node's backend; nodes → one-to-many.
type talosRouter struct {
	local   *talosBackend
	factory func(target string) *talosBackend
}

func (r *talosRouter) director(ctx context.Context, method string) (siderolabs.Mode, []siderolabs.Backend, error) {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return siderolabs.One2One, []siderolabs.Backend{r.local}, nil
	}
	if _, exists := md["proxyfrom"]; exists {
		return siderolabs.One2One, []siderolabs.Backend{r.local}, nil
	}
	nodes, okNodes := md["nodes"]
	node, okNode := md["node"]
	if okNode && len(node) != 1 {
		return siderolabs.One2One, nil, status.Error(codes.InvalidArgument, "node metadata must be single-valued")
	}
	switch {
	case okNodes:
		if !strings.HasPrefix(method, "/machine.MachineService/") && !strings.HasPrefix(method, "/cluster.ClusterService/") &&
			!strings.HasPrefix(method, "/inspect.InspectService/") && !strings.HasPrefix(method, "/storage.StorageService/") &&
			!strings.HasPrefix(method, "/time.TimeService/") {
			return siderolabs.One2One, nil, status.Errorf(codes.InvalidArgument, "one-2-many proxying is not supported for method %s", method)
		}
		backends := make([]siderolabs.Backend, len(nodes))
		for i, n := range nodes {
			backends[i] = r.factory(n)
		}
		return siderolabs.One2Many, backends, nil
	case okNode:
		return siderolabs.One2One, []siderolabs.Backend{r.factory(node[0])}, nil
	}
	return siderolabs.One2One, []siderolabs.Backend{r.local}, nil
}

// runTalosGateway serves until SIGTERM.
func runTalosGateway(cfgJSON string) error {
	var cfg talosGatewayConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		return err
	}
	pool, serving, err := loadIdentity(cfg.CA, cfg.Cert, cfg.Key)
	if err != nil {
		return err
	}
	forwarding, err := tls.LoadX509KeyPair(cfg.ClientCert, cfg.ClientKey)
	if err != nil {
		return err
	}
	serverTLS := &tls.Config{Certificates: []tls.Certificate{serving}, ClientCAs: pool, ClientAuth: tls.RequireAndVerifyClientCert,
		MinVersion: tls.VersionTLS13, NextProtos: []string{"h2"},
		VerifyPeerCertificate: func(_ [][]byte, chains [][]*x509.Certificate) error {
			if len(chains) == 0 {
				return errors.New("no verified chains")
			}
			for _, c := range chains[0] {
				if !c.IsCA && !slices.Equal(c.ExtKeyUsage, []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}) {
					return fmt.Errorf("certificate %q is missing the client auth extended key usage", c.Subject)
				}
			}
			return nil
		}}
	const maxMessage = 32 << 20 // constants.GRPCMaxMessageSize
	dialOpts := func(creds credentials.TransportCredentials) []grpc.DialOption {
		bo := backoff.DefaultConfig
		bo.MaxDelay = 15 * time.Second
		return []grpc.DialOption{
			grpc.WithInitialWindowSize(65535 * 32), grpc.WithInitialConnWindowSize(65535 * 16),
			grpc.WithTransportCredentials(creds),
			grpc.WithConnectParams(grpc.ConnectParams{Backoff: bo, MinConnectTimeout: 20 * time.Second}),
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.ForceCodecV2(siderolabs.Codec())),
		}
	}
	var mu sync.Mutex
	remotes := map[string]*talosBackend{}
	router := &talosRouter{
		local: &talosBackend{target: "machined", local: true, dial: func() (*grpc.ClientConn, error) {
			return grpc.NewClient(cfg.Local, grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxMessage), grpc.ForceCodecV2(siderolabs.Codec())))
		}},
		factory: func(target string) *talosBackend {
			mu.Lock()
			defer mu.Unlock()
			if b, ok := remotes[target]; ok {
				return b
			}
			b := &talosBackend{target: target, dial: func() (*grpc.ClientConn, error) {
				tlsCfg := &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{forwarding}, ServerName: target, MinVersion: tls.VersionTLS13}
				return grpc.NewClient(net.JoinHostPort(target, strconv.Itoa(cfg.RemotePort)), dialOpts(credentials.NewTLS(tlsCfg))...)
			}}
			remotes[target] = b
			return b
		},
	}
	streamed := func(method string) bool {
		return slices.ContainsFunc(talosStreamed, func(re *regexp.Regexp) bool { return re.MatchString(method) })
	}
	logger := log.New(os.Stderr, "", log.LstdFlags)
	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(serverTLS)),
		grpc.ForceServerCodecV2(siderolabs.Codec()),
		grpc.UnknownServiceHandler(siderolabs.TransparentHandler(router.director, siderolabs.WithStreamedDetector(streamed))),
		grpc.MaxRecvMsgSize(maxMessage),
		grpc.InitialWindowSize(65535*32), grpc.InitialConnWindowSize(65535*16),
		grpc.ChainStreamInterceptor(talosLog(logger), talosRecover, talosInjector),
	)
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	if path := os.Getenv("APID_BENCH_TALOS_CPUPROFILE"); path != "" { // for comparing profiles
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		go func() {
			time.Sleep(10 * time.Second)
			pprof.StopCPUProfile()
			_ = f.Close()
		}()
	}
	return serveUntilSignal(srv, lis, "talos gateway serving")
}

// startTalosGatewayProcess runs the Talos-wired gateway in front of the
// fleet, as startGatewayProcess runs apid: on 127.0.69.3, the fleet's CA,
// remote port and a local test backend.
func startTalosGatewayProcess(tb testing.TB, f *gatewayFleet, local string) *gatewayProcess {
	tb.Helper()
	const ip = "127.0.69.3"
	files := testpki.WriteNode(tb, f.ca, f.dir, "talos-gateway", net.ParseIP(ip))
	addr := net.JoinHostPort(ip, strconv.Itoa(sharedPort(tb, []string{ip})))
	cfg, _ := json.Marshal(talosGatewayConfig{CA: filepath.Join(f.dir, "ca.crt"), Cert: files.Cert, Key: files.Key,
		ClientCert: files.ClientCert, ClientKey: files.ClientKey, Listen: addr, Local: local, RemotePort: f.port})
	cmd := startHelper(tb, talosGatewayEnv, string(cfg), "talos gateway serving")
	return &gatewayProcess{cmd: cmd, addr: addr}
}
