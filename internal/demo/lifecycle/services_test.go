package lifecycle_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	"github.com/siderolabs/talos/pkg/machinery/resources/v1alpha1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/lifecycle"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

// serviceStates returns each service's state and health ("OK", "Fail" or
// "?", as talosctl prints them), checking what talosctl needs to render the
// list.
func serviceStates(t *testing.T, c *talosclient.Client) map[string]string {
	t.Helper()
	resp, err := c.ServiceList(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetMessages()) != 1 {
		t.Fatalf("%d messages, want 1", len(resp.GetMessages()))
	}
	out := map[string]string{}
	var ids []string
	for _, svc := range resp.GetMessages()[0].GetServices() {
		// talosctl dereferences both without checking.
		if svc.GetEvents() == nil || svc.GetHealth() == nil {
			t.Fatalf("service %s lacks events or health: %v", svc.GetId(), svc)
		}
		if n := len(svc.GetEvents().GetEvents()); n == 0 || n > 64 {
			t.Errorf("service %s has %d events, want 1 to 64", svc.GetId(), n)
		}
		health := "Fail"
		switch {
		case svc.GetHealth().GetUnknown():
			health = "?"
		case svc.GetHealth().GetHealthy():
			health = "OK"
		}
		ids = append(ids, svc.GetId())
		out[svc.GetId()] = svc.GetState() + " " + health
	}
	if !slices.Equal(ids, lifecycle.SimulatedServices) {
		t.Errorf("services %q, want %q in that order", ids, lifecycle.SimulatedServices)
	}
	return out
}

func TestServices(t *testing.T) {
	c, _ := nodetest.OfficialClient(t, node.Config{})
	ctx := testkit.Context(t)
	if got := serviceStates(t, c); got["etcd-sim"] != "Running OK" || got["kubelet-sim"] != "Running OK" || got["cri-sim"] != "Running OK" {
		t.Fatalf("initial states %v, want all Running OK", got)
	}
	w := watchEvents(t, c)

	// expect checks that the next events are want, all from one actor.
	expect := func(t *testing.T, want ...string) {
		t.Helper()
		evs := nextEvents(t, w, len(want))
		if got := describeAll(evs); !slices.Equal(got, want) {
			t.Fatalf("events:\n got %q\nwant %q", got, want)
		}
		for _, ev := range evs {
			if ev.ActorID == "" || ev.ActorID != evs[0].ActorID {
				t.Errorf("event %s has actor %q, want the call's (%q)", describe(ev), ev.ActorID, evs[0].ActorID)
			}
		}
	}

	stop, err := c.ServiceStop(ctx, "etcd-sim")
	if err != nil {
		t.Fatal(err)
	}
	if got := stop.GetMessages()[0].GetResp(); got != `Service "etcd-sim" stopped` {
		t.Errorf("stop reply %q", got)
	}
	expect(t, "service etcd-sim STOPPING", "service etcd-sim FINISHED")
	if got := serviceStates(t, c)["etcd-sim"]; got != "Finished ?" {
		t.Errorf("stopped etcd-sim is %q, want Finished with unknown health", got)
	}

	again, err := c.ServiceStop(ctx, "etcd-sim")
	if err != nil {
		t.Fatal(err)
	}
	if got := again.GetMessages()[0].GetResp(); !strings.Contains(got, "already stopped") {
		t.Errorf("second stop reply %q", got)
	}

	if _, err := c.ServiceStart(ctx, "etcd-sim"); err != nil {
		t.Fatal(err)
	}
	// The second stop published nothing: the start's events come next.
	expect(t, "service etcd-sim PREPARING", "service etcd-sim RUNNING", "service etcd-sim RUNNING healthy")
	if got := serviceStates(t, c)["etcd-sim"]; got != "Running OK" {
		t.Errorf("started etcd-sim is %q", got)
	}

	restart, err := c.ServiceRestart(ctx, "kubelet-sim")
	if err != nil {
		t.Fatal(err)
	}
	if got := restart.GetMessages()[0].GetResp(); got != `Service "kubelet-sim" restarted` {
		t.Errorf("restart reply %q", got)
	}
	expect(t, "service kubelet-sim STOPPING", "service kubelet-sim FINISHED",
		"service kubelet-sim PREPARING", "service kubelet-sim RUNNING", "service kubelet-sim RUNNING healthy")

	_, err = c.ServiceStart(ctx, "kubelet")
	nodetest.WantCode(t, err, codes.NotFound)
	for _, id := range lifecycle.SimulatedServices {
		if !strings.Contains(status.Convert(err).Message(), id) {
			t.Errorf("NotFound message %q does not name %s", status.Convert(err).Message(), id)
		}
	}
	_, err = c.MachineClient.ServiceStop(ctx, &machine.ServiceStopRequest{})
	nodetest.WantCode(t, err, codes.InvalidArgument)
}

// TestBesideServices: a service that runs beside the agent (the demo's
// apid) is listed running, its health unknown, in ID order among the
// simulated ones, and cannot be started, stopped or restarted.
func TestBesideServices(t *testing.T) {
	mc, _, _ := nodetest.Start(t, node.Config{BesideServices: []string{"apid"}}, "unix")
	// talosctl get services lists it too, as talosctl services does.
	c, _ := nodetest.OfficialClient(t, node.Config{BesideServices: []string{"apid"}})
	if svc, err := safe.StateGetByID[*v1alpha1.Service](testkit.Context(t), c.COSI, "apid"); err != nil || !svc.TypedSpec().Running || !svc.TypedSpec().Unknown {
		t.Errorf("the apid service resource: %v, %v", svc, err)
	}
	resp, err := mc.ServiceList(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, svc := range resp.GetMessages()[0].GetServices() {
		ids = append(ids, svc.GetId())
		if svc.GetId() == "apid" && (svc.GetState() != "Running" || !svc.GetHealth().GetUnknown() || len(svc.GetEvents().GetEvents()) != 1) {
			t.Errorf("apid: %v", svc)
		}
	}
	if want := append([]string{"apid"}, lifecycle.SimulatedServices...); !slices.Equal(ids, want) {
		t.Errorf("services %q, want %q", ids, want)
	}
	_, err = mc.ServiceRestart(testkit.Context(t), &machine.ServiceRestartRequest{Id: "apid"})
	nodetest.WantCode(t, err, codes.FailedPrecondition)
	if !strings.Contains(err.Error(), `cannot restart service "apid": it runs beside the example agent`) {
		t.Errorf("restart apid: %v", err)
	}
}
