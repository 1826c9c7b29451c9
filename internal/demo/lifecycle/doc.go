// Package lifecycle is the demo node's simulated machine: its services
// (cri-sim, etcd-sim and kubelet-sim: ServiceList, ServiceStart, ServiceStop,
// ServiceRestart), its boot, reboots, shutdowns and upgrades (Reboot,
// Shutdown, Upgrade), and the event log that tells of them as Talos tells
// (Events), with the actor ID of the call that caused them, so that
// talosctl's trackers finish.
//
// No process stands behind a service and the host is never rebooted: it
// must not touch the host, nor know who observes its events (the resource
// API, through Config.Observe).
package lifecycle
