// Package agent is a small example node agent: a gRPC server that speaks a
// wire-compatible subset of the Talos API — machine.MachineService (Version,
// Hostname, Memory, LoadAvg, SystemStat, CPUInfo, NetworkDeviceStats,
// DiskStats, Mounts, Processes, Netstat, Containers, Stats, Dmesg, Logs,
// Events, Read, List, DiskUsage, Copy, ServiceList, ServiceStart, ServiceStop,
// ServiceRestart, Reboot, Shutdown, Upgrade, GenerateClientConfiguration and
// EtcdRecover) and time.TimeService (Time and TimeCheck) — so that apid has a
// real backend to front in the demo and in end-to-end tests. Monitoring
// methods read this machine's /proc; Read, List, DiskUsage and Copy are
// confined to the configured read roots.
//
// It uses the generated Talos machinery types, so service and method names and
// field numbers match Talos and the official Talos client decodes its replies;
// every other method answers Unimplemented. The agent changes nothing on the
// host: its services, reboots, shutdowns and upgrades are simulated, Read is
// confined to configured roots, and replies carry no common.Metadata because
// stamping is apid's job.
//
// # Simulation
//
// The agent's services ([SimulatedServices]: cri-sim, etcd-sim and
// kubelet-sim) are simulated: no process stands behind them, and
// ServiceStart, ServiceStop and ServiceRestart only change their state. Every
// change is published to the agent's event log (served by Events) as Talos
// publishes it, with the actor ID of the call that caused it.
//
// Reboot, Shutdown and Upgrade reply at once with a new actor ID, log that
// they only simulate, and then publish over a few seconds the events Talos
// publishes for the operation, so that talosctl reboot, shutdown and upgrade,
// which wait for those events by default, finish:
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
// One such operation runs at a time. As the host does not reboot, its boot
// ID never changes, so Read refuses /proc/sys/kernel/random/boot_id with
// PermissionDenied, which talosctl takes to mean that it cannot compare boot
// IDs (instead of waiting half an hour for a change). Time and TimeCheck
// report the local clock: the agent has no NTP client.
//
// Serve it with [New], [Server.ServerOptions] (its call log),
// [Server.Register] and [Listen]:
//
//	lis, err := agent.Listen("unix:///run/apid-agent.sock")
//	...
//	a := agent.New(agent.Config{})
//	g := grpc.NewServer(a.ServerOptions()...)
//	a.Register(g)
//	err = g.Serve(lis)
//	...
//	g.Stop()
//	a.Close() // ends a simulation in progress and the controllers
package agent
