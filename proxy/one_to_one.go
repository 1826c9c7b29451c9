package proxy

import (
	"context"
	"io"

	"google.golang.org/grpc"
	"google.golang.org/grpc/status"
)

// relayDesc lets one stream carry any method: the proxy does not need to
// know how many messages either side sends to relay them.
var relayDesc = &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}

// oneToOne relays frames both ways between the client and one backend, and
// hands the backend's header, trailer and status back untouched.
func (h *Handler) oneToOne(ss grpc.ServerStream, method string, b Backend, kind Kind) (err error) {
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
