package proxy

import (
	"context"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// Kind says how many messages each side of a method sends. The proxy cannot
// tell from the wire, so the Director, which knows the API, says.
type Kind uint8

// The kinds of gRPC methods.
const (
	Unary        Kind = iota // one request, one reply
	ServerStream             // one request, a stream of replies
	ClientStream             // a stream of requests, one reply
	BidiStream               // streams both ways
)

// String returns the kind's name as gRPC documentation writes it.
func (k Kind) String() string {
	switch k {
	case Unary:
		return "unary"
	case ServerStream:
		return "server-streaming"
	case ClientStream:
		return "client-streaming"
	case BidiStream:
		return "bidi-streaming"
	}
	return "unknown"
}

// Mode says how a call is spread over its backends.
type Mode uint8

// The modes of a route.
const (
	// OneToOne relays every frame between the client and one backend,
	// untouched.
	OneToOne Mode = iota
	// OneToMany sends the request to every backend and stamps and
	// combines their replies.
	OneToMany
)

// String returns the mode's name as apid's call log writes it.
func (m Mode) String() string {
	if m == OneToMany {
		return "fan-out"
	}
	return "one-to-one"
}

// Backend is one destination of a proxied call.
type Backend interface {
	// Name labels this backend's entries in one-to-many replies.
	Name() string
	// Connect returns the connection to send the call to and the context to
	// send it with; the context carries the outgoing metadata and must be
	// derived from ctx. When release is not nil the proxy calls it exactly
	// once, when this backend's part of the call no longer uses the
	// connection (after its last message and status, not merely when ctx
	// ends), so a Backend may lend a pooled connection for the call.
	Connect(ctx context.Context, fullMethod string) (outCtx context.Context, conn grpc.ClientConnInterface, release func(), err error)
}

// Keyed is implemented by a Backend that observers should know by a key
// other than its Name: the same destination reached under several names
// (an address and the name it is listed under) is one for statistics.
type Keyed interface {
	Key() string
}

// KeyOf is how statistics know backend b: by its Key if it is Keyed and
// named, else by its Name (empty for an unnamed one).
func KeyOf(b Backend) string {
	name := b.Name()
	if k, ok := b.(Keyed); ok && name != "" {
		return k.Key()
	}
	return name
}

// Route is where one call goes.
type Route struct {
	// Backends receive the call; a one-to-one route has exactly one.
	Backends []Backend
	// Mode selects one-to-one (exactly one backend) or fan-out, where the
	// replies are stamped with the backends' names and combined.
	Mode Mode
	// Kind is the method's shape; one-to-many needs it to merge unary
	// replies and interleave streamed ones.
	Kind Kind
	// NodeTimeout, when positive, bounds each backend's part of this
	// one-to-many unary call: a backend that misses it becomes an error
	// entry with DeadlineExceeded while the others' replies are returned.
	NodeTimeout time.Duration
}

// Director decides where each call goes. An error it returns is sent to the
// client as is, so it should be a gRPC status.
type Director interface {
	Route(ctx context.Context, fullMethod string) (Route, error)
}

// Gated is a Backend whose part of a call may have to wait for its turn
// before anything is sent to it (a disruption budget holding a reboot).
// The proxy calls Await with the call's own context, before the backend's
// part starts: the wait counts toward the caller's deadline, never toward
// NodeTimeout, and not in the backend's latency.
type Gated interface {
	Backend
	// Await returns when the call may go to the backend, or an error (a
	// gRPC status) and the call is not sent to it. request is the call's
	// one request message (only unary methods are gated). end, if not
	// nil, is called once, when the backend's part has ended, with how.
	Await(ctx context.Context, request []byte) (end func(Outcome), err error)
}

// Outcome is how a gated backend's part of a call ended.
type Outcome struct {
	// Sent: the call reached the backend's connection (it may have acted
	// on it); false when it was refused before (no connection, a share
	// refused, the caller gone).
	Sent bool
	// Code is the backend's status.
	Code codes.Code
	// Reply is the backend's reply message, valid only during the call.
	Reply []byte
}
