// Package aggregate rewrites gRPC reply messages as raw protobuf wire bytes so
// that a client can tell which node each part of an answer came from: it
// stamps replies with the node's name, encodes per-node error entries, and
// merges the unary replies of several nodes into one.
//
// It owns only the wire layout of Talos replies (every entry or streamed
// message carries common.Metadata as field 1). It must not decode into
// generated types, re-encode what it does not change, or import any gRPC
// client or server code; moving frames between connections is the proxy's job.
//
// Host names and error texts land in proto3 string fields, so any invalid
// UTF-8 in them is written as U+FFFD rather than breaking the client's decode.
package aggregate
