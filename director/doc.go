// Package director is apid's routing policy. For every call it reads the
// caller's identity and the routing metadata (node, nodes, proxyfrom),
// picks the backends — the local node agent or the apid of other nodes —
// and builds, from an allowlist, the metadata each next hop receives.
//
// It owns the pool of connections to other nodes. It does not move frames
// (package proxy does) nor touch reply bytes (package aggregate does).
package director
