package lifecycle

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
)

// maxRecordedReboots bounds the history kept for Reboots.
const maxRecordedReboots = 1000

// Reboot, Shutdown and Upgrade reply at once with a new actor ID and then
// publish over a few seconds:
//
//   - SequenceEvent reboot, shutdown or upgrade START, and MachineStatusEvent
//     REBOOTING, SHUTTING_DOWN or UPGRADING;
//   - for Upgrade, an "upgrade" phase and task (no image is pulled);
//   - the "stopEverything" phase with the "stopAllServices" task, in which
//     the services go Stopping, then Finished;
//   - the machine is then down for its downtime (Config.Downtime, two
//     seconds by default): its API refuses every call, as a node that is
//     off does not answer, and its etcd member is stopped (OnDown);
//   - it comes back with a new boot ID and boot time (OnUp restarts the
//     etcd member), leaves clients a moment to reconnect, and boots:
//     SequenceEvent boot, MachineStatusEvent BOOTING, the services
//     Preparing, then Running and healthy, and MachineStatusEvent RUNNING
//     with ready set. A shutdown comes back too, as if someone powered the
//     machine on again.
//
// One such operation runs at a time.

// The pace of a simulated reboot, shutdown or upgrade. talosctl's tracker
// (talosctl reboot, shutdown and upgrade, which wait by default) subscribes
// to events with tail 0 at the same time as it makes the call, so the first
// event waits simStartDelay for that subscription to land. After the
// stopAllServices task event the tracker drops its subscription and
// subscribes again, with tail 0 again, retrying while the node does not
// answer, to wait for the machine to be ready: simReconnect leaves room for
// that between the API's return and the boot's events, or the tracker
// would wait for an event already sent.
const (
	simStartDelay = 250 * time.Millisecond
	simStep       = 100 * time.Millisecond
	simReconnect  = 1500 * time.Millisecond
)

// sequence describes a simulated lifecycle operation.
type sequence struct {
	name    string // as Talos names it in SequenceEvent
	stage   machine.MachineStatusEvent_MachineStage
	upgrade bool // starts with a simulated "upgrade" phase
}

var (
	seqReboot   = sequence{name: "reboot", stage: machine.MachineStatusEvent_REBOOTING}
	seqShutdown = sequence{name: "shutdown", stage: machine.MachineStatusEvent_SHUTTING_DOWN}
	seqUpgrade  = sequence{name: "upgrade", stage: machine.MachineStatusEvent_UPGRADING, upgrade: true}
)

// Reboot records the request and simulates a reboot: it replies at once, as
// Talos does, with a new actor ID, and then publishes the events of a
// reboot caused by that actor (see above). Nothing on
// the host is rebooted. While a simulated reboot, shutdown or upgrade is in
// progress, Reboot fails with FailedPrecondition and records nothing.
func (m *Machine) Reboot(ctx context.Context, req *machine.RebootRequest) (_ *machine.RebootResponse, err error) {
	actor := newActorID()
	if err := m.beginSequence(seqReboot, actor); err != nil {
		return nil, err
	}
	m.mu.Lock()
	if len(m.reboots) == maxRecordedReboots {
		m.reboots = append(m.reboots[:0], m.reboots[1:]...)
	}
	m.reboots = append(m.reboots, proto.CloneOf(req))
	m.mu.Unlock()
	m.log.Info("reboot requested; simulating it: the example agent does not reboot the machine",
		"mode", req.GetMode().String(), "actor_id", actor)
	return &machine.RebootResponse{Messages: []*machine.Reboot{{ActorId: actor}}}, nil
}

// Reboots returns copies of the requests recorded by Reboot, oldest first
// (at most the latest 1,000).
func (m *Machine) Reboots() []*machine.RebootRequest {
	m.mu.Lock()
	defer m.mu.Unlock()
	return cloneAll(m.reboots)
}

// Shutdown simulates a shutdown like Reboot simulates a reboot: the
// machine stops its services and is down for its downtime, then comes back
// as if powered on again. Nothing on the host is shut down.
func (m *Machine) Shutdown(ctx context.Context, req *machine.ShutdownRequest) (_ *machine.ShutdownResponse, err error) {
	actor := newActorID()
	if err := m.beginSequence(seqShutdown, actor); err != nil {
		return nil, err
	}
	m.log.Info("shutdown requested; simulating it: the example agent does not shut the machine down",
		"force", req.GetForce(), "actor_id", actor)
	return &machine.ShutdownResponse{Messages: []*machine.Shutdown{{ActorId: actor}}}, nil
}

// Upgrade simulates an upgrade to req.image: a simulated "upgrade" phase,
// then a simulated reboot. No image is pulled or installed; the agent's
// version does not change.
func (m *Machine) Upgrade(ctx context.Context, req *machine.UpgradeRequest) (_ *machine.UpgradeResponse, err error) {
	if req.GetImage() == "" {
		return nil, status.Error(codes.InvalidArgument, "image is required")
	}
	actor := newActorID()
	if err := m.beginSequence(seqUpgrade, actor); err != nil {
		return nil, err
	}
	m.log.Info("upgrade requested; simulating it: the example agent pulls and installs nothing",
		"image", req.GetImage(), "stage", req.GetStage(), "force", req.GetForce(),
		"reboot_mode", req.GetRebootMode().String(), "actor_id", actor)
	return &machine.UpgradeResponse{Messages: []*machine.Upgrade{{Ack: "Upgrade request received", ActorId: actor}}}, nil
}

// beginSequence starts simulating seq for actor unless the agent is closed
// or another simulation is in progress.
func (m *Machine) beginSequence(seq sequence, actor string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.closed:
		return status.Error(codes.Unavailable, "the example agent is shutting down")
	default:
	}
	if m.sequence != "" {
		return status.Errorf(codes.FailedPrecondition, "a simulated %s (actor %s) is in progress: try again when it has finished",
			m.sequence, m.sequenceActor)
	}
	m.sequence, m.sequenceActor = seq.name, actor
	m.sims.Add(1)
	go m.simulate(seq, actor)
	return nil
}

// simulate publishes, over about three seconds for a reboot or an upgrade
// and half a second for a shutdown, the events Talos publishes for seq, and
// moves the simulated services along. Close interrupts it between steps.
func (m *Machine) simulate(seq sequence, actor string) {
	defer m.sims.Done()
	defer m.endSequence(actor) // if interrupted

	if !m.pause(simStartDelay) {
		return
	}
	m.publish(actor, &machine.SequenceEvent{Sequence: seq.name, Action: machine.SequenceEvent_START})
	m.publish(actor, machineStatus(seq.stage, false))
	if seq.upgrade {
		if !m.pause(simStep) {
			return
		}
		m.publish(actor, &machine.PhaseEvent{Phase: "upgrade", Action: machine.PhaseEvent_START})
		m.publish(actor, &machine.TaskEvent{Task: "upgrade", Action: machine.TaskEvent_START})
		m.publish(actor, &machine.TaskEvent{Task: "upgrade", Action: machine.TaskEvent_STOP})
		m.publish(actor, &machine.PhaseEvent{Phase: "upgrade", Action: machine.PhaseEvent_STOP})
	}

	if !m.pause(simStep) {
		return
	}
	stopped := time.Now()
	m.publish(actor, &machine.PhaseEvent{Phase: "stopEverything", Action: machine.PhaseEvent_START})
	m.publish(actor, &machine.TaskEvent{Task: "stopAllServices", Action: machine.TaskEvent_START})
	why := "Simulated stop (" + seq.name + "): no process to signal"
	if !m.pause(simStep) || !m.eachService(machine.ServiceStateEvent_RUNNING, machine.ServiceStateEvent_STOPPING, actor, why) {
		return
	}
	if !m.pause(simStep) || !m.eachService(machine.ServiceStateEvent_STOPPING, machine.ServiceStateEvent_FINISHED, actor, "Service finished (simulated)") {
		return
	}
	m.publish(actor, &machine.TaskEvent{Task: "stopAllServices", Action: machine.TaskEvent_STOP})
	m.publish(actor, &machine.PhaseEvent{Phase: "stopEverything", Action: machine.PhaseEvent_STOP})
	m.log.Info("simulated "+seq.name+": services stopped; the simulated node is down, its API refuses calls", "downtime", m.downtime, "actor_id", actor)
	m.down.Store(true)
	if m.onDown != nil {
		m.onDown()
	}
	if !m.pause(time.Until(stopped.Add(m.downtime))) {
		m.down.Store(false)
		return
	}
	m.newBoot()
	if m.onUp != nil {
		m.onUp()
	}
	m.down.Store(false)
	m.log.Info("simulated "+seq.name+": the simulated node is up again, booting", "actor_id", actor)
	if !m.pause(simReconnect) {
		return
	}
	m.publish(actor, &machine.SequenceEvent{Sequence: "boot", Action: machine.SequenceEvent_START})
	if m.onBoot != nil {
		m.onBoot()
	}
	m.publish(actor, machineStatus(machine.MachineStatusEvent_BOOTING, false,
		&machine.MachineStatusEvent_MachineStatus_UnmetCondition{Name: "services", Reason: "simulated services are starting"}))
	why = "Simulated start (boot after " + seq.name + "): nothing is executed"
	if !m.pause(simStep) || !m.eachService(-1, machine.ServiceStateEvent_PREPARING, actor, why) {
		return
	}
	if !m.pause(simStep) || !m.eachService(machine.ServiceStateEvent_PREPARING, machine.ServiceStateEvent_RUNNING, actor, "") {
		return
	}
	m.publish(actor, &machine.SequenceEvent{Sequence: "boot", Action: machine.SequenceEvent_STOP})
	m.endSequence(actor)
	m.publish(actor, machineStatus(machine.MachineStatusEvent_RUNNING, true))
	m.log.Info("simulated "+seq.name+" done: the simulated node is running and ready", "actor_id", actor)
}

// endSequence records that the simulation for actor is over, unless
// another has started since.
func (m *Machine) endSequence(actor string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.sequenceActor == actor {
		m.sequence, m.sequenceActor = "", ""
	}
}

// eachService moves every service in state from (any state if from < 0) to
// state to, with message msg; a move to Running also passes the health
// check. It reports false, changing nothing, once the agent is closed.
func (m *Machine) eachService(from, to machine.ServiceStateEvent_Action, actor, msg string) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	select {
	case <-m.closed:
		return false
	default:
	}
	for _, svc := range m.services {
		if from >= 0 && svc.state != from {
			continue
		}
		if to == machine.ServiceStateEvent_RUNNING {
			m.runService(svc, actor)
			continue
		}
		m.setServiceState(svc, actor, to, msg)
	}
	return true
}

// pause waits for d and reports true, or reports false as soon as the
// agent is closed.
func (m *Machine) pause(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-m.closed:
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

// RebootToApply simulates the reboot that applies a machine configuration
// (ApplyConfiguration in reboot mode), caused by a new actor; it fails as
// Reboot does while another simulation is in progress.
func (m *Machine) RebootToApply() error {
	return m.beginSequence(seqReboot, newActorID())
}

// Rollback: nothing was installed, so there is nothing to roll back to.
func (*Machine) Rollback(context.Context, *machine.RollbackRequest) (*machine.RollbackResponse, error) {
	return nil, status.Error(codes.FailedPrecondition, "the simulated machine has no previous installation to roll back to")
}

// Reset would wipe the machine: not simulated.
func (*Machine) Reset(context.Context, *machine.ResetRequest) (*machine.ResetResponse, error) {
	return nil, status.Error(codes.Unimplemented, "the example agent does not simulate a reset: it would wipe the machine it runs on")
}

// newActorID returns a random version 4 UUID, the shape Talos uses for the
// actor IDs of lifecycle operations.
func newActorID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails on supported platforms.
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
