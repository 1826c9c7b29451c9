package resources_test

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/siderolabs/talos/pkg/machinery/api/inspect"
	configmachine "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/resources/cluster"
	"github.com/siderolabs/talos/pkg/machinery/resources/config"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"github.com/siderolabs/talos/pkg/machinery/resources/network"
	"github.com/siderolabs/talos/pkg/machinery/resources/runtime"
	"github.com/siderolabs/talos/pkg/machinery/resources/v1alpha1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/identity"
	"github.com/apid/apid/internal/demo/lifecycle"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/demo/resources"
	"github.com/apid/apid/internal/testkit"
)

// TestResources reads the resource API as talosctl get does, through the
// official client's COSI state: the hostname, the cluster's members, the
// definitions that resolve `members` and `services`, the services and
// machine status, which follow what the agent does (a watched service
// restart), and writes refused.
func TestResources(t *testing.T) {
	c, _ := nodetest.OfficialClient(t, node.Config{Hostname: "node-1.demo", Members: []resources.Member{
		{Hostname: "node-1.demo", Addresses: []string{"127.0.0.11"}, ControlPlane: true},
		{Hostname: "node-4.demo", Addresses: []string{"127.0.0.14", "not an address"}},
	}})
	ctx := testkit.Context(t)

	host, err := safe.StateGetByID[*network.HostnameStatus](ctx, c.COSI, network.HostnameID)
	if err != nil || host.TypedSpec().Hostname != "node-1" || host.TypedSpec().Domainname != "demo" {
		t.Fatalf("hostname: %v, %v", host, err)
	}

	members, err := safe.StateListAll[*cluster.Member](ctx, c.COSI)
	if err != nil || members.Len() != 2 {
		t.Fatalf("members: %v, %v", members, err)
	}
	m1, m4 := members.Get(0).TypedSpec(), members.Get(1).TypedSpec()
	if m1.Hostname != "node-1.demo" || m1.MachineType != configmachine.TypeControlPlane || len(m1.Addresses) != 1 || m1.Addresses[0].String() != "127.0.0.11" || m1.NodeID == "" ||
		m4.MachineType != configmachine.TypeWorker || len(m4.Addresses) != 1 {
		t.Errorf("members: %+v, %+v", m1, m4)
	}

	// What the dashboard's summary reads of the node itself.
	// (The machine type and the cluster's identity are the controllers':
	// they appear as soon as the runtime has run them.)
	if !testkit.Eventually(5*time.Second, func() bool {
		mt, err := safe.StateGetByID[*config.MachineType](ctx, c.COSI, config.MachineTypeID)
		return err == nil && mt.MachineType() == configmachine.TypeControlPlane
	}) {
		t.Errorf("no machine type controlplane")
	}
	addrs, err := safe.StateGetByID[*network.NodeAddress](ctx, c.COSI, network.NodeAddressCurrentID)
	if err != nil || len(addrs.TypedSpec().Addresses) != 1 || addrs.TypedSpec().Addresses[0].String() != "127.0.0.11/32" {
		t.Errorf("node addresses: %v, %v", addrs, err)
	}
	ver, err := safe.StateGetByID[*runtime.Version](ctx, c.COSI, "version")
	if err != nil || ver.TypedSpec().Version != identity.VersionTag {
		t.Errorf("version: %v, %v", ver, err)
	}
	if !testkit.Eventually(5*time.Second, func() bool {
		info, err := safe.StateGetByID[*cluster.Info](ctx, c.COSI, cluster.InfoID)
		return err == nil && info.TypedSpec().ClusterName == node.DefaultClusterName && info.TypedSpec().ClusterID != ""
	}) {
		t.Errorf("no cluster info of %s", node.DefaultClusterName)
	}

	// talosctl inspect dependencies: the controllers, their inputs and
	// outputs, from the controller runtime.
	deps, err := inspect.NewInspectServiceClient(c.Conn()).ControllerRuntimeDependencies(ctx, &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	var edges []string
	for _, e := range deps.GetMessages()[0].GetEdges() {
		edges = append(edges, e.GetControllerName()+" "+e.GetEdgeType().String()+" "+e.GetResourceType())
	}
	for _, want := range []string{
		"config.MachineTypeController INPUT_WEAK " + config.MachineConfigType,
		"config.MachineTypeController OUTPUT_EXCLUSIVE " + config.MachineTypeType,
		"cluster.InfoController OUTPUT_EXCLUSIVE " + cluster.InfoType,
	} {
		if !slices.Contains(edges, want) {
			t.Errorf("no edge %q in %q", want, edges)
		}
	}
	if sec, err := safe.StateGetByID[*runtime.SecurityState](ctx, c.COSI, runtime.SecurityStateID); err != nil || sec.TypedSpec().SecureBoot {
		t.Errorf("security state: %v, %v", sec, err)
	}
	if sys, err := safe.StateGetByID[*hardware.SystemInformation](ctx, c.COSI, hardware.SystemInformationID); err != nil || sys.TypedSpec().UUID == "" {
		t.Errorf("system information: %v, %v", sys, err)
	}

	rds, err := safe.StateListAll[*meta.ResourceDefinition](ctx, c.COSI)
	if err != nil {
		t.Fatal(err)
	}
	var types []string
	for rd := range rds.All() {
		types = append(types, rd.TypedSpec().Type)
	}
	for _, want := range []string{cluster.MemberType, v1alpha1.ServiceType, runtime.MachineStatusType, network.HostnameStatusType, meta.ResourceDefinitionType, meta.NamespaceType} {
		if !slices.Contains(types, want) {
			t.Errorf("no resource definition of %s (%q)", want, types)
		}
	}

	status0, err := safe.StateGetByID[*runtime.MachineStatus](ctx, c.COSI, runtime.MachineStatusID)
	if err != nil || status0.TypedSpec().Stage != runtime.MachineStageRunning || !status0.TypedSpec().Status.Ready {
		t.Fatalf("machine status: %v, %v", status0, err)
	}

	// Watch the services, as talosctl get services -w does, and restart one.
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := make(chan state.Event, 64)
	if err := c.COSI.WatchKind(wctx, v1alpha1.NewService("").Metadata(), events, state.WithBootstrapContents(true)); err != nil {
		t.Fatal(err)
	}
	initial := map[string]bool{}
	for len(initial) < len(lifecycle.SimulatedServices) {
		ev := nextResourceEvent(t, events)
		if ev.Type == state.Created {
			initial[ev.Resource.Metadata().ID()] = ev.Resource.(*v1alpha1.Service).TypedSpec().Running
		}
	}
	for id, running := range initial {
		if !running {
			t.Errorf("service %s not running at first", id)
		}
	}
	svc := lifecycle.SimulatedServices[0]
	if _, err := c.ServiceRestart(ctx, svc); err != nil {
		t.Fatal(err)
	}
	var seen []bool // Running, as each update says it
	for len(seen) < 2 || !seen[len(seen)-1] {
		ev := nextResourceEvent(t, events)
		if ev.Type == state.Updated && ev.Resource.Metadata().ID() == svc {
			seen = append(seen, ev.Resource.(*v1alpha1.Service).TypedSpec().Running)
		}
	}
	if !slices.Contains(seen, false) {
		t.Errorf("the restart never showed %s stopped: %v", svc, seen)
	}

	// Writes are refused, whoever asks.
	err = c.COSI.Create(ctx, cluster.NewMember(cluster.NamespaceName, "intruder"))
	// (The COSI client wraps the status: its text is what reaches talosctl.)
	if err == nil || !strings.Contains(err.Error(), "code = PermissionDenied desc = not authorized") {
		t.Errorf("create: %v, want PermissionDenied", err)
	}
	err = c.COSI.Destroy(metadata.AppendToOutgoingContext(ctx, "talos-role", "os:admin"), network.NewHostnameStatus(network.NamespaceName, network.HostnameID).Metadata())
	if err == nil || !strings.Contains(err.Error(), "code = PermissionDenied desc = not authorized") {
		t.Errorf("destroy as admin: %v, want PermissionDenied", err)
	}
	// A reader reads what is not sensitive.
	if _, err := safe.StateGetByID[*cluster.Member](metadata.AppendToOutgoingContext(ctx, "talos-role", "os:reader"), c.COSI, "node-4.demo"); err != nil {
		t.Errorf("reader get member: %v", err)
	}
}

func nextResourceEvent(t *testing.T, ch <-chan state.Event) state.Event {
	t.Helper()
	select {
	case ev := <-ch:
		if ev.Type == state.Errored {
			t.Fatalf("watch: %v", ev.Error)
		}
		return ev
	case <-time.After(10 * time.Second):
		t.Fatal("no resource event within 10 s")
		return state.Event{}
	}
}
