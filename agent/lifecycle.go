package agent

import (
	"context"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// The pace of a simulated reboot, shutdown or upgrade. talosctl's tracker
// (talosctl reboot, shutdown and upgrade, which wait by default) subscribes
// to events with tail 0 at the same time as it makes the call, so the first
// event waits simStartDelay for that subscription to land. After the
// stopAllServices task event the tracker drops its subscription, waits a
// second and subscribes again, with tail 0 again, to wait for the machine to
// be ready: simDowntime must leave room for that before the simulated boot
// reports RUNNING, or the tracker would wait for an event already sent.
const (
	simStartDelay = 250 * time.Millisecond
	simStep       = 100 * time.Millisecond
	simDowntime   = 2 * time.Second
)

// sequence describes a simulated lifecycle operation.
type sequence struct {
	name    string // as Talos names it in SequenceEvent
	stage   machine.MachineStatusEvent_MachineStage
	upgrade bool // starts with a simulated "upgrade" phase
	boots   bool // ends with a simulated boot, back to RUNNING and ready
}

var (
	seqReboot   = sequence{name: "reboot", stage: machine.MachineStatusEvent_REBOOTING, boots: true}
	seqShutdown = sequence{name: "shutdown", stage: machine.MachineStatusEvent_SHUTTING_DOWN}
	seqUpgrade  = sequence{name: "upgrade", stage: machine.MachineStatusEvent_UPGRADING, upgrade: true, boots: true}
)

// Reboot records the request and simulates a reboot: it replies at once, as
// Talos does, with a new actor ID, and then publishes the events of a
// reboot caused by that actor (see the package documentation). Nothing on
// the host is rebooted. While a simulated reboot, shutdown or upgrade is in
// progress, Reboot fails with FailedPrecondition and records nothing.
func (s *Server) Reboot(ctx context.Context, req *machine.RebootRequest) (_ *machine.RebootResponse, err error) {
	actor := newActorID()
	if err := s.beginSequence(seqReboot, actor); err != nil {
		return nil, err
	}
	s.mu.Lock()
	if len(s.reboots) == maxRecordedReboots {
		s.reboots = append(s.reboots[:0], s.reboots[1:]...)
	}
	s.reboots = append(s.reboots, proto.CloneOf(req))
	s.mu.Unlock()
	s.log.Info("reboot requested; simulating it: the example agent does not reboot the machine",
		"mode", req.GetMode().String(), "actor_id", actor)
	return &machine.RebootResponse{Messages: []*machine.Reboot{{ActorId: actor}}}, nil
}

// Reboots returns copies of the requests recorded by Reboot, oldest first
// (at most the latest 1,000).
func (s *Server) Reboots() []*machine.RebootRequest {
	s.mu.Lock()
	defer s.mu.Unlock()
	return cloneAll(s.reboots)
}

// Shutdown simulates a shutdown like Reboot simulates a reboot, except that
// the simulated machine stays down: its services stay Finished until they
// are started or the machine is rebooted. Nothing on the host is shut down.
func (s *Server) Shutdown(ctx context.Context, req *machine.ShutdownRequest) (_ *machine.ShutdownResponse, err error) {
	actor := newActorID()
	if err := s.beginSequence(seqShutdown, actor); err != nil {
		return nil, err
	}
	s.log.Info("shutdown requested; simulating it: the example agent does not shut the machine down",
		"force", req.GetForce(), "actor_id", actor)
	return &machine.ShutdownResponse{Messages: []*machine.Shutdown{{ActorId: actor}}}, nil
}

// Upgrade simulates an upgrade to req.image: a simulated "upgrade" phase,
// then a simulated reboot. No image is pulled or installed; the agent's
// version does not change.
func (s *Server) Upgrade(ctx context.Context, req *machine.UpgradeRequest) (_ *machine.UpgradeResponse, err error) {
	if req.GetImage() == "" {
		return nil, status.Error(codes.InvalidArgument, "image is required")
	}
	actor := newActorID()
	if err := s.beginSequence(seqUpgrade, actor); err != nil {
		return nil, err
	}
	s.log.Info("upgrade requested; simulating it: the example agent pulls and installs nothing",
		"image", req.GetImage(), "stage", req.GetStage(), "force", req.GetForce(),
		"reboot_mode", req.GetRebootMode().String(), "actor_id", actor)
	return &machine.UpgradeResponse{Messages: []*machine.Upgrade{{Ack: "Upgrade request received", ActorId: actor}}}, nil
}

// beginSequence starts simulating seq for actor unless the agent is closed
// or another simulation is in progress.
func (s *Server) beginSequence(seq sequence, actor string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closed:
		return status.Error(codes.Unavailable, "the example agent is shutting down")
	default:
	}
	if s.sequence != "" {
		return status.Errorf(codes.FailedPrecondition, "a simulated %s (actor %s) is in progress: try again when it has finished",
			s.sequence, s.sequenceActor)
	}
	s.sequence, s.sequenceActor = seq.name, actor
	s.sims.Add(1)
	go s.simulate(seq, actor)
	return nil
}

// simulate publishes, over about three seconds for a reboot or an upgrade
// and half a second for a shutdown, the events Talos publishes for seq, and
// moves the simulated services along. Close interrupts it between steps.
func (s *Server) simulate(seq sequence, actor string) {
	defer s.sims.Done()
	defer s.endSequence(actor) // if interrupted

	if !s.pause(simStartDelay) {
		return
	}
	s.publish(actor, &machine.SequenceEvent{Sequence: seq.name, Action: machine.SequenceEvent_START})
	s.publish(actor, machineStatus(seq.stage, false))
	if seq.upgrade {
		if !s.pause(simStep) {
			return
		}
		s.publish(actor, &machine.PhaseEvent{Phase: "upgrade", Action: machine.PhaseEvent_START})
		s.publish(actor, &machine.TaskEvent{Task: "upgrade", Action: machine.TaskEvent_START})
		s.publish(actor, &machine.TaskEvent{Task: "upgrade", Action: machine.TaskEvent_STOP})
		s.publish(actor, &machine.PhaseEvent{Phase: "upgrade", Action: machine.PhaseEvent_STOP})
	}

	if !s.pause(simStep) {
		return
	}
	stopped := time.Now()
	s.publish(actor, &machine.PhaseEvent{Phase: "stopEverything", Action: machine.PhaseEvent_START})
	s.publish(actor, &machine.TaskEvent{Task: "stopAllServices", Action: machine.TaskEvent_START})
	why := "Simulated stop (" + seq.name + "): no process to signal"
	if !s.pause(simStep) || !s.eachService(machine.ServiceStateEvent_RUNNING, machine.ServiceStateEvent_STOPPING, actor, why) {
		return
	}
	if !s.pause(simStep) || !s.eachService(machine.ServiceStateEvent_STOPPING, machine.ServiceStateEvent_FINISHED, actor, "Service finished (simulated)") {
		return
	}
	s.publish(actor, &machine.TaskEvent{Task: "stopAllServices", Action: machine.TaskEvent_STOP})
	if !seq.boots {
		// A client that saw the last event may start another operation.
		s.endSequence(actor)
		s.publish(actor, &machine.PhaseEvent{Phase: "stopEverything", Action: machine.PhaseEvent_STOP})
		s.log.Info("simulated shutdown done: services stopped; a real node would power off now, the example agent keeps serving",
			"actor_id", actor)
		return
	}
	s.publish(actor, &machine.PhaseEvent{Phase: "stopEverything", Action: machine.PhaseEvent_STOP})
	s.log.Info("simulated "+seq.name+": services stopped; the simulated node is down", "downtime", simDowntime, "actor_id", actor)

	if !s.pause(time.Until(stopped.Add(simDowntime))) {
		return
	}
	s.publish(actor, &machine.SequenceEvent{Sequence: "boot", Action: machine.SequenceEvent_START})
	s.applyStaged()
	s.publish(actor, machineStatus(machine.MachineStatusEvent_BOOTING, false,
		&machine.MachineStatusEvent_MachineStatus_UnmetCondition{Name: "services", Reason: "simulated services are starting"}))
	why = "Simulated start (boot after " + seq.name + "): nothing is executed"
	if !s.pause(simStep) || !s.eachService(-1, machine.ServiceStateEvent_PREPARING, actor, why) {
		return
	}
	if !s.pause(simStep) || !s.eachService(machine.ServiceStateEvent_PREPARING, machine.ServiceStateEvent_RUNNING, actor, "") {
		return
	}
	s.publish(actor, &machine.SequenceEvent{Sequence: "boot", Action: machine.SequenceEvent_STOP})
	s.endSequence(actor)
	s.publish(actor, machineStatus(machine.MachineStatusEvent_RUNNING, true))
	s.log.Info("simulated "+seq.name+" done: the simulated node is running and ready", "actor_id", actor)
}

// endSequence records that the simulation for actor is over, unless
// another has started since.
func (s *Server) endSequence(actor string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sequenceActor == actor {
		s.sequence, s.sequenceActor = "", ""
	}
}

// eachService moves every service in state from (any state if from < 0) to
// state to, with message msg; a move to Running also passes the health
// check. It reports false, changing nothing, once the agent is closed.
func (s *Server) eachService(from, to machine.ServiceStateEvent_Action, actor, msg string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.closed:
		return false
	default:
	}
	for _, svc := range s.services {
		if from >= 0 && svc.state != from {
			continue
		}
		if to == machine.ServiceStateEvent_RUNNING {
			s.runService(svc, actor)
			continue
		}
		s.setServiceState(svc, actor, to, msg)
	}
	return true
}

// pause waits for d and reports true, or reports false as soon as the
// agent is closed.
func (s *Server) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.closed:
		return false
	}
}

// machineStatus returns a MachineStatusEvent; talosctl needs its status set
// even when there is nothing to say.
func machineStatus(stage machine.MachineStatusEvent_MachineStage, ready bool,
	unmet ...*machine.MachineStatusEvent_MachineStatus_UnmetCondition,
) *machine.MachineStatusEvent {
	return &machine.MachineStatusEvent{
		Stage:  stage,
		Status: &machine.MachineStatusEvent_MachineStatus{Ready: ready, UnmetConditions: unmet},
	}
}
