package lifecycle

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/apid/apid/internal/demo/logs"
)

// SimulatedServices are the IDs of the services the agent pretends to run.
// They are simulated: no process stands behind them, and starting or
// stopping one only changes its state and publishes the events Talos would.
// The "-sim" suffix keeps them from being taken for real Talos services.
var SimulatedServices = []string{"cri-sim", "etcd-sim", "kubelet-sim"}

// maxServiceHistory bounds each service's event history, as Talos does.
const maxServiceHistory = 64

// serviceLogLines bounds each simulated service's log.
const serviceLogLines = 256

// simService is the state of one simulated service; Machine.mu guards it.
type simService struct {
	id      string
	log     logs.Lines // what its simulated runner did, served by Logs
	state   machine.ServiceStateEvent_Action
	health  *machine.ServiceHealth
	history []*machine.ServiceEvent // oldest first
}

func newSimServices(ids []string) []*simService {
	out := make([]*simService, len(ids))
	for i, id := range ids {
		out[i] = &simService{id: id, log: logs.NewLines(serviceLogLines), state: machine.ServiceStateEvent_INITIALIZED, health: unknownHealth(time.Now())}
	}
	return out
}

// ServiceLogs are the simulated services' logs, in the order of
// SimulatedServices.
func (m *Machine) ServiceLogs() []logs.Source {
	out := make([]logs.Source, len(m.services))
	for i, svc := range m.services {
		out[i] = logs.Source{ID: svc.id, Lines: svc.log}
	}
	return out
}

// ServiceList reports the simulated services, sorted by ID, with their state,
// health and latest events, and the services that run beside the node
// (Config.Beside) as running, their health unknown.
func (m *Machine) ServiceList(ctx context.Context, _ *emptypb.Empty) (_ *machine.ServiceListResponse, err error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	list := &machine.ServiceList{}
	for _, id := range m.beside {
		list.Services = append(list.Services, &machine.ServiceInfo{
			Id:    id,
			State: stateName(machine.ServiceStateEvent_RUNNING),
			Events: &machine.ServiceEvents{Events: []*machine.ServiceEvent{{
				Msg: "Runs beside the example agent, which does not manage it", State: stateName(machine.ServiceStateEvent_RUNNING), Ts: timestamppb.New(m.started),
			}}},
			Health: &machine.ServiceHealth{Unknown: true},
		})
	}
	for _, svc := range m.services {
		list.Services = append(list.Services, &machine.ServiceInfo{
			Id:     svc.id,
			State:  stateName(svc.state),
			Events: &machine.ServiceEvents{Events: cloneAll(svc.history)},
			Health: proto.CloneOf(svc.health),
		})
	}
	slices.SortFunc(list.Services, func(a, b *machine.ServiceInfo) int { return strings.Compare(a.GetId(), b.GetId()) })
	return &machine.ServiceListResponse{Messages: []*machine.ServiceList{list}}, nil
}

// ServiceStart starts a simulated service (Preparing, Running, then a
// successful health check); starting a running service changes nothing.
func (m *Machine) ServiceStart(ctx context.Context, req *machine.ServiceStartRequest) (_ *machine.ServiceStartResponse, err error) {
	resp, err := m.changeService(req.GetId(), "start")
	if err != nil {
		return nil, err
	}
	return &machine.ServiceStartResponse{Messages: []*machine.ServiceStart{{Resp: resp}}}, nil
}

// ServiceStop stops a simulated service (Stopping, then Finished); stopping
// a stopped service changes nothing.
func (m *Machine) ServiceStop(ctx context.Context, req *machine.ServiceStopRequest) (_ *machine.ServiceStopResponse, err error) {
	resp, err := m.changeService(req.GetId(), "stop")
	if err != nil {
		return nil, err
	}
	return &machine.ServiceStopResponse{Messages: []*machine.ServiceStop{{Resp: resp}}}, nil
}

// ServiceRestart stops a running simulated service and starts it again; as
// in Talos, restarting a stopped service starts it.
func (m *Machine) ServiceRestart(ctx context.Context, req *machine.ServiceRestartRequest) (_ *machine.ServiceRestartResponse, err error) {
	resp, err := m.changeService(req.GetId(), "restart")
	if err != nil {
		return nil, err
	}
	return &machine.ServiceRestartResponse{Messages: []*machine.ServiceRestart{{Resp: resp}}}, nil
}

// changeService applies action ("start", "stop" or "restart") to the
// service id and returns the reply text. The state changes happen at once,
// while m.mu is held, so that their events are published in order and
// ServiceList never shows a half-done change.
func (m *Machine) changeService(id, action string) (string, error) {
	if id == "" {
		return "", status.Error(codes.InvalidArgument, "service id is required")
	}
	if slices.Contains(m.beside, id) {
		return "", status.Errorf(codes.FailedPrecondition, "cannot %s service %q: it runs beside the example agent, which manages only %s",
			action, id, strings.Join(SimulatedServices, ", "))
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	svc := m.service(id)
	if svc == nil {
		return "", status.Errorf(codes.NotFound, "service %q not found: the example agent simulates only %s",
			id, strings.Join(SimulatedServices, ", "))
	}
	if m.sequence != "" {
		return "", status.Errorf(codes.FailedPrecondition, "cannot %s service %q: a simulated %s (actor %s) is in progress",
			action, id, m.sequence, m.sequenceActor)
	}
	actor := newActorID()
	running := svc.state == machine.ServiceStateEvent_RUNNING
	var resp string
	switch {
	case action == "start" && running:
		return fmt.Sprintf("Service %q is already running", id), nil
	case action == "stop" && !running:
		return fmt.Sprintf("Service %q is already stopped", id), nil
	case action == "start":
		m.startService(svc, actor, "requested through the API")
		resp = fmt.Sprintf("Service %q started", id)
	case action == "stop":
		m.stopService(svc, actor, "requested through the API")
		resp = fmt.Sprintf("Service %q stopped", id)
	default: // restart
		if running {
			m.stopService(svc, actor, "restart requested through the API")
		}
		m.startService(svc, actor, "restart requested through the API")
		resp = fmt.Sprintf("Service %q restarted", id)
	}
	m.log.Info("simulated service "+action, "service", id, "actor_id", actor)
	return resp, nil
}

// service returns the simulated service id, or nil; m.mu must be held.
func (m *Machine) service(id string) *simService {
	i := slices.IndexFunc(m.services, func(svc *simService) bool { return svc.id == id })
	if i < 0 {
		return nil
	}
	return m.services[i]
}

// startService walks svc through Preparing and Running to a successful
// health check; m.mu must be held.
func (m *Machine) startService(svc *simService, actor, why string) {
	m.setServiceState(svc, actor, machine.ServiceStateEvent_PREPARING, "Simulated start ("+why+"): nothing is executed")
	m.runService(svc, actor)
}

// runService moves svc to Running and passes its health check; m.mu must be
// held.
func (m *Machine) runService(svc *simService, actor string) {
	m.setServiceState(svc, actor, machine.ServiceStateEvent_RUNNING, "Simulated service running (no process)")
	now := time.Now()
	svc.health = &machine.ServiceHealth{Healthy: true, LastChange: timestamppb.New(now)}
	m.recordServiceEvent(svc, actor, "Health check successful (simulated)", now)
}

// stopService walks svc through Stopping to Finished; m.mu must be held.
func (m *Machine) stopService(svc *simService, actor, why string) {
	m.setServiceState(svc, actor, machine.ServiceStateEvent_STOPPING, "Simulated stop ("+why+"): no process to signal")
	m.setServiceState(svc, actor, machine.ServiceStateEvent_FINISHED, "Service finished (simulated)")
}

// setServiceState moves svc to state, records msg in its history and
// publishes a ServiceStateEvent; m.mu must be held. Health is only known
// while a service runs, so any other state makes it unknown.
func (m *Machine) setServiceState(svc *simService, actor string, state machine.ServiceStateEvent_Action, msg string) {
	now := time.Now()
	svc.state = state
	if state != machine.ServiceStateEvent_RUNNING && !svc.health.GetUnknown() {
		svc.health = unknownHealth(now)
	}
	m.recordServiceEvent(svc, actor, msg, now)
}

// recordServiceEvent appends msg, in svc's current state and health, to its
// history and publishes it; m.mu must be held.
func (m *Machine) recordServiceEvent(svc *simService, actor, msg string, at time.Time) {
	if len(svc.history) == maxServiceHistory {
		svc.history = slices.Delete(svc.history, 0, 1)
	}
	svc.history = append(svc.history, &machine.ServiceEvent{Msg: msg, State: stateName(svc.state), Ts: timestamppb.New(at)})
	fmt.Fprintf(svc.log, "%s [talos] service[%s](%s): %s\n", at.UTC().Format(time.RFC3339Nano), svc.id, stateName(svc.state), msg)
	m.publish(actor, &machine.ServiceStateEvent{
		Service: svc.id,
		Action:  svc.state,
		Message: msg,
		Health:  proto.CloneOf(svc.health),
	})
}

func unknownHealth(at time.Time) *machine.ServiceHealth {
	return &machine.ServiceHealth{Unknown: true, LastChange: timestamppb.New(at)}
}

// stateName spells a state as Talos does in ServiceInfo: "Running", not
// "RUNNING".
func stateName(state machine.ServiceStateEvent_Action) string {
	name := state.String()
	return name[:1] + strings.ToLower(name[1:])
}

func cloneAll[M proto.Message](msgs []M) []M {
	out := make([]M, len(msgs))
	for i, m := range msgs {
		out[i] = proto.CloneOf(m)
	}
	return out
}
