package agent

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"strings"
	"sync"
	"time"

	"github.com/grpc-ecosystem/go-grpc-middleware/v2/interceptors/logging"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	timeapi "github.com/siderolabs/talos/pkg/machinery/api/time"
	"github.com/siderolabs/talos/pkg/machinery/constants"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/reflection"
	"google.golang.org/protobuf/types/known/emptypb"
)

// VersionTag is the tag reported by the Version method: the version of the
// Talos machinery module whose API the agent serves, read from the build
// information (fallbackMachineryVersion when there is none), with the build
// metadata "+apid-example", e.g. "v1.13.9+apid-example". talosctl warns when
// a node's tag is older, by semantic versioning, than its own version;
// build metadata, unlike a pre-release suffix, does not make the tag older
// than the release it names. It is set at start-up and not meant to change.
var VersionTag = machineryVersion() + "+apid-example"

const (
	// machineryModule is the module of the generated Talos types the agent
	// serves.
	machineryModule = "github.com/siderolabs/talos/pkg/machinery"
	// fallbackMachineryVersion is the version of machineryModule in go.mod,
	// for binaries built without module information (a test keeps the two
	// equal).
	fallbackMachineryVersion = "v1.13.9"

	// PlatformName is the platform name reported by the Version method.
	PlatformName = "apid-example-agent"
	// PlatformMode is the platform mode reported by the Version method: the
	// agent runs as an ordinary process and manages no machine.
	PlatformMode = "container"

	// maxRecordedReboots bounds the history kept for Reboots.
	maxRecordedReboots = 1000
)

// Server implements the subset of machine.MachineServiceServer described in
// the package documentation. Create it with [New]; it is safe for concurrent
// use.
type Server struct {
	machine.UnimplementedMachineServiceServer

	cfg      Config
	allowed  []string // read roots, cleaned as configured
	resolved []string // read roots, symlink-resolved
	log      *slog.Logger
	ring     logRing
	logs     map[string]logRing // the logs of controller-runtime and the services beside the agent
	startup  []string           // the agent's first log lines, replayed by the Dmesg fallback
	bootTime time.Time          // zero when unknown; used to date kernel records

	events  *eventLog
	res     *resources // the resource API; nil if it could not be made
	configs machineConfigs
	images  imageStore

	mu            sync.Mutex
	reboots       []*machine.RebootRequest
	services      []*simService // sorted by ID
	sequence      string        // the simulated lifecycle operation in progress, if any
	sequenceActor string        // and its actor ID

	started         time.Time // when New made the agent
	stopControllers func()    // stops the controller runtime; nil if none
	closeOnce       sync.Once

	closed chan struct{}  // closed by Close
	sims   sync.WaitGroup // lifecycle simulations in progress
}

// New returns an agent configured by cfg (see [Config] for defaults).
func New(cfg Config) *Server {
	cfg = cfg.withDefaults()
	s := &Server{
		cfg:      cfg,
		ring:     newLogRing(cfg.LogCapacity),
		logs:     map[string]logRing{controllerRuntimeLogID: newLogRing(cfg.LogCapacity)},
		bootTime: bootTime(),
		events:   newEventLog(eventCapacity),
		services: newSimServices(SimulatedServices),
		closed:   make(chan struct{}),
		started:  time.Now(),
	}
	for _, id := range cfg.BesideServices {
		s.logs[id] = newLogRing(cfg.LogCapacity)
	}
	s.allowed, s.resolved = resolveRoots(cfg.ReadRoots)
	s.log = slog.New(slog.NewMultiHandler(
		cfg.Logger.Handler(),
		slog.NewTextHandler(s.ring, &slog.HandlerOptions{Level: slog.LevelInfo}),
	))
	s.log.Info("example agent ready", "hostname", cfg.Hostname, "read_roots", s.resolved,
		"kernel_log", cfg.KernelLogPath, "go", runtime.Version())
	s.startup, _, _, _ = s.ring.since(0)
	var err error
	if s.res, err = newResources(cfg); err != nil {
		s.log.Error("resource API not served", "error", err)
	}
	if err := s.loadInitialConfig(cfg.MachineConfig); err != nil {
		s.log.Error("machine configuration not loaded", "error", err)
	}
	if s.res != nil {
		ctx, cancel := context.WithCancel(context.Background())
		if done, err := s.res.startControllers(ctx, cfg, selfMember(cfg), s.logs[controllerRuntimeLogID]); err != nil {
			cancel()
			s.log.Error("controllers not started", "error", err)
		} else {
			s.stopControllers = func() { cancel(); <-done }
		}
	}
	s.boot()
	return s
}

// boot puts the simulated node in the state a booted Talos node is in, and
// publishes the events of that boot (with no actor): services running and
// healthy, the machine running and ready.
func (s *Server) boot() {
	s.publish("", machineStatus(machine.MachineStatusEvent_BOOTING, false))
	s.publish("", &machine.SequenceEvent{Sequence: "boot", Action: machine.SequenceEvent_START})
	s.publish("", &machine.PhaseEvent{Phase: "startEverything", Action: machine.PhaseEvent_START})
	s.mu.Lock()
	for _, svc := range s.services {
		task := "startService(" + svc.id + ")"
		s.publish("", &machine.TaskEvent{Task: task, Action: machine.TaskEvent_START})
		s.startService(svc, "", "agent start")
		s.publish("", &machine.TaskEvent{Task: task, Action: machine.TaskEvent_STOP})
	}
	s.mu.Unlock()
	s.publish("", &machine.PhaseEvent{Phase: "startEverything", Action: machine.PhaseEvent_STOP})
	s.publish("", &machine.SequenceEvent{Sequence: "boot", Action: machine.SequenceEvent_STOP})
	s.publish("", machineStatus(machine.MachineStatusEvent_RUNNING, true))
}

// Register adds the agent's MachineService, ImageService, LifecycleService
// and TimeService, and gRPC server
// reflection, to g, so that tools such as grpcurl work without proto files.
func (s *Server) Register(g *grpc.Server) {
	machine.RegisterMachineServiceServer(g, s)
	machine.RegisterImageServiceServer(g, imageServer{s: s})
	machine.RegisterLifecycleServiceServer(g, lifecycleServer{s: s})
	if s.res != nil {
		s.res.register(g)
	}
	timeapi.RegisterTimeServiceServer(g, timeServer{s: s})
	reflection.Register(g)
}

// Close stops the agent's background work: a simulated reboot, shutdown or
// upgrade in progress stops where it is, and Events streams end with
// Unavailable. It waits for the simulation's goroutine, may be called more
// than once, and is best called after the gRPC server has stopped; lifecycle
// calls made afterwards fail with Unavailable.
func (s *Server) Close() {
	s.mu.Lock()
	select {
	case <-s.closed:
	default:
		close(s.closed)
	}
	s.mu.Unlock()
	s.sims.Wait()
	s.closeOnce.Do(func() {
		if s.stopControllers != nil {
			s.stopControllers()
		}
	})
}

// Version reports the agent's build.
func (s *Server) Version(ctx context.Context, _ *emptypb.Empty) (_ *machine.VersionResponse, err error) {
	sha, built := buildVCS()
	return &machine.VersionResponse{Messages: []*machine.Version{{
		Version: &machine.VersionInfo{
			Tag:       VersionTag,
			Sha:       sha,
			Built:     built,
			GoVersion: runtime.Version(),
			Os:        runtime.GOOS,
			Arch:      runtime.GOARCH,
		},
		Platform: &machine.PlatformInfo{Name: PlatformName, Mode: PlatformMode},
		// apid enforces roles on every call, as Talos does with RBAC on.
		Features: &machine.FeaturesInfo{Rbac: true},
	}}}, nil
}

// Hostname reports the configured hostname.
func (s *Server) Hostname(ctx context.Context, _ *emptypb.Empty) (_ *machine.HostnameResponse, err error) {
	return &machine.HostnameResponse{Messages: []*machine.Hostname{{Hostname: s.cfg.Hostname}}}, nil
}

// ServerOptions are the options a gRPC server needs to serve the agent:
// one line per call in the agent's log (its method, code and duration),
// written once by go-grpc-middleware's logging interceptor rather than by
// each method. Pass them to grpc.NewServer before Register.
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
	return []grpc.ServerOption{
		// Machined's bounds, not grpc-go's 4 MiB: a machine configuration
		// may be large (Talos's TestBigPayload applies one of 11 MB).
		grpc.MaxRecvMsgSize(constants.GRPCMaxMessageSize),
		grpc.MaxSendMsgSize(constants.GRPCMaxMessageSize),
		grpc.ChainUnaryInterceptor(logging.UnaryServerInterceptor(logger, opts...), s.unaryAccess),
		grpc.ChainStreamInterceptor(logging.StreamServerInterceptor(logger, opts...), s.streamAccess),
	}
}

// buildVCS returns the commit and commit time embedded by the Go toolchain,
// or "unknown" and "" when the binary was built without VCS information.
func buildVCS() (sha, built string) {
	sha = "unknown"
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return sha, built
	}
	for _, kv := range info.Settings {
		switch kv.Key {
		case "vcs.revision":
			sha = kv.Value
		case "vcs.time":
			built = kv.Value
		}
	}
	return sha, built
}

// machineryVersion returns the version of machineryModule linked into the
// binary (the replacement's, if it is replaced by another version).
func machineryVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return fallbackMachineryVersion
	}
	for _, dep := range info.Deps {
		if dep.Path != machineryModule {
			continue
		}
		v := dep.Version
		if dep.Replace != nil && dep.Replace.Version != "" {
			v = dep.Replace.Version
		}
		if strings.HasPrefix(v, "v") {
			return v
		}
	}
	return fallbackMachineryVersion
}

// newActorID returns a random version 4 UUID, the shape Talos uses for the
// actor IDs of lifecycle operations.
func newActorID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms.
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
