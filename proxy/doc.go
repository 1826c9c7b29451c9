// Package proxy is the gRPC handler that moves raw frames between a client
// and the backends a Director picks: one-to-one (every frame, header and
// trailer relayed untouched) or one-to-many (one request sent to every
// backend, unary replies merged in backend order, streamed replies
// interleaved as they arrive, each stamped with its backend's name).
//
// The package knows nothing of node names, metadata keys or certificates:
// where a call goes is the Director's business, how the frames move is this
// package's. Reply bytes are only touched through the aggregate package.
package proxy
