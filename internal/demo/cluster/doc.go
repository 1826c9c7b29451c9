// Package cluster runs the demo cluster (apid demo): on this machine, N
// nodes, each a demo node on a unix socket and an apid on its own loopback
// address, the first three a control plane that runs one real etcd cluster
// and holds the CA, with their certificates, machine configurations and a
// talosconfig written to a directory. Run starts it and serves until its
// context ends, so that a test can start it in-process.
//
// It assembles what other packages make (gateway, node, pki); it must not
// hold gateway logic or node behaviour of its own, nor parse flags.
package cluster
