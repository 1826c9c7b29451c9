package lifecycle_test

import (
	"context"
	"io"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/internal/demo/identity"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

// lifecycleEvents describes the events of a simulated lifecycle operation.
func lifecycleEvents(sequence, stage string, upgrade, boots bool) []string {
	out := []string{"sequence " + sequence + " START", "machine " + stage + " ready=false"}
	if upgrade {
		out = append(out, "phase upgrade START", "task upgrade START", "task upgrade STOP", "phase upgrade STOP")
	}
	out = append(out, "phase stopEverything START", "task stopAllServices START")
	out = append(out, servicesMoving("STOPPING", "FINISHED")...)
	out = append(out, "task stopAllServices STOP", "phase stopEverything STOP")
	if boots {
		out = append(out, "sequence boot START", "machine BOOTING ready=false")
		out = append(out, servicesMoving("PREPARING")...)
		out = append(out, servicesRunning()...)
		out = append(out, "sequence boot STOP", "machine RUNNING ready=true")
	}
	return out
}

// expectLifecycle reads the events want describes from w, checks that they
// are actor's and returns when each was received.
func expectLifecycle(t *testing.T, w <-chan talosclient.EventResult, actor string, want []string) []time.Time {
	t.Helper()
	evs := make([]talosclient.Event, len(want))
	at := make([]time.Time, len(want))
	for i := range want {
		evs[i] = nextEvent(t, w)
		at[i] = time.Now()
	}
	if got := describeAll(evs); !slices.Equal(got, want) {
		t.Fatalf("events:\n got %q\nwant %q", got, want)
	}
	for _, ev := range evs {
		if ev.ActorID != actor {
			t.Fatalf("event %s has actor %q, want %q", describe(ev), ev.ActorID, actor)
		}
	}
	checkEventIDs(t, evs)
	return at
}

func isMachineReady(ev talosclient.Event) bool {
	p, ok := ev.Payload.(*machine.MachineStatusEvent)
	return ok && p.GetStage() == machine.MachineStatusEvent_RUNNING && p.GetStatus().GetReady()
}

func TestRebootSimulation(t *testing.T) {
	t.Parallel()
	c, srv := nodetest.OfficialClient(t, node.Config{})
	ctx := testkit.Context(t)
	w := watchEvents(t, c)

	began := time.Now()
	resp, err := c.RebootWithResponse(ctx, talosclient.WithPowerCycle)
	if err != nil {
		t.Fatal(err)
	}
	actor := resp.GetMessages()[0].GetActorId()
	if actor == "" {
		t.Fatal("no actor ID")
	}
	// One simulation at a time, and services are left to it.
	_, err = c.ShutdownWithResponse(ctx)
	nodetest.WantCode(t, err, codes.FailedPrecondition)
	_, err = c.ServiceStop(ctx, "cri-sim")
	nodetest.WantCode(t, err, codes.FailedPrecondition)

	want := lifecycleEvents("reboot", "REBOOTING", false, true)
	at := expectLifecycle(t, w, actor, want)
	took := time.Since(began)
	t.Logf("simulated reboot took %v", took)
	if took > 5*time.Second {
		t.Errorf("simulated reboot took %v, want a few seconds", took)
	}
	// talosctl subscribes again a second after it sees stopAllServices and
	// must not miss the ready event.
	stopAll := slices.Index(want, "task stopAllServices START")
	if gap := at[len(at)-1].Sub(at[stopAll]); gap < 1500*time.Millisecond {
		t.Errorf("ready came %v after stopAllServices; talosctl would miss it", gap)
	}

	if got := srv.Reboots(); len(got) != 1 || got[0].GetMode() != machine.RebootRequest_POWERCYCLE {
		t.Errorf("Reboots() = %v", got)
	}
	for id, st := range serviceStates(t, c) {
		if st != "Running OK" {
			t.Errorf("after the reboot %s is %q", id, st)
		}
	}
	filtered := watchEvents(t, c, talosclient.WithTailEvents(-1), talosclient.WithActorID(actor))
	expectLifecycle(t, filtered, actor, want)

	// The simulation is over once its last event is out. This one is
	// interrupted by the test's cleanup.
	if err := c.Reboot(ctx); err != nil {
		t.Errorf("reboot after the first: %v", err)
	}
}

// TestRebootTrackedLikeTalosctl follows the events the way talosctl reboot
// does (cmd/talosctl/pkg/talos/action): it reads the boot ID, subscribes
// with tail 0, calls Reboot, drops the subscription when it sees its actor's
// stopAllServices task, subscribes again with tail 0 a second later and
// waits for the machine to be running and ready. talosctl subscribes in a
// goroutine of its own, so its subscription may also land after the reply:
// a second watcher, started then, must still see the whole sequence.
func TestRebootTrackedLikeTalosctl(t *testing.T) {
	t.Parallel()
	c, _ := nodetest.OfficialClient(t, node.Config{})
	ctx := testkit.Context(t)

	before := bootID(t, c)

	w := watchEvents(t, c)
	resp, err := c.RebootWithResponse(ctx)
	if err != nil {
		t.Fatal(err)
	}
	actor := resp.GetMessages()[0].GetActorId()
	late := watchEvents(t, c)
	if ev := nextEvent(t, late); describe(ev) != "sequence reboot START" || ev.ActorID != actor {
		t.Errorf("a subscription made after the reply first got %s from %q", describe(ev), ev.ActorID)
	}

	for {
		ev := nextEvent(t, w)
		if isMachineReady(ev) {
			t.Fatal("ready before stopAllServices")
		}
		if task, ok := ev.Payload.(*machine.TaskEvent); ok && task.GetTask() == "stopAllServices" && ev.ActorID == actor {
			break
		}
	}
	time.Sleep(time.Second) // go-retry's default interval
	// The node is down now: talosctl retries its subscription until the
	// node answers again.
	if _, err := c.Version(ctx); status.Code(err) != codes.Unavailable {
		t.Errorf("a call while the simulated node is down: %v, want Unavailable", err)
	}
	w = watchUntilUp(t, c)
	for !isMachineReady(nextEvent(t, w)) {
	}
	// talosctl's post-check: the boot ID changed.
	if after := bootID(t, c); after == before {
		t.Errorf("boot ID %q unchanged by the reboot", after)
	}
}

// bootID reads the kernel's boot ID as talosctl does.
func bootID(t *testing.T, c *talosclient.Client) string {
	t.Helper()
	r, err := c.Read(testkit.Context(t), "/proc/sys/kernel/random/boot_id")
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	if err != nil || len(b) != 37 {
		t.Fatalf("boot ID %q: %v", b, err)
	}
	return string(b)
}

// TestShutdownSimulation: a shutdown stops the services, keeps the node
// down (refusing calls) for its downtime, and brings it back as if powered
// on again, with a new boot.
func TestShutdownSimulation(t *testing.T) {
	t.Parallel()
	c, _ := nodetest.OfficialClient(t, node.Config{})
	ctx := testkit.Context(t)
	before := bootID(t, c)
	w := watchEvents(t, c)
	resp, err := c.ShutdownWithResponse(ctx, talosclient.WithShutdownForce(true))
	if err != nil {
		t.Fatal(err)
	}
	actor := resp.GetMessages()[0].GetActorId()
	expectLifecycle(t, w, actor, lifecycleEvents("shutdown", "SHUTTING_DOWN", false, false))
	if !testkit.Eventually(2*time.Second, func() bool { _, err := c.Version(ctx); return status.Code(err) == codes.Unavailable }) {
		t.Error("the shut-down node still answers")
	}
	expectLifecycle(t, w, actor, lifecycleEvents("shutdown", "SHUTTING_DOWN", false, true)[len(lifecycleEvents("shutdown", "SHUTTING_DOWN", false, false)):])
	for id, st := range serviceStates(t, c) {
		if st != "Running OK" && st != "Running ?" {
			t.Errorf("after the node came back %s is %q, want Running", id, st)
		}
	}
	if after := bootID(t, c); after == before {
		t.Errorf("boot ID %q unchanged by the shutdown and power-on", after)
	}
}

func TestUpgradeSimulation(t *testing.T) {
	t.Parallel()
	c, _ := nodetest.OfficialClient(t, node.Config{})
	ctx := testkit.Context(t)
	//lint:ignore SA1019 released talosctl (v1.11, v1.13) upgrades through this call
	_, err := c.UpgradeWithOptions(ctx)
	nodetest.WantCode(t, err, codes.InvalidArgument)

	w := watchEvents(t, c)
	//lint:ignore SA1019 released talosctl (v1.11, v1.13) upgrades through this call
	resp, err := c.UpgradeWithOptions(ctx, talosclient.WithUpgradeImage("ghcr.io/siderolabs/installer:v1.11.5"))
	if err != nil {
		t.Fatal(err)
	}
	m := resp.GetMessages()[0]
	if m.GetAck() != "Upgrade request received" || m.GetActorId() == "" {
		t.Fatalf("reply %v", m)
	}
	expectLifecycle(t, w, m.GetActorId(), lifecycleEvents("upgrade", "UPGRADING", true, true))

	v, err := c.Version(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if tag := v.GetMessages()[0].GetVersion().GetTag(); tag != identity.VersionTag {
		t.Errorf("after a simulated upgrade the tag is %q, want it unchanged", tag)
	}
}

func TestCloseEndsSimulation(t *testing.T) {
	c, _, srv := nodetest.Start(t, node.Config{}, "unix")
	ctx := testkit.Context(t)
	events, err := c.Events(ctx, &machine.EventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := events.Recv(); err != nil { // hello
		t.Fatal(err)
	}
	if _, err := c.Reboot(ctx, &machine.RebootRequest{}); err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	srv.Close()
	if took := time.Since(began); took > time.Second {
		t.Errorf("Close took %v", took)
	}
	_, err = c.Reboot(ctx, &machine.RebootRequest{})
	nodetest.WantCode(t, err, codes.Unavailable)
	for {
		if _, err = events.Recv(); err != nil {
			break
		}
	}
	nodetest.WantCode(t, err, codes.Unavailable)
}

// TestLifecycleCallsAreLogged checks that the agent's log says that it only
// simulates.
func TestLifecycleCallsAreLogged(t *testing.T) {
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	ctx, cancel := context.WithCancel(testkit.Context(t))
	defer cancel()
	if _, err := c.Shutdown(ctx, &machine.ShutdownRequest{}); err != nil {
		t.Fatal(err)
	}
	stream, err := c.Logs(ctx, &machine.LogsRequest{Id: "agent", TailLines: -1})
	if err != nil {
		t.Fatal(err)
	}
	lines, err := nodetest.RecvAll(stream)
	if err != nil {
		t.Fatal(err)
	}
	var found bool
	for _, l := range lines {
		found = found || strings.Contains(string(l), "shutdown requested; simulating it")
	}
	if !found {
		t.Errorf("log does not say the shutdown is simulated:\n%s", lines)
	}
}

func TestReboot(t *testing.T) {
	c, _, srv := nodetest.Start(t, node.Config{}, "unix")
	resp, err := c.Reboot(testkit.Context(t), &machine.RebootRequest{Mode: machine.RebootRequest_POWERCYCLE})
	if err != nil {
		t.Fatal(err)
	}
	uuid := regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$`)
	if id := resp.GetMessages()[0].GetActorId(); !uuid.MatchString(id) {
		t.Errorf("actor id %q is not a UUID", id)
	}
	got := srv.Reboots()
	if len(got) != 1 || got[0].GetMode() != machine.RebootRequest_POWERCYCLE {
		t.Fatalf("Reboots() = %v", got)
	}
	got[0].Mode = machine.RebootRequest_FORCE
	if srv.Reboots()[0].GetMode() != machine.RebootRequest_POWERCYCLE {
		t.Error("Reboots() exposes the recorded requests instead of copies")
	}
}
