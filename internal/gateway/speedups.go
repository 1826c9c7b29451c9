package gateway

import (
	"sync/atomic"

	"google.golang.org/grpc"
)

// The measured speed-ups of apid's hot path, each behind a name. Each one
// is kept because a benchmark showed it, named beside it; each makes the
// code less obvious, so each must keep earning its place:
//
//   - stackPad (here): a unary call's goroutine stack grown while shallow.
//     BenchmarkGatewayOneToOne (bench/gateway_test.go): stack growth was
//     8-13 % of a one-to-one call's CPU, 5-6 % with it.
//   - idleConnectionBuffers (here): no second read buffer per client
//     connection. bench/idle_test.go (BenchmarkIdleStreams) and the idle
//     connection figures of BENCHMARKS.md: 62.7 KiB per idle connection
//     before, 39.7 KiB after.
//   - shutdownConns (lifecycle.go): one shutdown registration per client
//     connection, not per call: 2 % of a one-to-one call's CPU, on a lock
//     every call shared (BenchmarkGatewayOneToOne).
//   - callMetrics (callmetrics.go): the standard gRPC server series looked
//     up once per method, not per call: 4 % of a one-to-one call's CPU
//     (BenchmarkGatewayOneToOne; TestCallMetricsMatchTheProvider holds the
//     series equal to go-grpc-middleware's).
//   - the proxy's worker goroutines (proxy/workers.go): fan-out parts run
//     on goroutines whose stacks have grown already: about 5 % of a
//     100-node fan-out's CPU (BenchmarkGatewayFanOut).
//   - the certificate facts cache (auth/caller.go): a peer certificate's
//     subject and roles read once per connection, not per call: 31 fewer
//     allocations per call pair (BenchmarkGatewayOneToOne).

// idleConnectionBuffers lets the HTTP/2 framer read straight from the TLS
// connection, which buffers its records itself, without a second 32 KiB
// buffer per client connection (grpc-go already shares write buffers).
var idleConnectionBuffers = grpc.ReadBufferSize(0)

// stackPadSink keeps stackPad's frame from being optimized away.
var stackPadSink atomic.Uint32

// stackPad grows a unary call's goroutine stack to what a proxied call
// needs while the stack is still shallow. gRPC starts each call on a new
// goroutine with a small stack, which the call then outgrew twice, deep
// in routing and in the node stream's set-up, where each copy walks every
// frame; grown here, the copy is a few frames, once. Streams keep the
// small start: a long-lived stream would hold the bigger stack for its
// whole life. Its frame of 20 KiB grows the stack to 32 KiB.
//
//go:noinline
func stackPad() {
	var pad [20 << 10]byte
	i := stackPadSink.Load() % uint32(len(pad))
	pad[i] = 1
	if pad[(i+1)%uint32(len(pad))] != 0 {
		stackPadSink.Add(1)
	}
}
