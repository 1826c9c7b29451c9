// Package director is apid's routing. For every call package auth has
// authorized, it reads the routing metadata (node, nodes) and the caller
// auth put in the context, picks the backends — the local node agent or
// the apid of other nodes — and builds, from an allowlist, the metadata
// each next hop receives.
//
// It owns the pool of connections to other nodes. It does not decide who
// may call what (package auth does), move frames (package proxy does) nor
// touch reply bytes (package aggregate does).
package director
