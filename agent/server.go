package agent

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"runtime"
	"runtime/debug"
	"sync"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
)

const (
	// VersionTag is the tag reported by the Version method.
	VersionTag = "v0.1.0-example"
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
	ring     *logRing
	startup  []string  // the agent's first log lines, replayed by the Dmesg fallback
	bootTime time.Time // zero when unknown; used to date kernel records

	mu      sync.Mutex
	reboots []*machine.RebootRequest
}

// New returns an agent configured by cfg (see [Config] for defaults).
func New(cfg Config) *Server {
	cfg = cfg.withDefaults()
	s := &Server{cfg: cfg, ring: newLogRing(cfg.LogCapacity), bootTime: bootTime()}
	s.allowed, s.resolved = resolveRoots(cfg.ReadRoots)
	s.log = slog.New(slog.NewMultiHandler(
		cfg.Logger.Handler(),
		slog.NewTextHandler(s.ring, &slog.HandlerOptions{Level: slog.LevelInfo}),
	))
	s.log.Info("example agent ready", "hostname", cfg.Hostname, "read_roots", s.resolved,
		"kernel_log", cfg.KernelLogPath, "go", runtime.Version())
	s.startup, _, _, _ = s.ring.since(0)
	return s
}

// Register adds the agent's MachineService and gRPC server reflection to g,
// so that tools such as grpcurl work without proto files.
func (s *Server) Register(g *grpc.Server) {
	machine.RegisterMachineServiceServer(g, s)
	reflection.Register(g)
}

// Reboots returns copies of the requests recorded by Reboot, oldest first
// (at most the latest 1,000).
func (s *Server) Reboots() []*machine.RebootRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*machine.RebootRequest, len(s.reboots))
	for i, r := range s.reboots {
		out[i] = proto.CloneOf(r)
	}
	return out
}

// Version reports the agent's build.
func (s *Server) Version(ctx context.Context, _ *emptypb.Empty) (_ *machine.VersionResponse, err error) {
	defer s.logCall(ctx, "Version", time.Now(), &err)
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
	}}}, nil
}

// Hostname reports the configured hostname.
func (s *Server) Hostname(ctx context.Context, _ *emptypb.Empty) (_ *machine.HostnameResponse, err error) {
	defer s.logCall(ctx, "Hostname", time.Now(), &err)
	return &machine.HostnameResponse{Messages: []*machine.Hostname{{Hostname: s.cfg.Hostname}}}, nil
}

// Reboot records the request and replies as Talos does, without rebooting
// anything.
func (s *Server) Reboot(ctx context.Context, req *machine.RebootRequest) (_ *machine.RebootResponse, err error) {
	defer s.logCall(ctx, "Reboot", time.Now(), &err)
	actor := newActorID()
	s.mu.Lock()
	if len(s.reboots) == maxRecordedReboots {
		s.reboots = append(s.reboots[:0], s.reboots[1:]...)
	}
	s.reboots = append(s.reboots, proto.CloneOf(req))
	s.mu.Unlock()
	s.log.Info("reboot requested; example agent does not reboot", "mode", req.GetMode().String(), "actor_id", actor)
	return &machine.RebootResponse{Messages: []*machine.Reboot{{ActorId: actor}}}, nil
}

// logCall records one served call; it is deferred with a pointer to the
// method's named error so that it sees the final outcome.
func (s *Server) logCall(ctx context.Context, method string, start time.Time, errp *error) {
	code := status.Code(*errp)
	attrs := []any{"method", method, "code", code.String(), "duration", time.Since(start)}
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		attrs = append(attrs, "peer", p.Addr.String())
	}
	level := slog.LevelInfo
	if *errp != nil {
		// A follower that hangs up is the normal end of a follow stream.
		if code != codes.Canceled {
			level = slog.LevelWarn
		}
		attrs = append(attrs, "error", status.Convert(*errp).Message())
	}
	s.log.Log(ctx, level, "call served", attrs...)
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

// newActorID returns a random version 4 UUID, the shape Talos uses for the
// actor IDs of lifecycle operations.
func newActorID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms.
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
