// Package caller reads what apid forwards about the caller of a call to the
// node: the roles it holds (the talos-role metadata). The node trusts its
// socket's peer as machined trusts apid, and a call without forwarded roles
// comes from that peer itself.
//
// It reads metadata only: it must not authenticate anyone, nor import the
// gateway's packages.
package caller
