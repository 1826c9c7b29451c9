package lifecycle_test

import (
	"context"
	"fmt"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/internal/demo/lifecycle"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

// watchEvents subscribes as talosctl does. EventsWatchV2 returns once the
// agent has sent its hello event, so the subscription's start point is
// fixed when it returns. The watch ends with the test.
func watchEvents(t *testing.T, c *talosclient.Client, opts ...talosclient.EventsOptionFunc) <-chan talosclient.EventResult {
	t.Helper()
	ctx, cancel := context.WithCancel(testkit.Context(t))
	t.Cleanup(cancel)
	ch := make(chan talosclient.EventResult)
	if err := c.EventsWatchV2(ctx, ch, opts...); err != nil {
		t.Fatal(err)
	}
	return ch
}

// watchUntilUp subscribes as watchEvents does, retrying while the node is
// down, as talosctl's tracker does (go-retry, a second apart; here
// faster), for at most ten seconds.
func watchUntilUp(t *testing.T, c *talosclient.Client) <-chan talosclient.EventResult {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		ctx, cancel := context.WithCancel(testkit.Context(t))
		ch := make(chan talosclient.EventResult)
		err := c.EventsWatchV2(ctx, ch)
		if err == nil {
			t.Cleanup(cancel)
			return ch
		}
		cancel()
		if time.Now().After(deadline) {
			t.Fatalf("events: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func nextEvent(t *testing.T, ch <-chan talosclient.EventResult) talosclient.Event {
	t.Helper()
	select {
	case r := <-ch:
		if r.Error != nil {
			t.Fatalf("watching events: %v", r.Error)
		}
		return r.Event
	case <-time.After(10 * time.Second):
		t.Fatal("no event within 10s")
		return talosclient.Event{}
	}
}

func nextEvents(t *testing.T, ch <-chan talosclient.EventResult, n int) []talosclient.Event {
	t.Helper()
	out := make([]talosclient.Event, n)
	for i := range out {
		out[i] = nextEvent(t, ch)
	}
	return out
}

// describe summarises an event's payload in one line.
func describe(ev talosclient.Event) string {
	switch p := ev.Payload.(type) {
	case *machine.SequenceEvent:
		return fmt.Sprintf("sequence %s %s", p.GetSequence(), p.GetAction())
	case *machine.PhaseEvent:
		return fmt.Sprintf("phase %s %s", p.GetPhase(), p.GetAction())
	case *machine.TaskEvent:
		return fmt.Sprintf("task %s %s", p.GetTask(), p.GetAction())
	case *machine.ServiceStateEvent:
		d := fmt.Sprintf("service %s %s", p.GetService(), p.GetAction())
		if p.GetHealth().GetHealthy() {
			d += " healthy"
		}
		return d
	case *machine.MachineStatusEvent:
		return fmt.Sprintf("machine %s ready=%v", p.GetStage(), p.GetStatus().GetReady())
	}
	return "unexpected " + ev.TypeURL
}

func describeAll(evs []talosclient.Event) []string {
	out := make([]string, len(evs))
	for i, ev := range evs {
		out[i] = describe(ev)
	}
	return out
}

// servicesMoving describes every simulated service moving to each of
// states in turn.
func servicesMoving(states ...string) []string {
	var out []string
	for _, st := range states {
		for _, svc := range lifecycle.SimulatedServices {
			out = append(out, "service "+svc+" "+st)
		}
	}
	return out
}

// servicesRunning describes every service's move from Preparing to Running
// and its first health check.
func servicesRunning() []string {
	var out []string
	for _, svc := range lifecycle.SimulatedServices {
		out = append(out, "service "+svc+" RUNNING", "service "+svc+" RUNNING healthy")
	}
	return out
}

// bootEvents are the events a new agent starts its log with.
// More than 20, as a booted Talos node has and Talos's own EventsWatch
// test asks of one.
func bootEvents() []string {
	out := []string{"machine BOOTING ready=false", "sequence boot START", "phase startEverything START"}
	for _, svc := range lifecycle.SimulatedServices {
		out = append(out, "task startService("+svc+") START",
			"service "+svc+" PREPARING", "service "+svc+" RUNNING", "service "+svc+" RUNNING healthy",
			"task startService("+svc+") STOP")
	}
	return append(out, "phase startEverything STOP", "sequence boot STOP", "machine RUNNING ready=true")
}

var eventID = regexp.MustCompile(`^[0-9a-v]{20}$`)

// checkEventIDs checks that evs have well-formed IDs in increasing order.
func checkEventIDs(t *testing.T, evs []talosclient.Event) {
	t.Helper()
	for i, ev := range evs {
		if !eventID.MatchString(ev.ID) {
			t.Errorf("event %d: id %q is not 20 characters of base32hex", i, ev.ID)
		}
		if i > 0 && ev.ID <= evs[i-1].ID {
			t.Errorf("event %d: id %q does not sort after %q", i, ev.ID, evs[i-1].ID)
		}
	}
}

func TestEventsHistory(t *testing.T) {
	c, _ := nodetest.OfficialClient(t, node.Config{})
	all := nextEvents(t, watchEvents(t, c, talosclient.WithTailEvents(-1)), len(bootEvents()))
	if got := describeAll(all); !slices.Equal(got, bootEvents()) {
		t.Fatalf("boot events:\n got %q\nwant %q", got, bootEvents())
	}
	checkEventIDs(t, all)
	for _, ev := range all {
		if want := "talos/runtime/" + string(ev.Payload.ProtoReflect().Descriptor().FullName()); ev.TypeURL != want {
			t.Errorf("type URL %q, want %q", ev.TypeURL, want)
		}
		if ev.ActorID != "" {
			t.Errorf("boot event %s has actor %q, want none", describe(ev), ev.ActorID)
		}
	}

	n := len(all)
	cases := []struct {
		name string
		opts []talosclient.EventsOptionFunc
		want []talosclient.Event
	}{
		{"no history", nil, nil},
		{"tail 3", []talosclient.EventsOptionFunc{talosclient.WithTailEvents(3)}, all[n-3:]},
		{"tail beyond the log", []talosclient.EventsOptionFunc{talosclient.WithTailEvents(5000)}, all},
		{"tail -1", []talosclient.EventsOptionFunc{talosclient.WithTailEvents(-1)}, all},
		{"after an id", []talosclient.EventsOptionFunc{talosclient.WithTailID(all[8].ID)}, all[9:]},
		{"after the last id", []talosclient.EventsOptionFunc{talosclient.WithTailID(all[n-1].ID)}, nil},
		{"after an id older than the log", []talosclient.EventsOptionFunc{talosclient.WithTailID("00000000000000000000")}, all},
		{"last minute", []talosclient.EventsOptionFunc{talosclient.WithTailDuration(time.Minute)}, all},
	}
	watches := make([]<-chan talosclient.EventResult, len(cases))
	for i, tc := range cases {
		watches[i] = watchEvents(t, c, tc.opts...)
	}
	// Every watch's start is fixed: a new event shows where each history ends.
	if _, err := c.ServiceRestart(testkit.Context(t), "cri-sim"); err != nil {
		t.Fatal(err)
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := nextEvents(t, watches[i], len(tc.want)+1)
			for j, ev := range tc.want {
				if got[j].ID != ev.ID || describe(got[j]) != describe(ev) {
					t.Errorf("event %d = %s %s, want %s %s", j, got[j].ID, describe(got[j]), ev.ID, describe(ev))
				}
			}
			if last := describe(got[len(tc.want)]); last != "service cri-sim STOPPING" {
				t.Errorf("after the history came %q, want the restart's first event", last)
			}
		})
	}
}

func TestEventsTailSeconds(t *testing.T) {
	t.Parallel()
	c, _ := nodetest.OfficialClient(t, node.Config{})
	ctx := testkit.Context(t)
	time.Sleep(1100 * time.Millisecond) // the boot events are now older than a second
	if _, err := c.ServiceStop(ctx, "etcd-sim"); err != nil {
		t.Fatal(err)
	}
	w := watchEvents(t, c, talosclient.WithTailDuration(time.Second))
	if _, err := c.ServiceStart(ctx, "etcd-sim"); err != nil {
		t.Fatal(err)
	}
	got := describeAll(nextEvents(t, w, 5))
	want := []string{"service etcd-sim STOPPING", "service etcd-sim FINISHED",
		"service etcd-sim PREPARING", "service etcd-sim RUNNING", "service etcd-sim RUNNING healthy"}
	if !slices.Equal(got, want) {
		t.Fatalf("events of the last second, then new ones:\n got %q\nwant %q", got, want)
	}
}

func TestEventsInvalidRequests(t *testing.T) {
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	for _, req := range []*machine.EventsRequest{
		{TailId: "not-an-event-id"},
		{TailId: "0123456789ABCDEFGHIJ"},
		{TailEvents: 1, TailId: "00000000000000000000"},
		{TailEvents: 1, TailSeconds: 1},
		{TailSeconds: -1},
	} {
		stream, err := c.Events(testkit.Context(t), req)
		if err == nil {
			_, err = stream.Recv()
		}
		if status.Code(err) != codes.InvalidArgument {
			t.Errorf("Events(%v): %v, want InvalidArgument", req, err)
		}
	}
}

// TestEventsSlowSubscriber stalls one subscriber while thousands of events
// are published on the same connection: the publishing calls and a new
// subscriber must not wait for it, and it must end with ResourceExhausted
// once the events it was not sent are overwritten.
func TestEventsSlowSubscriber(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "a.sock")
	nodetest.Serve(t, node.Config{}, "unix://"+sock)
	// A fixed 64 KiB window (no dynamic growth) so that flow control stalls
	// the subscriber after a known amount of data.
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	mc := machine.NewMachineServiceClient(conn)
	ctx := testkit.Context(t)
	stalled, err := mc.Events(ctx, &machine.EventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stalled.Recv(); err != nil { // the hello event
		t.Fatal(err)
	}

	const restarts = 600 // 5 events each: three times what the agent keeps
	began := time.Now()
	for i := range restarts {
		callCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
		_, err := mc.ServiceRestart(callCtx, &machine.ServiceRestartRequest{Id: "etcd-sim"})
		cancel()
		if err != nil {
			t.Fatalf("restart %d with a stalled subscriber: %v", i, err)
		}
	}
	t.Logf("%d restarts (%d events) in %v", restarts, 5*restarts, time.Since(began))

	freshCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	fresh, err := mc.Events(freshCtx, &machine.EventsRequest{TailEvents: 1})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 { // hello, then the last event
		if _, err := fresh.Recv(); err != nil {
			t.Fatalf("new subscriber: %v", err)
		}
	}

	received, last := 0, ""
	for {
		ev, err := stalled.Recv()
		if err != nil {
			nodetest.WantCode(t, err, codes.ResourceExhausted)
			if msg := status.Convert(err).Message(); !strings.Contains(msg, "too slow") || !strings.Contains(msg, last) {
				t.Errorf("message %q does not explain the drop or name the last event sent (%s)", msg, last)
			}
			break
		}
		if ev.GetId() <= last {
			t.Fatalf("event %q after %q", ev.GetId(), last)
		}
		received++
		last = ev.GetId()
	}
	if received >= 5*restarts {
		t.Errorf("the stalled subscriber received all %d events: it was never stalled", received)
	}
	t.Logf("the stalled subscriber received %d of %d events before ResourceExhausted", received, 5*restarts)
}
