// Package lifecycle is the demo node's simulated machine: its services
// (cri-sim, etcd-sim and kubelet-sim: ServiceList, ServiceStart, ServiceStop,
// ServiceRestart), its boot, reboots, shutdowns and upgrades (Reboot,
// Shutdown, Upgrade), and the event log that tells of them as Talos tells
// (Events).
//
// No process stands behind a service and the host is never rebooted: the
// package only changes its own state and publishes the events Talos
// publishes, with the actor ID of the call that caused them, so that
// talosctl's trackers finish. Reboot, Shutdown and Upgrade reply at once
// with a new actor ID and publish over a few seconds:
//
//   - SequenceEvent reboot, shutdown or upgrade START, and MachineStatusEvent
//     REBOOTING, SHUTTING_DOWN or UPGRADING;
//   - for Upgrade, an "upgrade" phase and task (no image is pulled);
//   - the "stopEverything" phase with the "stopAllServices" task, in which
//     the services go Stopping, then Finished;
//   - for Reboot and Upgrade, after two seconds of simulated downtime,
//     SequenceEvent boot, MachineStatusEvent BOOTING, the services Preparing,
//     then Running and healthy, and MachineStatusEvent RUNNING with ready
//     set. A simulated shutdown leaves the services Finished.
//
// One such operation runs at a time. It must not touch the host, nor know
// who observes its events (the resource API, through Config.Observe).
package lifecycle
