// Package clientconfig serves GenerateClientConfiguration (talosctl config
// new) as a Talos control-plane node does: a client certificate with the
// roles asked for, signed by the node's client CA, in a talosconfig that
// reaches the cluster through its gateways.
//
// It checks what is asked (built-in roles only, never os:impersonator; none
// the caller lacks unless it is os:admin; a validity within the CA's);
// who may call it is apid's policy, which it must not replace.
package clientconfig
