// Package gateway assembles one apid from a validated Config: the TLS
// material (certs), the caller's identity and the role policy (auth), the
// routing and the node pool (director), the proxy, the limits, metrics and
// certificate reload, and serves it.
//
// It is the only package that knows every other one; none of them imports
// it. Commands (cmd/apid) parse flags and call New and Serve; tests start a
// whole gateway in-process the same way.
package gateway
