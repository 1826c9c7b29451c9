package node

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"runtime"
	"sync"
	"time"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	timeapi "github.com/siderolabs/talos/pkg/machinery/api/time"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/apid/apid/internal/demo/clientconfig"
	"github.com/apid/apid/internal/demo/clock"
	"github.com/apid/apid/internal/demo/containers"
	"github.com/apid/apid/internal/demo/etcd"
	"github.com/apid/apid/internal/demo/files"
	"github.com/apid/apid/internal/demo/identity"
	"github.com/apid/apid/internal/demo/lifecycle"
	"github.com/apid/apid/internal/demo/logs"
	"github.com/apid/apid/internal/demo/machineconfig"
	"github.com/apid/apid/internal/demo/monitoring"
	"github.com/apid/apid/internal/demo/resources"
)

// Server is a demo node: the parts of the Talos API described in the
// package documentation, wired together. Create it with [New]; it is safe
// for concurrent use.
type Server struct {
	log     *slog.Logger
	service *machineService       // machine.MachineService, from the parts
	machine *lifecycle.Machine    // the simulated machine
	runtime *containers.Runtime   // the container runtime without containers
	res     *resources.API        // the resource API; nil if it could not be made
	beside  map[string]logs.Lines // the logs of the services beside the node

	stopControllers func() // stops the controller runtime; nil if none
	closeOnce       sync.Once
}

// unimplemented answers the methods that no part serves, as gRPC does. It
// is embedded one level down in machineService, so that a part's method
// always takes precedence over it.
type unimplemented struct {
	machine.UnimplementedMachineServiceServer
}

// machineService is machine.MachineService: each part serves its methods,
// and two parts serving one method would not compile.
type machineService struct {
	unimplemented
	unserved
	*identity.Identity   // Version, Hostname
	*monitoring.Monitor  // Memory, LoadAvg, Processes, Netstat, …
	*logs.Registry       // Logs, Dmesg
	*files.Roots         // Read, List, DiskUsage, Copy
	*lifecycle.Machine   // services, Reboot, Shutdown, Upgrade, Events, …
	*etcd.API            // the etcd calls, EtcdRecover, Bootstrap
	*machineconfig.Store // ApplyConfiguration
	*clientconfig.Issuer // GenerateClientConfiguration
	*containers.Runtime  // Containers, Stats, ImageList, ImagePull, …
}

var _ machine.MachineServiceServer = (*machineService)(nil)

// New returns a node configured by cfg (see [Config] for defaults).
func New(cfg Config) *Server {
	cfg = cfg.withDefaults()
	own, runtimeLog := logs.NewLines(cfg.LogCapacity), logs.NewLines(cfg.LogCapacity)
	s := &Server{beside: map[string]logs.Lines{}}
	var beside []logs.Source
	for _, id := range cfg.BesideServices {
		s.beside[id] = logs.NewLines(cfg.LogCapacity)
		beside = append(beside, logs.Source{ID: id, Lines: s.beside[id]})
	}
	// The simulated machine's boot (its ID and time), not the host's: they
	// change when it reboots. s.machine is made below, before any call.
	roots := files.New(cfg.ReadRoots, files.WithBootID(func() string { return s.machine.BootID() }))
	s.log = slog.New(slog.NewMultiHandler(
		cfg.Logger.Handler(),
		slog.NewTextHandler(own, &slog.HandlerOptions{Level: slog.LevelInfo}),
	))
	s.log.Info("example agent ready", "hostname", cfg.Hostname, "read_roots", roots.Resolved(),
		"kernel_log", cfg.KernelLogPath, "go", runtime.Version())
	startup, _, _, _ := own.Since(0)

	var err error
	if s.res, err = resources.New(resources.Config{Hostname: cfg.Hostname, ClusterName: cfg.ClusterName, Members: cfg.Members}); err != nil {
		s.log.Error("resource API not served", "error", err)
	}
	// The machine and its configurations call on each other: a reboot
	// applies what is staged, and a configuration may ask for a reboot.
	mc := machineconfig.Config{Log: s.log, Reboot: func() error { return s.machine.RebootToApply() }}
	var observe func(proto.Message)
	if s.res != nil {
		mc.Publish, observe = s.res.PutMachineConfig, s.res.Reflect
	}
	configs := machineconfig.New(mc)
	if err := configs.Load(cfg.MachineConfig); err != nil {
		s.log.Error("machine configuration not loaded", "error", err)
	}
	lc := lifecycle.Config{Log: s.log, Beside: cfg.BesideServices, Observe: observe, OnBoot: configs.ApplyStaged, Downtime: cfg.Downtime}
	if m := cfg.Etcd; m != nil {
		// A rebooting control-plane node takes its etcd member with it.
		lc.OnDown = m.Stop
		lc.OnUp = func() {
			if err := m.Restart(); err != nil {
				s.log.Warn("etcd member not restarted after the simulated reboot", "error", err)
			}
		}
	}
	s.machine = lifecycle.New(lc)
	if s.res != nil {
		ctx, cancel := context.WithCancel(context.Background())
		if done, err := s.res.StartControllers(ctx, runtimeLog); err != nil {
			cancel()
			s.log.Error("controllers not started", "error", err)
		} else {
			s.stopControllers = func() { cancel(); <-done }
		}
	}
	s.runtime = containers.New(s.log)
	s.service = &machineService{
		Identity: identity.New(cfg.Hostname),
		Monitor:  monitoring.New(cfg.MeminfoPath, monitoring.WithBootTime(func() time.Time { return s.machine.BootTime() })),
		Registry: logs.New(logs.Config{Own: own, Startup: startup, Services: s.machine.ServiceLogs(), Runtime: runtimeLog,
			Beside: beside, KernelLogPath: cfg.KernelLogPath, Log: s.log}),
		Roots:   roots,
		Machine: s.machine,
		API:     etcd.NewAPI(cfg.Etcd, s.log),
		Store:   configs,
		Issuer: clientconfig.New(clientconfig.Config{CA: cfg.ClientCA, Endpoints: cfg.Endpoints, MaxTTL: cfg.MaxClientTTL,
			ClusterName: cfg.ClusterName, Log: s.log}),
		Runtime: s.runtime,
	}
	s.machine.Boot()
	return s
}

// BootID is the simulated machine's boot ID, which changes when it reboots.
func (s *Server) BootID() string { return s.machine.BootID() }

// Register adds the node's MachineService, ImageService, LifecycleService,
// the resource API (COSI State and InspectService) and TimeService, and gRPC
// server reflection, to g, so that tools such as grpcurl work without proto
// files.
func (s *Server) Register(g *grpc.Server) {
	machine.RegisterMachineServiceServer(g, s.service)
	machine.RegisterImageServiceServer(g, s.runtime.ImageService())
	machine.RegisterLifecycleServiceServer(g, s.runtime.InstallService())
	if s.res != nil {
		s.res.Register(g)
	}
	timeapi.RegisterTimeServiceServer(g, clock.Local{})
	reflection.Register(g)
}

// ServerOptions are the options a gRPC server needs to serve the node:
// one line per call in the node's log (its method, code and duration),
// written once by go-grpc-middleware's logging interceptor rather than by
// each method, and the resource API's access rules. Pass them to
// grpc.NewServer before Register.
func (s *Server) ServerOptions() []grpc.ServerOption {
	logger := logging.LoggerFunc(func(ctx context.Context, level logging.Level, msg string, fields ...any) {
		s.log.Log(ctx, slog.Level(level), msg, fields...)
	})
	opts := []logging.Option{
		logging.WithLogOnEvents(logging.FinishCall),
		// A follower that hangs up is the normal end of a follow stream.
		logging.WithLevels(func(code codes.Code) logging.Level {
			if code == codes.Canceled {
				return logging.LevelInfo
			}
			return logging.DefaultServerCodeToLevel(code)
		}),
	}
	unary := []grpc.UnaryServerInterceptor{logging.UnaryServerInterceptor(logger, opts...), s.unaryUp}
	stream := []grpc.StreamServerInterceptor{logging.StreamServerInterceptor(logger, opts...), s.streamUp}
	if s.res != nil {
		unary, stream = append(unary, s.res.UnaryAccess), append(stream, s.res.StreamAccess)
	}
	return []grpc.ServerOption{
		// Machined's bounds, not grpc-go's 4 MiB: a machine configuration
		// may be large (Talos's TestBigPayload applies one of 11 MB).
		grpc.MaxRecvMsgSize(constants.GRPCMaxMessageSize),
		grpc.MaxSendMsgSize(constants.GRPCMaxMessageSize),
		grpc.ChainUnaryInterceptor(unary...),
		grpc.ChainStreamInterceptor(stream...),
	}
}

// Serve serves the node on lis until ctx ends, then stops the server;
// log records the stop. Close the node once Serve has returned.
func (s *Server) Serve(ctx context.Context, lis net.Listener, log *slog.Logger) error {
	srv := grpc.NewServer(s.ServerOptions()...)
	s.Register(srv)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		log.Debug("stopping", "listen", lis.Addr().String())
		srv.Stop()
		<-done
		return nil
	}
}

// Close stops the node's background work: a simulated reboot, shutdown or
// upgrade in progress stops where it is, Events streams end with
// Unavailable, and the controllers stop. It waits for the simulation's
// goroutine, may be called more than once, and is best called after the
// gRPC server has stopped; lifecycle calls made afterwards fail with
// Unavailable.
func (s *Server) Close() {
	s.machine.Close()
	s.closeOnce.Do(func() {
		if s.stopControllers != nil {
			s.stopControllers()
		}
	})
}

// BesideLog is where a service that runs beside the node (one of
// Config.BesideServices, such as the demo's apid) writes its log, for Logs
// to serve under its ID; nil for any other ID.
func (s *Server) BesideLog(id string) io.Writer {
	if l, ok := s.beside[id]; ok {
		return l
	}
	return nil
}

// SetMembers changes the cluster's members the resource API shows (as a
// Talos node's discovery sees nodes join and leave).
func (s *Server) SetMembers(ms []resources.Member) error {
	if s.res == nil {
		return errors.New("the resource API is not served")
	}
	return s.res.SetMembers(ms)
}

// Reboots returns copies of the reboot requests the node received, oldest
// first (at most the latest 1,000).
func (s *Server) Reboots() []*machine.RebootRequest { return s.machine.Reboots() }

// errDown is what every call meets while the simulated machine is down.
var errDown = status.Error(codes.Unavailable, "the simulated node is down (rebooting): it answers again once it has booted")

// unaryUp and streamUp refuse calls while the simulated machine is down,
// as a node that is off does not answer.
func (s *Server) unaryUp(ctx context.Context, req any, _ *grpc.UnaryServerInfo, next grpc.UnaryHandler) (any, error) {
	if s.machine.Down() {
		return nil, errDown
	}
	return next(ctx, req)
}

func (s *Server) streamUp(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, next grpc.StreamHandler) error {
	if s.machine.Down() {
		return errDown
	}
	return next(srv, ss)
}
