package logs

import (
	"fmt"
	"log/slog"
	"slices"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// ownLogIDs are the service IDs under which Logs serves the node's own
// log: it stands in for machined.
var ownLogIDs = []string{"agent", "apid-agent", "machined"}

// kernelLogID is the kernel log, as Talos names it; RuntimeID the resource
// controllers' runtime's.
const (
	kernelLogID = "kernel"
	RuntimeID   = "controller-runtime"
)

// DefaultKernelLogPath is the kernel log device Dmesg reads unless told
// otherwise.
const DefaultKernelLogPath = "/dev/kmsg"

// Source is a log served under an ID.
type Source struct {
	ID    string
	Lines Lines
}

// Config says which logs a Registry serves.
type Config struct {
	// Own is the node's own log; Startup its first lines, which the Dmesg
	// fallback replays.
	Own     Lines
	Startup []string
	// Services are the simulated services' logs (what their simulated
	// runner did), in the order their IDs are listed.
	Services []Source
	// Runtime is the resource controllers' runtime's log.
	Runtime Lines
	// Beside are the logs of the services that run beside the node (the
	// demo's apid), which those services write.
	Beside []Source
	// KernelLogPath is the kernel log device Dmesg reads (default
	// DefaultKernelLogPath).
	KernelLogPath string
	// Log is the node's log, told when Dmesg falls back.
	Log *slog.Logger
}

// Registry serves Logs and Dmesg: every log the node keeps, by ID, and the
// kernel's.
type Registry struct {
	cfg      Config
	named    map[string]Lines // Runtime and Beside, by ID
	bootTime time.Time        // zero when unknown; used to date kernel records
}

// New returns a registry of the logs cfg names.
func New(cfg Config) *Registry {
	if cfg.KernelLogPath == "" {
		cfg.KernelLogPath = DefaultKernelLogPath
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	r := &Registry{cfg: cfg, named: map[string]Lines{RuntimeID: cfg.Runtime}, bootTime: bootTime()}
	for _, b := range cfg.Beside {
		r.named[b.ID] = b.Lines
	}
	return r
}

// ids are every log Logs serves: the node's own, each simulated service's,
// the kernel's, the controller runtime's and those of the services beside
// the node.
func (r *Registry) ids() []string {
	ids := slices.Clone(ownLogIDs)
	for _, s := range r.cfg.Services {
		ids = append(ids, s.ID)
	}
	ids = append(ids, kernelLogID, RuntimeID)
	for _, b := range r.cfg.Beside {
		ids = append(ids, b.ID)
	}
	return ids
}

// Logs streams a log, one line per message: the node's own for "agent",
// "apid-agent" or "machined"; a simulated service's (what its simulated
// runner did) for its ID; the kernel's for "kernel" (as Dmesg serves it);
// the controller runtime's for "controller-runtime"; a service's beside
// the node for its ID.
// Any other ID, or the CRI driver, is NotFound in machined's words.
// TailLines follows Talos: a negative value sends every kept line, n >= 0
// the last n. With Follow the stream then waits for new lines until the
// client goes away.
func (r *Registry) Logs(req *machine.LogsRequest, stream grpc.ServerStreamingServer[common.Data]) (err error) {
	id := req.GetId()
	if req.GetDriver() == common.ContainerDriver_CRI {
		return status.Errorf(codes.NotFound, "the example agent runs no containers: log %q was not registered", id)
	}
	switch {
	case slices.Contains(ownLogIDs, id):
		return streamLog(stream, r.cfg.Own, req)
	case id == kernelLogID:
		return r.kernelLog(req, stream)
	}
	if l, ok := r.named[id]; ok {
		return streamLog(stream, l, req)
	}
	i := slices.IndexFunc(r.cfg.Services, func(s Source) bool { return s.ID == id })
	if i < 0 {
		// machined's words last (Talos's tests match the end), what is served first.
		return status.Errorf(codes.NotFound, "this agent serves the logs %q: log %q was not registered", r.ids(), id)
	}
	return streamLog(stream, r.cfg.Services[i].Lines, req)
}

// streamLog sends the lines of r that req asks for.
func streamLog(stream grpc.ServerStreamingServer[common.Data], r Lines, req *machine.LogsRequest) error {
	ctx := stream.Context()
	from := r.TailStart(req.GetTailLines())
	// Headers mark the point from which a follower sees every new line; a
	// client may wait for them before causing the lines it expects.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	for {
		lines, next, dropped, changed := r.Since(from)
		if dropped > 0 {
			msg := fmt.Sprintf("[apid example agent: %d log lines dropped: reader too slow]\n", dropped)
			if err := stream.Send(&common.Data{Bytes: []byte(msg)}); err != nil {
				return err
			}
		}
		for _, l := range lines {
			if err := stream.Send(&common.Data{Bytes: []byte(l + "\n")}); err != nil {
				return err
			}
		}
		from = next
		if !req.GetFollow() {
			return nil
		}
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-changed:
		}
	}
}

// kernelLog serves the kernel log as Logs: Dmesg's records, all of them
// (or, with TailLines, the last ones), then, with Follow, new ones.
func (r *Registry) kernelLog(req *machine.LogsRequest, stream grpc.ServerStreamingServer[common.Data]) error {
	n := req.GetTailLines()
	if req.GetFollow() || n < 0 {
		// Following, or everything: Dmesg's own stream (with Tail when no
		// past line is wanted).
		return r.Dmesg(&machine.DmesgRequest{Follow: req.GetFollow(), Tail: n == 0}, stream)
	}
	last := &lastLines{ServerStreamingServer: stream, n: int(n)}
	if err := r.Dmesg(&machine.DmesgRequest{}, last); err != nil {
		return err
	}
	for _, d := range last.kept {
		if err := stream.Send(d); err != nil {
			return err
		}
	}
	return nil
}

// lastLines keeps the last n messages sent to it instead of sending them.
type lastLines struct {
	grpc.ServerStreamingServer[common.Data]
	n    int
	kept []*common.Data
}

func (l *lastLines) Send(d *common.Data) error {
	if l.n == 0 {
		return nil
	}
	if len(l.kept) == l.n {
		l.kept = append(l.kept[:0], l.kept[1:]...)
	}
	l.kept = append(l.kept, d)
	return nil
}
