package agent

import (
	"bytes"
	"fmt"
	"io"
	"slices"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// ownLogIDs are the service IDs under which Logs serves the agent's own
// log: it stands in for machined.
var ownLogIDs = []string{"agent", "apid-agent", "machined"}

// kernelLogID is the kernel log, as Talos names it; controllerRuntimeLogID
// the resource controllers' runtime's.
const (
	kernelLogID            = "kernel"
	controllerRuntimeLogID = "controller-runtime"
)

// logIDs are every log Logs serves: the agent's own, each simulated
// service's, the kernel's, the controller runtime's and those of the
// services beside the agent.
func (s *Server) logIDs() []string {
	return slices.Concat(ownLogIDs, SimulatedServices, []string{kernelLogID, controllerRuntimeLogID}, s.cfg.BesideServices)
}

// BesideLog is where a service that runs beside the agent (one of
// Config.BesideServices, such as the demo's apid) writes its log, for Logs
// to serve under its ID; nil for any other ID.
func (s *Server) BesideLog(id string) io.Writer {
	if !slices.Contains(s.cfg.BesideServices, id) {
		return nil
	}
	return s.logs[id]
}

// Logs streams a log, one line per message: the agent's own for "agent",
// "apid-agent" or "machined"; a simulated service's (what its simulated
// runner did) for its ID; the kernel's for "kernel" (as Dmesg serves it);
// the controller runtime's for "controller-runtime"; a service's beside
// the agent (BesideLog) for its ID.
// Any other ID, or the CRI driver, is NotFound in machined's words.
// TailLines follows Talos: a negative value sends every kept line, n >= 0
// the last n. With Follow the stream then waits for new lines until the
// client goes away.
func (s *Server) Logs(req *machine.LogsRequest, stream grpc.ServerStreamingServer[common.Data]) (err error) {
	id := req.GetId()
	if req.GetDriver() == common.ContainerDriver_CRI {
		return status.Errorf(codes.NotFound, "the example agent runs no containers: log %q was not registered", id)
	}
	switch {
	case slices.Contains(ownLogIDs, id):
		return streamLog(stream, s.ring, req)
	case id == kernelLogID:
		return s.kernelLog(req, stream)
	}
	if r, ok := s.logs[id]; ok {
		return streamLog(stream, r, req)
	}
	s.mu.Lock()
	svc := s.service(id)
	s.mu.Unlock()
	if svc == nil {
		// machined's words last (Talos's tests match the end), what is served first.
		return status.Errorf(codes.NotFound, "this agent serves the logs %q: log %q was not registered", s.logIDs(), id)
	}
	return streamLog(stream, svc.log, req)
}

// streamLog sends the lines of r that req asks for.
func streamLog(stream grpc.ServerStreamingServer[common.Data], r logRing, req *machine.LogsRequest) error {
	ctx := stream.Context()
	from := r.tailStart(req.GetTailLines())
	// Headers mark the point from which a follower sees every new line; a
	// client may wait for them before causing the lines it expects.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	for {
		lines, next, dropped, changed := r.since(from)
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

// logRing keeps the latest lines of the agent's log.
type logRing struct{ *ring[string] }

func newLogRing(capacity int) logRing { return logRing{newRing[string](capacity)} }

// Write appends p as one or more lines; slog's handlers call it once per
// record.
func (r logRing) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for line := range bytes.Lines(p) {
		r.appendLocked(string(bytes.TrimRight(line, "\r\n")))
	}
	return len(p), nil
}

// tailStart returns the number of the line from which the last n lines
// start; a negative n means every kept line.
func (r logRing) tailStart(n int32) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.tailStartLocked(n)
}

// kernelLog serves the kernel log as Logs: Dmesg's records, all of them
// (or, with TailLines, the last ones), then, with Follow, new ones.
func (s *Server) kernelLog(req *machine.LogsRequest, stream grpc.ServerStreamingServer[common.Data]) error {
	n := req.GetTailLines()
	if req.GetFollow() || n < 0 {
		// Following, or everything: Dmesg's own stream (with Tail when no
		// past line is wanted).
		return s.Dmesg(&machine.DmesgRequest{Follow: req.GetFollow(), Tail: n == 0}, stream)
	}
	last := &lastLines{ServerStreamingServer: stream, n: int(n)}
	if err := s.Dmesg(&machine.DmesgRequest{}, last); err != nil {
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
