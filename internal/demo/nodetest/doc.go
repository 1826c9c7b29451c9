// Package nodetest serves demo nodes for the tests of the node's parts: on
// a fresh unix socket or TCP port, with the generated client or the
// official Talos client, stopped and closed when the test ends.
//
// It is for tests only: nothing that runs a node may import it.
package nodetest
