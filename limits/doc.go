// Package limits bounds what callers can make apid hold: the bytes held
// for calls in flight (a process-wide budget that refuses new calls once
// spent) and the client connections open at once, in total and per client
// certificate identity.
//
// It owns the counting and the refusals, and nothing of routing, roles or
// frames: the proxy reports the bytes it holds through its Budget
// interface, which Memory implements, and the gateway wraps its listener
// and transport credentials with Connections.
package limits
