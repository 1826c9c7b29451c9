// Package resources is the demo node's resource API (cosi.resource.State,
// what talosctl get reads), on the public COSI runtime's in-memory state
// with Talos's resource types: the cluster's members, the node's hostname,
// addresses, version and machine identity, its services and machine status
// (kept true by Reflect as the machine changes them), and the machine
// configuration. The machine type and the cluster's identity are kept by
// controllers in the COSI controller runtime, as in Talos, whose graph
// InspectService serves.
//
// Writes through the API are refused, and a sensitive type is os:admin's
// alone, as Talos refuses them; the package must not change what the
// resources describe, only follow it.
package resources
