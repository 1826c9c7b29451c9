// Package agent is a small example node agent: a gRPC server that speaks a
// wire-compatible subset of the Talos machine.MachineService (Version,
// Hostname, Memory, Reboot, Dmesg, Logs, Read and EtcdRecover) so that apid
// has a real backend to front in the demo and in end-to-end tests.
//
// It uses the generated Talos machinery types, so service and method names and
// field numbers match Talos and the official Talos client decodes its replies;
// every other MachineService method answers Unimplemented. The agent changes
// nothing on the host: Reboot is only recorded, Read is confined to configured
// roots, and replies carry no common.Metadata because stamping is apid's job.
//
// Serve it with [New], [Server.Register] and [Listen]:
//
//	lis, err := agent.Listen("unix:///run/apid-agent.sock")
//	...
//	g := grpc.NewServer()
//	agent.New(agent.Config{}).Register(g)
//	err = g.Serve(lis)
package agent
