// Package node assembles the demo node: a gRPC server that speaks a
// wire-compatible subset of the Talos API, so that apid has a real backend
// to front in the demo and in end-to-end tests. Each part serves its own
// methods, and this package only wires them together:
//
//   - identity: Version, Hostname;
//   - monitoring: Memory, LoadAvg, SystemStat, CPUInfo, CPUFreqStats,
//     NetworkDeviceStats, DiskStats, Mounts, Processes, Netstat, from this
//     machine's /proc and /sys;
//   - logs: Logs, Dmesg;
//   - files: Read, List, DiskUsage, Copy, confined to the read roots;
//   - lifecycle: the simulated services and lifecycle (ServiceList,
//     ServiceStart/Stop/Restart, Reboot, Shutdown, Upgrade) and Events;
//   - etcd: the etcd calls, against a real member on a control-plane node;
//   - machineconfig: ApplyConfiguration;
//   - clientconfig: GenerateClientConfiguration;
//   - containers: Containers, Stats, images (ImageService, LifecycleService);
//   - resources: the resource API (cosi.resource.State, InspectService);
//   - clock: time.TimeService.
//
// It uses the generated Talos machinery types, so service and method names
// and field numbers match Talos and the official Talos client decodes its
// replies; every other method answers Unimplemented, or says why it is not
// simulated. The node changes nothing on the host, and its replies carry no
// common.Metadata because stamping is apid's job.
//
// Serve it with [New], [Listen] and [Server.Serve] (see the example), and
// Close it when the server has stopped.
//
// It must not hold what a part does: a method added here rather than in
// its part is in the wrong place.
package node
