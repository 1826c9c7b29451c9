package proxy

import (
	"bytes"
	"context"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
)

// relayDesc lets one stream carry any method: the proxy does not need to
// know how many messages either side sends to relay them.
var relayDesc = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

// oneToOne relays frames both ways between the client and one backend, and
// hands the backend's header, trailer and status back untouched.
func (h *Handler) oneToOne(ss grpc.ServerStream, method string, b Backend, kind Kind) (err error) {
	if g, ok := b.(Gated); ok {
		if kind != Unary {
			// The budget judges one request and its reply: a method
			// declared as streaming is refused rather than let past it.
			return status.Errorf(codes.FailedPrecondition, "%s may take its node down, and is declared %s: the disruption budget holds unary calls only", method, kind)
		}
		return h.oneToOneGated(ss, method, g)
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	bctx, call := h.started(ctx, b, kind)
	defer func() {
		st := status.Convert(err)
		call.settle(st.Code(), st.Message())
	}()

	outCtx, conn, release, err := b.Connect(bctx, method)
	if err != nil {
		return backendStatus(err).Err()
	}
	if release != nil {
		defer func() {
			cancel() // the stream ends before its connection is given back
			release()
		}()
	}
	cs, err := conn.NewStream(outCtx, relayDesc, method, grpc.ForceCodecV2(h.codec))
	if err != nil {
		return backendStatus(err).Err()
	}

	if kind == Unary || kind == ServerStream {
		// The client sends one request and is done: relayed here, before
		// the replies, with no goroutine of its own.
		if err := h.relayRequests(ss, cs, true); err != nil {
			return err
		}
		err = h.relayReplies(cs, ss)
		ss.SetTrailer(cs.Trailer())
		return err
	}

	requests := make(chan error, 1)
	go func() {
		err := h.relayRequests(ss, cs, false)
		if err != nil {
			cancel() // the client is gone or sent something refused: stop the backend
		}
		requests <- err
	}()

	err = h.relayReplies(cs, ss)
	ss.SetTrailer(cs.Trailer())
	if err != nil && ctx.Err() != nil && ss.Context().Err() == nil {
		// The backend was cancelled because the client's side failed (for
		// example an oversized request): that failure is the one to report.
		if rerr := <-requests; rerr != nil {
			return rerr
		}
	}
	return err
}

// relayRequests copies the client's messages to the backend until the client
// half-closes, or, with one (a unary or server-streaming method), after the
// first, half-closing the backend's side itself. It returns nil when the
// client is done or the backend stopped listening (the backend's status
// then arrives through relayReplies); an error is the client's side
// failing (gone, or a message refused).
func (h *Handler) relayRequests(ss grpc.ServerStream, cs grpc.ClientStream, one bool) error {
	var f frame // one variable for the loop: the stream calls make it escape
	for {
		if err := ss.RecvMsg(&f); err != nil {
			if err == io.EOF {
				return cs.CloseSend()
			}
			return err
		}
		n := f.len()
		h.hold(n)
		err := cs.SendMsg(&f)
		f.release() // a no-op unless the send never reached the codec
		h.hold(-n)
		if err != nil {
			return nil // io.EOF or the stream broke: the status is read by relayReplies
		}
		if one {
			return cs.CloseSend()
		}
	}
}

// relayReplies copies the backend's header and messages to the client and
// returns the backend's status (nil for OK).
func (h *Handler) relayReplies(cs grpc.ClientStream, ss grpc.ServerStream) error {
	if md, err := cs.Header(); err == nil && len(md) > 0 {
		if err := ss.SendHeader(md); err != nil {
			return err
		}
	}
	var f frame
	for {
		if err := cs.RecvMsg(&f); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
		n := f.len()
		h.hold(n)
		err := ss.SendMsg(&f)
		f.release()
		h.hold(-n)
		if err != nil {
			return err
		}
	}
}

// oneToOneGated relays a unary call to a backend that may have to wait for
// its turn: the request is read first, for the gate to judge, and the
// reply is shown to it once relayed.
func (h *Handler) oneToOneGated(ss grpc.ServerStream, method string, g Gated) (err error) {
	req, err := readSingleRequest(ss, method)
	if err != nil {
		return err
	}
	defer req.release()
	n := req.len()
	h.hold(n)
	defer h.hold(-n)
	end, err := g.Await(ss.Context(), req.bytes())
	if err != nil {
		return backendStatus(err).Err()
	}
	var reply frame
	defer reply.release()
	var out Outcome // what the gate hears: the node's status, not the relay's
	if end != nil {
		defer func() { end(out) }()
	}
	ctx, cancel := context.WithCancel(ss.Context())
	defer cancel()
	bctx, call := h.started(ctx, g, Unary)
	defer func() {
		st := status.Convert(err)
		call.settle(st.Code(), st.Message())
	}()
	outCtx, conn, release, err := g.Connect(bctx, method)
	if err != nil {
		return backendStatus(err).Err()
	}
	if release != nil {
		defer func() {
			cancel()
			release()
		}()
	}
	var header, trailer metadata.MD
	sent := req.share()
	out.Sent = ss.Context().Err() == nil
	err = conn.Invoke(outCtx, method, sent, &reply,
		grpc.ForceCodecV2(h.codec), grpc.Header(&header), grpc.Trailer(&trailer))
	sent.release() // a no-op unless the send never reached the codec
	out.Code = status.Code(err)
	if len(header) > 0 {
		if herr := ss.SendHeader(header); herr != nil && err == nil {
			err = herr
		}
	}
	ss.SetTrailer(trailer)
	if err != nil {
		return backendStatus(err).Err()
	}
	if end != nil {
		// The send takes the reply's buffers; the gate reads a copy (the
		// replies of calls that are gated are a few bytes).
		out.Reply = bytes.Clone(reply.bytes())
	}
	return ss.SendMsg(&reply)
}
