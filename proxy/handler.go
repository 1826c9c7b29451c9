package proxy

import (
	"context"
	"errors"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/status"
)

// Options tunes a Handler. The zero value is usable; each field documents
// its default.
type Options struct {
	// StreamBuffer is how many stamped messages a one-to-many stream holds
	// between the backends and the client before the fastest backends are
	// paused. Default 64.
	StreamBuffer int
	// NodeBuffer is how many bytes of one backend's messages a one-to-many
	// stream holds for a client that reads slower than the backends write;
	// past it that backend waits (and HTTP/2 flow control pauses it). A
	// message larger than NodeBuffer is held alone. Default 64 KiB.
	NodeBuffer int
	// MaxReplySize bounds a merged one-to-many unary reply; set it to what
	// clients accept (the Talos API's 32 MiB). When the merge would be
	// larger, the largest nodes' entries are replaced by ResourceExhausted
	// error entries until it fits. Zero: no bound.
	MaxReplySize int
	// Observer, if set, learns where each call goes and how each backend's
	// part of it ended (for logs, metrics and traces).
	Observer Observer
	// Budget, if set, is told every byte the proxy holds for calls in
	// flight and may refuse new calls.
	Budget Budget
	// ReplyKey, if set, says which header and trailer keys of the
	// backends' replies reach the client of a one-to-many call (a node
	// could otherwise set any key, as often as it likes, in every
	// client's reply). One-to-one replies pass untouched.
	ReplyKey func(key string) bool
}

// Budget accounts for the bytes the proxy holds on behalf of calls in
// flight: messages being relayed, a request kept for several backends,
// replies kept for a merge, messages queued for a slow client. (What the
// transport buffers is bounded by its flow-control windows instead.) It
// must be safe for concurrent use and quick.
type Budget interface {
	// Admit is asked before a call contacts any backend; a non-nil error
	// (a gRPC status) refuses the call.
	Admit() error
	// Hold adds n bytes to what is held; a negative n releases them.
	Hold(n int64)
}

// Observer follows calls: their route, and each backend's part of them.
// It must be safe for concurrent use and quick.
type Observer interface {
	// Routed is told the route of a call, before any backend is contacted.
	// ctx is the call's.
	Routed(ctx context.Context, method string, r Route)
	// BackendStarted is told that the call reaches backend now. The context it returns is the one the backend is called with
	// (derived from ctx: a span may start there); the function is called
	// once, when that backend's part is settled, with the code and message
	// the client saw for it and how long the backend took (a unary fan-out
	// settles every part after the slowest, but times each on its own).
	BackendStarted(ctx context.Context, backend Backend, kind Kind) (context.Context, func(codes.Code, string, time.Duration))
}

// Reporter is a Backend that wants to hear how its part of a call ended
// (the director ejects nodes that keep failing).
type Reporter interface {
	Report(code codes.Code, message string)
}

// backendCall is one backend's part of a call, as the observer and the
// backend (if a Reporter) hear of it.
type backendCall struct {
	backend  Backend
	start    time.Time
	ended    time.Time // when the backend was done; zero: when settled
	observed func(codes.Code, string, time.Duration)
}

// started tells the observer, if any, that b is called now.
func (h *Handler) started(ctx context.Context, b Backend, kind Kind) (context.Context, *backendCall) {
	c := &backendCall{backend: b, start: time.Now(), observed: func(codes.Code, string, time.Duration) {}}
	if h.opts.Observer != nil {
		ctx, c.observed = h.opts.Observer.BackendStarted(ctx, b, kind)
	}
	return ctx, c
}

// end marks the backend done before its part is settled.
func (c *backendCall) end() { c.ended = time.Now() }

// settle tells the backend, if it is a Reporter, and the observer how the
// part ended. It is called once.
func (c *backendCall) settle(code codes.Code, msg string) {
	if r, ok := c.backend.(Reporter); ok {
		r.Report(code, msg)
	}
	end := c.ended
	if end.IsZero() {
		end = time.Now()
	}
	c.observed(code, msg, end.Sub(c.start))
}

func (o Options) withDefaults() Options {
	if o.StreamBuffer <= 0 {
		o.StreamBuffer = 64
	}
	if o.NodeBuffer <= 0 {
		o.NodeBuffer = 64 << 10
	}
	return o
}

// Handler proxies every call it is given to the backends its Director picks.
type Handler struct {
	director Director
	opts     Options
	codec    encoding.CodecV2
	workers  *workers
}

// NewHandler returns a Handler that routes with d.
func NewHandler(d Director, opts Options) *Handler {
	return &Handler{director: d, opts: opts.withDefaults(), codec: Codec(), workers: newWorkers()}
}

// StreamHandler returns the handler to install with grpc.UnknownServiceHandler
// on a server created with grpc.ForceServerCodecV2(Codec()).
func (h *Handler) StreamHandler() grpc.StreamHandler { return h.handle }

func (h *Handler) handle(_ any, ss grpc.ServerStream) error {
	method, ok := grpc.MethodFromServerStream(ss)
	if !ok {
		return status.Error(codes.Internal, "proxy: no method on the server stream")
	}
	route, err := h.director.Route(ss.Context(), method)
	if err != nil {
		return err
	}
	if h.opts.Observer != nil {
		h.opts.Observer.Routed(ss.Context(), method, route)
	}
	if h.opts.Budget != nil {
		if err := h.opts.Budget.Admit(); err != nil {
			return err
		}
	}
	switch {
	case len(route.Backends) == 0:
		return status.Errorf(codes.Unavailable, "no backend for %s", method)
	case route.Mode == OneToOne && len(route.Backends) != 1:
		return status.Errorf(codes.Internal, "one-to-one route for %s has %d backends", method, len(route.Backends))
	case route.Mode == OneToOne:
		return h.oneToOne(ss, method, route.Backends[0], route.Kind)
	}
	return h.oneToMany(ss, method, route)
}

// hold tells the budget, if any, that n more bytes are held (n < 0: fewer).
func (h *Handler) hold(n int) {
	if h.opts.Budget != nil && n != 0 {
		h.opts.Budget.Hold(int64(n))
	}
}

// backendStatus turns an error met while reaching a backend into a status:
// gRPC statuses keep their code, context errors get theirs, anything else is
// Unavailable (the backend could not be used).
func backendStatus(err error) *status.Status {
	if st, ok := status.FromError(err); ok {
		return st
	}
	switch {
	case errors.Is(err, context.DeadlineExceeded):
		return status.New(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.New(codes.Canceled, err.Error())
	}
	return status.New(codes.Unavailable, err.Error())
}
