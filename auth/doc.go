// Package auth owns who the caller is and what it may do. It resolves the
// caller once per call, from the verified client certificate and, only for
// a peer holding os:impersonator (another apid), from the roles and
// proxyfrom it forwarded; it checks the role policy; and it puts the caller
// in the call's context, where routing, logging and metrics read it.
//
// It knows nothing of nodes, backends or frames. Its interceptors run
// before the proxy, so a call is authorized once, before any node is
// contacted; the director refuses a call that reaches it unauthorized.
package auth
