package agent

import (
	"bytes"
	"fmt"
	"slices"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// logIDs are the service IDs under which Logs serves the agent's own log.
var logIDs = []string{"agent", "apid-agent"}

// Logs streams the agent's own log, one line per message, for the service ID
// "agent" (or "apid-agent"); any other ID, or the CRI driver, is NotFound. TailLines follows
// Talos: a negative value sends every kept line, n >= 0 the last n. With
// Follow the stream then waits for new lines until the client goes away.
func (s *Server) Logs(req *machine.LogsRequest, stream grpc.ServerStreamingServer[common.Data]) (err error) {
	ctx := stream.Context()

	if !slices.Contains(logIDs, req.GetId()) || req.GetDriver() == common.ContainerDriver_CRI {
		// machined's words last (Talos's tests match the end), what is served first.
		return status.Errorf(codes.NotFound, "this agent serves the logs %q: log %q was not registered", logIDs, req.GetId())
	}

	from := s.ring.tailStart(req.GetTailLines())
	// Headers mark the point from which a follower sees every new line; a
	// client may wait for them before causing the lines it expects.
	if err := stream.SendHeader(metadata.MD{}); err != nil {
		return err
	}
	for {
		lines, next, dropped, changed := s.ring.since(from)
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
