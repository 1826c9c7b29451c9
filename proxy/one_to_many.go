package proxy

import (
	"context"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/semaphore"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/aggregate"
)

var serverStreamDesc = &grpc.StreamDesc{ServerStreams: true}

// oneToMany sends the client's single request to every backend and combines
// their replies. A backend that fails is reported as an entry of the reply,
// never as the call's own status.
func (h *Handler) oneToMany(ss grpc.ServerStream, method string, route Route) error {
	switch route.Kind {
	case Unary, ServerStream:
	default:
		return status.Errorf(codes.InvalidArgument,
			"%s is %s: a call to several nodes must send exactly one request; address one node instead", method, route.Kind)
	}
	if route.Kind != Unary && anyGated(route.Backends) {
		return status.Errorf(codes.FailedPrecondition, "%s may take its nodes down, and is declared %s: the disruption budget holds unary calls only", method, route.Kind)
	}
	req, err := readSingleRequest(ss, method)
	if err != nil {
		return err
	}
	// The request is held once for all backends, whatever their number.
	n := req.len()
	h.hold(n)
	defer func() {
		req.release()
		h.hold(-n)
	}()
	if route.Kind == Unary {
		return h.fanOutUnary(ss, method, route, req)
	}
	return h.fanOutStream(ss, method, route.Backends, req)
}

// readSingleRequest reads the one request message of a unary or
// server-streaming call and checks the client sent no second one. The
// caller releases the frame.
func readSingleRequest(ss grpc.ServerStream, method string) (*frame, error) {
	req := new(frame)
	if err := ss.RecvMsg(req); err != nil {
		if err == io.EOF {
			return nil, status.Errorf(codes.InvalidArgument, "%s: no request message", method)
		}
		return nil, err
	}
	var extra frame
	switch err := ss.RecvMsg(&extra); err {
	case io.EOF:
		return req, nil
	case nil:
		extra.release()
		req.release()
		return nil, status.Errorf(codes.InvalidArgument,
			"%s: a call to several nodes takes exactly one request message", method)
	default:
		req.release()
		return nil, err
	}
}

// replyMD collects the header and trailer metadata of several backends
// without losing any value.
type replyMD struct {
	mu      sync.Mutex
	allow   func(key string) bool // nil: every key
	header  metadata.MD
	trailer metadata.MD
	sent    bool // header already sent to the client: later headers go to the trailer
}

func (r *replyMD) addHeader(md metadata.MD) {
	if len(md) == 0 {
		return
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.sent {
		r.trailer = appendMD(r.trailer, md, r.allow)
		return
	}
	r.header = appendMD(r.header, md, r.allow)
}

func (r *replyMD) addTrailer(md metadata.MD) {
	if len(md) == 0 {
		return
	}
	r.mu.Lock()
	r.trailer = appendMD(r.trailer, md, r.allow)
	r.mu.Unlock()
}

// appendMD adds src's values of the keys allow allows (nil: all) to dst in
// place (metadata.Join would copy everything gathered so far for every
// backend: quadratic in fan-out).
func appendMD(dst, src metadata.MD, allow func(string) bool) metadata.MD {
	for k, v := range src {
		if allow != nil && !allow(k) {
			continue
		}
		if dst == nil {
			dst = make(metadata.MD, len(src))
		}
		dst[k] = append(dst[k], v...)
	}
	return dst
}

// takeHeader returns the headers gathered so far; any arriving later are
// delivered in the trailer.
func (r *replyMD) takeHeader() metadata.MD {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.sent = true
	return r.header
}

// takeTrailer returns the trailers, plus the headers if they were never
// sent (a stream that ended before its first message).
func (r *replyMD) takeTrailer() metadata.MD {
	r.mu.Lock()
	defer r.mu.Unlock()
	if !r.sent {
		r.sent = true
		r.trailer = appendMD(r.trailer, r.header, nil) // filtered on the way in
	}
	return r.trailer
}

// fanOutUnary calls every backend and replies with one message holding all
// their entries, in the order of the backends.
func (h *Handler) fanOutUnary(ss grpc.ServerStream, method string, route Route, req *frame) error {
	backends := route.Backends
	ctx, cancel := h.nodeContext(ss.Context(), route.NodeTimeout)
	defer cancel()
	parts := make([]aggregate.Part, len(backends))
	calls := make([]*backendCall, len(backends))
	replies := make([]frame, len(backends))
	md := replyMD{allow: h.opts.ReplyKey}
	var held atomic.Int64 // reply bytes kept for the merge so far

	if anyGated(backends) {
		h.callGated(ss, method, route, req, parts, calls, replies, &md, &held)
	} else {
		var wg sync.WaitGroup
		for i, b := range backends {
			wg.Add(1)
			h.workers.run(func() {
				defer wg.Done()
				bctx, call := h.started(ctx, b, Unary)
				calls[i] = call
				parts[i] = h.callUnary(bctx, method, b, req, &replies[i], &md, &held)
				call.end()
			})
		}
		wg.Wait()
	}

	// The merged parts say each node's outcome as the client sees it (a
	// malformed reply is Internal, one left out of an oversized merge
	// ResourceExhausted): that is what the observer hears.
	reply, merged := aggregate.MergeWithin(parts, h.opts.MaxReplySize)
	for i := range replies {
		replies[i].release()
	}
	for i, p := range merged {
		calls[i].settle(p.Code, p.Message)
	}
	h.hold(len(reply) - int(held.Load()))
	defer h.hold(-len(reply))
	if hdr := md.takeHeader(); len(hdr) > 0 {
		if err := ss.SendHeader(hdr); err != nil {
			return err
		}
	}
	ss.SetTrailer(md.takeTrailer())
	return ss.SendMsg(&frame{raw: reply})
}

// callGated calls every backend of a unary fan-out some of whose backends
// wait for their turn first (Gated): each waits on the call's own time, and
// its node deadline starts when its part does.
func (h *Handler) callGated(ss grpc.ServerStream, method string, route Route, req *frame,
	parts []aggregate.Part, calls []*backendCall, replies []frame, md *replyMD, held *atomic.Int64) {
	request := req.bytes() // what the gates judge: read once, before the workers share it
	var wg sync.WaitGroup
	for i, b := range route.Backends {
		wg.Add(1)
		h.workers.run(func() {
			defer wg.Done()
			var end func(Outcome)
			if g, ok := b.(Gated); ok {
				var err error
				if end, err = g.Await(ss.Context(), request); err != nil {
					calls[i] = &backendCall{backend: b, start: time.Now(), observed: func(codes.Code, string, time.Duration) {}}
					st := backendStatus(err)
					parts[i] = aggregate.Part{Host: b.Name(), Code: st.Code(), Message: st.Message()}
					return
				}
			}
			ctx, cancel := h.nodeContext(ss.Context(), route.NodeTimeout)
			defer cancel()
			bctx, call := h.started(ctx, b, Unary)
			calls[i] = call
			var sent bool
			parts[i] = h.callUnaryFrom(bctx, method, b, req, &replies[i], md, held, &sent)
			call.end()
			if end != nil {
				end(Outcome{Sent: sent, Code: parts[i].Code, Reply: parts[i].Body})
			}
		})
	}
	wg.Wait()
}

// anyGated reports whether some backend may wait for its turn: then each
// backend's deadline starts when its part does.
func anyGated(backends []Backend) bool {
	for _, b := range backends {
		if _, ok := b.(Gated); ok {
			return true
		}
	}
	return false
}

// nodeContext bounds the nodes' part of a unary fan-out: by the route's
// per-node timeout, if any, and always a margin before the
// call's own deadline, so that the partial reply still reaches the client
// in time instead of the whole call failing with DeadlineExceeded.
func (h *Handler) nodeContext(ctx context.Context, timeout time.Duration) (context.Context, context.CancelFunc) {
	now := time.Now()
	var deadline time.Time
	if timeout > 0 {
		deadline = now.Add(timeout)
	}
	if dl, ok := ctx.Deadline(); ok {
		cut := dl.Add(-replyMargin(dl.Sub(now)))
		if deadline.IsZero() || cut.Before(deadline) {
			deadline = cut
		}
	}
	if deadline.IsZero() {
		return context.WithCancel(ctx)
	}
	return context.WithDeadline(ctx, deadline)
}

// replyMargin is the time kept back from a call's deadline to merge and
// send the reply: 5 % of what is left, between 10 ms and 500 ms.
func replyMargin(left time.Duration) time.Duration {
	return min(max(left/20, 10*time.Millisecond), 500*time.Millisecond)
}

// callUnary makes one backend's call and describes its outcome as a Part.
// The reply's bytes stay in reply until the caller has merged them.
//
// Replies are held until every backend answered; with MaxReplySize set, a
// reply arriving once twice that many bytes are held is dropped at once (an
// error entry) instead of held, so one call cannot hoard memory for a merge
// that could never be sent (the reference was OOM-killed this way).
func (h *Handler) callUnary(ctx context.Context, method string, b Backend, req *frame, reply *frame, md *replyMD, held *atomic.Int64) aggregate.Part {
	return h.callUnaryFrom(ctx, method, b, req, reply, md, held, nil)
}

// callUnaryFrom is callUnary telling, through sent when not nil, whether
// the call went past Connect.
func (h *Handler) callUnaryFrom(ctx context.Context, method string, b Backend, req *frame, reply *frame, md *replyMD, held *atomic.Int64, sent *bool) aggregate.Part {
	part := aggregate.Part{Host: b.Name()}
	outCtx, conn, release, err := b.Connect(ctx, method)
	if err == nil && sent != nil {
		*sent = ctx.Err() == nil
	}
	if err == nil {
		var header, trailer metadata.MD
		sent := req.share()
		err = conn.Invoke(outCtx, method, sent, reply,
			grpc.ForceCodecV2(h.codec), grpc.Header(&header), grpc.Trailer(&trailer))
		sent.release() // a no-op unless the send never reached the codec
		if release != nil {
			release()
		}
		md.addHeader(header)
		md.addTrailer(trailer)
	}
	if err != nil {
		st := backendStatus(err)
		part.Code, part.Message = st.Code(), st.Message()
		return part
	}
	part.Body = reply.bytes()
	n := held.Add(int64(len(part.Body)))
	if limit := int64(h.opts.MaxReplySize); limit > 0 && n > 2*limit {
		held.Add(-int64(len(part.Body)))
		reply.release()
		return aggregate.Part{Host: part.Host, Code: codes.ResourceExhausted, Message: fmt.Sprintf(
			"reply of %d bytes left out: the replies already held exceed what a merged reply may carry (%d bytes); ask this node alone",
			len(part.Body), limit)}
	}
	h.hold(len(part.Body))
	return part
}

// fanOutStream streams every backend's messages to the client as they come,
// each stamped with its backend's name. What is held between them is
// bounded twice: each backend may have at most NodeBuffer bytes queued, and
// the queue at most StreamBuffer messages. When the client reads slower
// than the backends write, the backends wait, their streams' receive
// windows fill, and HTTP/2 flow control pauses the nodes, rather than
// memory growing.
func (h *Handler) fanOutStream(ss grpc.ServerStream, method string, backends []Backend, req *frame) error {
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()

	out := make(chan queued, h.opts.StreamBuffer)
	md := replyMD{allow: h.opts.ReplyKey}
	var wg sync.WaitGroup
	for _, b := range backends {
		wg.Add(1)
		h.workers.run(func() {
			defer wg.Done()
			h.streamFrom(ctx, method, b, req, out, &md)
		})
	}
	go func() {
		wg.Wait()
		close(out)
	}()

	var sendErr error
	headerSent := false
	var q queued // one variable for the loop: SendMsg's argument escapes
	for q = range out {
		if sendErr != nil {
			h.done(&q) // drain so every backend goroutine can finish
			continue
		}
		if !headerSent {
			headerSent = true
			if hdr := md.takeHeader(); len(hdr) > 0 {
				if sendErr = ss.SendHeader(hdr); sendErr != nil {
					h.done(&q)
					cancel()
					continue
				}
			}
		}
		sendErr = ss.SendMsg(&q.f)
		h.done(&q)
		if sendErr != nil {
			cancel()
		}
	}
	if sendErr != nil {
		return sendErr
	}
	ss.SetTrailer(md.takeTrailer())
	return nil
}

// queued is one stamped message waiting for the client, with what it
// holds of its backend's buffer.
type queued struct {
	f      frame
	buffer *semaphore.Weighted // its backend's NodeBuffer
	weight int64               // what it holds of it
	size   int                 // what it holds of the Budget
}

// done releases what q holds once it was sent or dropped.
func (h *Handler) done(q *queued) {
	q.f.release() // a no-op unless the send never reached the codec
	q.buffer.Release(q.weight)
	h.hold(-q.size)
}

// streamFrom relays one backend's stream into out. Its failure, at any
// point, becomes one error message in the stream.
func (h *Handler) streamFrom(ctx context.Context, method string, b Backend, req *frame, out chan<- queued, md *replyMD) {
	name := b.Name()
	code, message := codes.OK, ""
	ctx, call := h.started(ctx, b, ServerStream)
	defer func() {
		if code == codes.OK && ctx.Err() != nil {
			// The client went away (or could not be written to) before
			// this node's stream was delivered: it saw Canceled.
			code = codes.Canceled
		}
		call.settle(code, message)
	}()
	buffer := semaphore.NewWeighted(int64(h.opts.NodeBuffer))
	emit := func(f frame) bool {
		size := f.len()
		q := queued{f: f, buffer: buffer, weight: min(int64(size), int64(h.opts.NodeBuffer)), size: size}
		if err := buffer.Acquire(ctx, q.weight); err != nil {
			f.release()
			return false
		}
		h.hold(size)
		select {
		case out <- q:
			return true
		case <-ctx.Done():
			h.done(&q)
			return false
		}
	}
	fail := func(err error) {
		if ctx.Err() != nil {
			return // the client is gone: nobody to tell
		}
		st := backendStatus(err)
		code, message = st.Code(), st.Message()
		emit(frame{raw: aggregate.AppendErrorMessage(nil, name, st.Code(), st.Message())})
	}

	streamCtx, cancel := context.WithCancel(ctx)
	defer cancel()
	outCtx, conn, release, err := b.Connect(streamCtx, method)
	if err != nil {
		fail(err)
		return
	}
	if release != nil {
		defer func() {
			cancel() // the stream ends before its connection is given back
			release()
		}()
	}
	cs, err := conn.NewStream(outCtx, serverStreamDesc, method, grpc.ForceCodecV2(h.codec))
	if err != nil {
		fail(err)
		return
	}
	sent := req.share()
	err = cs.SendMsg(sent)
	sent.release() // a no-op unless the send never reached the codec
	if err != nil && err != io.EOF {
		fail(err)
		return
	}
	if err := cs.CloseSend(); err != nil {
		fail(err)
		return
	}
	if hdr, err := cs.Header(); err == nil {
		md.addHeader(hdr)
	}
	stamp := mem.SliceBuffer(aggregate.Stamp(name))
	var segs [][]byte // reused to check each message in place
	var f frame       // one variable for the loop: RecvMsg's argument escapes
	for {
		err := cs.RecvMsg(&f)
		if err == io.EOF {
			md.addTrailer(cs.Trailer())
			return
		}
		if err != nil {
			md.addTrailer(cs.Trailer())
			fail(err)
			return
		}
		if segs, err = stampFrame(&f, stamp, segs); err != nil {
			f.release()
			fail(status.Errorf(codes.Internal, "malformed reply: %v", err))
			return
		}
		if !emit(f) {
			return
		}
		f = frame{} // its buffers went with the queued copy
	}
}

// stampFrame checks that f, as received, is a message the stamp can be
// appended to, and appends it: the stamp becomes one more buffer of the
// frame, so the message itself is never copied. segs is scratch space for
// the check, returned for reuse.
func stampFrame(f *frame, stamp mem.Buffer, segs [][]byte) ([][]byte, error) {
	segs = segs[:0]
	for _, b := range f.data {
		segs = append(segs, b.ReadOnlyData())
	}
	if f.data == nil && f.raw != nil {
		segs = append(segs, f.raw)
	}
	if err := aggregate.CheckMessage(segs...); err != nil {
		return segs, err
	}
	if f.data == nil && f.raw != nil {
		f.data, f.raw = mem.BufferSlice{mem.SliceBuffer(f.raw)}, nil
	}
	// Clip: the slice gRPC handed over is not ours to append to in place.
	f.data = append(slices.Clip(f.data), stamp)
	return segs, nil
}
