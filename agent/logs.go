package agent

import (
	"bytes"
	"fmt"
	"slices"
	"sync"
	"time"

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
	defer s.logCall(ctx, "Logs", time.Now(), &err)

	if !slices.Contains(logIDs, req.GetId()) || req.GetDriver() == common.ContainerDriver_CRI {
		return status.Errorf(codes.NotFound, "log %q not found: this agent serves only %q", req.GetId(), logIDs)
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

// logRing keeps the latest lines of the agent's log. Lines are numbered from
// 0 in the order they arrive; a reader keeps the number of the next line it
// wants and is woken through a channel that is closed on every append.
type logRing struct {
	mu      sync.Mutex
	lines   []string // lines[seq%len(lines)] holds line seq
	next    uint64   // number of the next line to be appended
	changed chan struct{}
}

func newLogRing(capacity int) *logRing {
	return &logRing{lines: make([]string, capacity), changed: make(chan struct{})}
}

// Write appends p as one or more lines; slog's handlers call it once per
// record.
func (r *logRing) Write(p []byte) (int, error) {
	for line := range bytes.Lines(p) {
		r.append(string(bytes.TrimRight(line, "\r\n")))
	}
	return len(p), nil
}

func (r *logRing) append(line string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.lines[r.next%uint64(len(r.lines))] = line
	r.next++
	close(r.changed)
	r.changed = make(chan struct{})
}

// oldest is the number of the oldest line still kept; r.mu must be held.
func (r *logRing) oldest() uint64 {
	if c := uint64(len(r.lines)); r.next > c {
		return r.next - c
	}
	return 0
}

// tailStart returns the number of the line from which the last n lines
// start; a negative n means every kept line.
func (r *logRing) tailStart(n int32) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	oldest := r.oldest()
	if n < 0 || uint64(n) >= r.next-oldest {
		return oldest
	}
	return r.next - uint64(n)
}

// since returns the kept lines numbered from onwards, the number to ask for
// next, how many lines from that position were already overwritten, and a
// channel closed on the next append.
func (r *logRing) since(from uint64) (lines []string, next, dropped uint64, changed <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if oldest := r.oldest(); from < oldest {
		dropped, from = oldest-from, oldest
	}
	for seq := from; seq < r.next; seq++ {
		lines = append(lines, r.lines[seq%uint64(len(r.lines))])
	}
	return lines, r.next, dropped, r.changed
}
