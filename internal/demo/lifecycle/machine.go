package lifecycle

import (
	"crypto/rand"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/protobuf/proto"
)

// Config describes a simulated machine.
type Config struct {
	// Log is the node's log, which says what the machine only simulates.
	Log *slog.Logger
	// Beside are services that run beside the node (the demo's apid):
	// ServiceList shows them running, as a Talos node lists its apid, but
	// the machine does not manage them.
	Beside []string
	// Observe, if set, sees every event the machine publishes, as it is
	// published (the resource API follows the services and the machine's
	// stage through it).
	Observe func(proto.Message)
	// OnBoot, if set, runs as a simulated reboot's boot begins (a staged
	// machine configuration is applied then).
	OnBoot func()
	// Downtime is how long a simulated reboot, shutdown or upgrade keeps
	// the machine down: its API refuses calls (Down) and OnDown has taken
	// its etcd member away. Default DefaultDowntime; negative: none.
	Downtime time.Duration
	// OnDown and OnUp, if set, run as the machine goes down and as it
	// comes back, before its boot: the demo stops and restarts the node's
	// etcd member there, so that a reboot costs the cluster a member.
	OnDown, OnUp func()
}

// DefaultDowntime is how long a simulated reboot keeps a machine down.
const DefaultDowntime = 2 * time.Second

// Machine is the simulated machine: its services, its boot, reboots,
// shutdowns and upgrades, and the event log that tells of them. Create it
// with [New]; it is safe for concurrent use.
type Machine struct {
	log     *slog.Logger
	events  *eventLog
	beside  []string
	observe func(proto.Message)
	onBoot  func()
	started time.Time // when New made the machine

	downtime     time.Duration
	onDown, onUp func()
	down         atomic.Bool // the simulated machine is down: its API refuses calls

	mu            sync.Mutex
	reboots       []*machine.RebootRequest
	services      []*simService // sorted by ID
	sequence      string        // the simulated lifecycle operation in progress, if any
	sequenceActor string        // and its actor ID

	closed chan struct{}  // closed by Close
	sims   sync.WaitGroup // lifecycle simulations in progress

	// The simulated boot: its ID (as the kernel's boot_id) and time, new at
	// each simulated reboot, so that a client waiting for a reboot (talosctl
	// reboot, upgrade) sees one happen.
	bootID   string
	bootTime time.Time
}

// BootID is the simulated boot's ID, as /proc/sys/kernel/random/boot_id
// reads.
func (m *Machine) BootID() string {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bootID
}

// BootTime is when the simulated machine last booted.
func (m *Machine) BootTime() time.Time {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.bootTime
}

// newBoot starts a new simulated boot.
func (m *Machine) newBoot() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.bootID, m.bootTime = newBootID(), time.Now()
}

// newBootID is a random UUID, as the kernel makes one at each boot.
func newBootID() string {
	var b [16]byte
	_, _ = rand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40 // version 4
	b[8] = b[8]&0x3f | 0x80 // RFC 4122 variant
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}

// New returns a machine whose services have not started: Boot starts
// them.
func New(cfg Config) *Machine {
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	switch {
	case cfg.Downtime == 0:
		cfg.Downtime = DefaultDowntime
	case cfg.Downtime < 0:
		cfg.Downtime = 0
	}
	return &Machine{
		downtime: cfg.Downtime,
		onDown:   cfg.OnDown,
		onUp:     cfg.OnUp,
		log:      cfg.Log,
		events:   newEventLog(eventCapacity),
		beside:   cfg.Beside,
		observe:  cfg.Observe,
		onBoot:   cfg.OnBoot,
		started:  time.Now(),
		services: newSimServices(SimulatedServices),
		closed:   make(chan struct{}),
		bootID:   newBootID(),
		bootTime: time.Now(),
	}
}

// Down reports whether the simulated machine is down (between the end of
// a reboot's, shutdown's or upgrade's stopping and its next boot): a real
// node does not answer then, and the demo node refuses every call.
func (m *Machine) Down() bool { return m.down.Load() }

// Boot puts the machine in the state a booted Talos node is in, and
// publishes the events of that boot (with no actor): services running and
// healthy, the machine running and ready.
func (m *Machine) Boot() {
	m.publish("", machineStatus(machine.MachineStatusEvent_BOOTING, false))
	m.publish("", &machine.SequenceEvent{Sequence: "boot", Action: machine.SequenceEvent_START})
	m.publish("", &machine.PhaseEvent{Phase: "startEverything", Action: machine.PhaseEvent_START})
	m.mu.Lock()
	for _, svc := range m.services {
		task := "startService(" + svc.id + ")"
		m.publish("", &machine.TaskEvent{Task: task, Action: machine.TaskEvent_START})
		m.startService(svc, "", "agent start")
		m.publish("", &machine.TaskEvent{Task: task, Action: machine.TaskEvent_STOP})
	}
	m.mu.Unlock()
	// The services beside the node run already; saying so lets the
	// resource API list them as talosctl services does (talosctl get
	// services).
	for _, id := range m.beside {
		m.publish("", &machine.ServiceStateEvent{Service: id, Action: machine.ServiceStateEvent_RUNNING,
			Message: "Runs beside the example agent, which does not manage it", Health: &machine.ServiceHealth{Unknown: true}})
	}
	m.publish("", &machine.PhaseEvent{Phase: "startEverything", Action: machine.PhaseEvent_STOP})
	m.publish("", &machine.SequenceEvent{Sequence: "boot", Action: machine.SequenceEvent_STOP})
	m.publish("", machineStatus(machine.MachineStatusEvent_RUNNING, true))
}

// Close stops the machine's background work: a simulated reboot, shutdown
// or upgrade in progress stops where it is, and Events streams end with
// Unavailable. It waits for the simulation's goroutine and may be called
// more than once; lifecycle calls made afterwards fail with Unavailable.
func (m *Machine) Close() {
	m.mu.Lock()
	select {
	case <-m.closed:
	default:
		close(m.closed)
	}
	m.mu.Unlock()
	m.sims.Wait()
}
