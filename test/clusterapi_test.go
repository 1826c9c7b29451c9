package test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	clusterapi "github.com/siderolabs/talos/pkg/machinery/api/cluster"
	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	clusterres "github.com/siderolabs/talos/pkg/machinery/resources/cluster"
	configres "github.com/siderolabs/talos/pkg/machinery/resources/config"
	"github.com/siderolabs/talos/pkg/machinery/resources/network"
	runtimeres "github.com/siderolabs/talos/pkg/machinery/resources/runtime"
	v1alpha1res "github.com/siderolabs/talos/pkg/machinery/resources/v1alpha1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/pki"
)

// entries lists a reply's entries as "hostname" or "hostname: error",
// read through reflection so that one helper serves every reply type.
func entries(m proto.Message) []string {
	var out []string
	if m == nil {
		return nil
	}
	r := m.ProtoReflect()
	f := r.Descriptor().Fields().ByName("messages")
	if f == nil {
		md := metadataOf(r)
		return []string{describeEntry(md)}
	}
	list := r.Get(f).List()
	for i := range list.Len() {
		out = append(out, describeEntry(metadataOf(list.Get(i).Message())))
	}
	return out
}

func metadataOf(r protoreflect.Message) *common.Metadata {
	f := r.Descriptor().Fields().ByName("metadata")
	if f == nil || !r.Has(f) {
		return nil
	}
	md, _ := r.Get(f).Message().Interface().(*common.Metadata)
	return md
}

func describeEntry(md *common.Metadata) string {
	if md.GetError() != "" {
		return md.GetHostname() + ": error"
	}
	return md.GetHostname()
}

// TestDemoClusterAPI drives the demo (four nodes: three control-plane, one
// worker) through the cluster-aware parts of the API with the official Go
// client: groups, client configuration, the cluster health check, and the
// agent's everyday methods fanned out with a node down.
func TestDemoClusterAPI(t *testing.T) {
	c := startDemo(t, 81, 4)
	cl := c.client(t, c.endpoint(0))
	dead := "127.0.81.99"

	t.Run("resources through the gateway", func(t *testing.T) {
		// talosctl get members -n node-2: every node knows the cluster.
		ctx := client.WithNode(testkit.Context(t), "node-2")
		members, err := safe.StateListAll[*clusterres.Member](ctx, cl.COSI)
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for m := range members.All() {
			got = append(got, m.Metadata().ID()+"="+m.TypedSpec().MachineType.String())
		}
		if want := "node-1=controlplane,node-2=controlplane,node-3=controlplane,node-4=worker"; strings.Join(got, ",") != want {
			t.Errorf("members through node-2: %s, want %s", strings.Join(got, ","), want)
		}
		// What talosctl dashboard's summary reads of node-4, through the
		// gateway: stage and readiness, role, cluster, address, version,
		// secure boot.
		n4 := client.WithNode(testkit.Context(t), "node-4")
		if ms, err := safe.StateGetByID[*runtimeres.MachineStatus](n4, cl.COSI, runtimeres.MachineStatusID); err != nil || ms.TypedSpec().Stage != runtimeres.MachineStageRunning || !ms.TypedSpec().Status.Ready {
			t.Errorf("machine status: %v, %v", ms, err)
		}
		if !testkit.Eventually(5*time.Second, func() bool {
			mt, err := safe.StateGetByID[*configres.MachineType](n4, cl.COSI, configres.MachineTypeID)
			info, err2 := safe.StateGetByID[*clusterres.Info](n4, cl.COSI, clusterres.InfoID)
			return err == nil && err2 == nil && mt.MachineType().String() == "worker" && info.TypedSpec().ClusterName == "apid-demo"
		}) {
			t.Error("node-4's machine type or cluster info")
		}
		if addrs, err := safe.StateGetByID[*network.NodeAddress](n4, cl.COSI, network.NodeAddressRoutedID); err != nil || len(addrs.TypedSpec().Addresses) != 1 || addrs.TypedSpec().Addresses[0].Addr().String() != c.nodes[3] {
			t.Errorf("node-4's routed address: %v, %v", addrs, err)
		}
		if v, err := safe.StateGetByID[*runtimeres.Version](n4, cl.COSI, "version"); err != nil || !strings.HasSuffix(v.TypedSpec().Version, "+apid-example") {
			t.Errorf("version: %v, %v", v, err)
		}
		if sec, err := safe.StateGetByID[*runtimeres.SecurityState](n4, cl.COSI, runtimeres.SecurityStateID); err != nil || sec.TypedSpec().SecureBoot {
			t.Errorf("security state: %v, %v", sec, err)
		}
		// talosctl -n node-1 inspect dependencies.
		deps, err := cl.Inspect.ControllerRuntimeDependencies(client.WithNode(testkit.Context(t), "node-1"))
		if err != nil || len(deps.GetMessages()) != 1 || len(deps.GetMessages()[0].GetEdges()) == 0 {
			t.Errorf("inspect dependencies: %v, %v", deps, err)
		}

		// A reader reads them; writes are refused, whoever asks.
		reader := c.clientWithRoles(t, "res-reader", "os:reader")
		if _, err := safe.StateGetByID[*network.HostnameStatus](client.WithNode(testkit.Context(t), "node-4"), reader.COSI, network.HostnameID); err != nil {
			t.Errorf("reader get hostname: %v", err)
		}
		if err := cl.COSI.Create(ctx, clusterres.NewMember(clusterres.NamespaceName, "intruder")); err == nil || !strings.Contains(err.Error(), "PermissionDenied") {
			t.Errorf("create a member: %v, want PermissionDenied", err)
		}
		// A group of several cannot be one call of a method whose replies
		// carry no node: the refusal says what to type.
		_, err = safe.StateListAll[*clusterres.Member](client.WithNode(testkit.Context(t), "@controlplane"), cl.COSI)
		if err == nil || !strings.Contains(err.Error(), "list them, as in talosctl -n node-1,node-2,node-3") {
			t.Errorf("members of @controlplane: %v", err)
		}
		// talosctl get services -w: a restart shows through the watch.
		wctx, cancel := context.WithCancel(client.WithNode(testkit.Context(t), "node-3"))
		defer cancel()
		events := make(chan state.Event, 64)
		if err := cl.COSI.WatchKind(wctx, v1alpha1res.NewService("").Metadata(), events); err != nil {
			t.Fatal(err)
		}
		if _, err := cl.ServiceRestart(client.WithNode(testkit.Context(t), "node-3"), "etcd-sim"); err != nil {
			t.Fatal(err)
		}
		select {
		case ev := <-events:
			if ev.Type != state.Updated || ev.Resource.Metadata().ID() != "etcd-sim" {
				t.Errorf("first event after the restart: %v %v", ev.Type, ev.Resource)
			}
		case <-time.After(10 * time.Second):
			t.Error("no service event within 10 s of a restart")
		}
	})

	t.Run("apply-config to a group, and the kernel's log", func(t *testing.T) {
		// The configuration node-1 holds, applied to @controlplane: one
		// entry per node, as talosctl -n @controlplane apply-config prints.
		mc, err := safe.StateGetByID[*configres.MachineConfig](client.WithNode(testkit.Context(t), "node-1"), cl.COSI, configres.ActiveID)
		if err != nil {
			t.Fatal(err)
		}
		doc, err := mc.Provider().EncodeBytes()
		if err != nil {
			t.Fatal(err)
		}
		resp, err := cl.ApplyConfiguration(client.WithNodes(testkit.Context(t), "@controlplane"),
			&machine.ApplyConfigurationRequest{Data: doc, Mode: machine.ApplyConfigurationRequest_NO_REBOOT})
		if err != nil {
			t.Fatal(err)
		}
		var got []string
		for _, m := range resp.GetMessages() {
			got = append(got, m.GetMetadata().GetHostname()+": "+m.GetModeDetails()+m.GetMetadata().GetError())
		}
		if want := "node-1: Applied configuration without a reboot,node-2: Applied configuration without a reboot,node-3: Applied configuration without a reboot"; strings.Join(got, ",") != want {
			t.Errorf("apply-config to @controlplane: %q", got)
		}
		// A document that does not load: each node's InvalidArgument entry
		// (the official client turns entries with errors into its error).
		_, err = cl.ApplyConfiguration(client.WithNodes(testkit.Context(t), "node-1", "node-4"), &machine.ApplyConfigurationRequest{Data: []byte("bad: x\n")})
		if err == nil || strings.Count(err.Error(), "code = InvalidArgument desc = error decoding document") != 2 || !strings.Contains(err.Error(), "node-4") {
			t.Errorf("a bad document: %v", err)
		}

		stream, err := cl.Logs(client.WithNode(testkit.Context(t), "node-4"), "system", common.ContainerDriver_CONTAINERD, "kernel", false, 3)
		if err != nil {
			t.Fatal(err)
		}
		lines := 0
		for {
			if _, err := stream.Recv(); err != nil {
				if err != io.EOF {
					t.Fatalf("logs kernel: %v", err)
				}
				break
			}
			lines++
		}
		if lines == 0 || lines > 3 {
			t.Errorf("logs kernel --tail 3: %d messages", lines)
		}

		// talosctl logs apid: the node's apid's own log, which has just
		// served the calls above.
		stream, err = cl.Logs(client.WithNode(testkit.Context(t), "node-2"), "system", common.ContainerDriver_CONTAINERD, "apid", false, -1)
		if err != nil {
			t.Fatal(err)
		}
		var apidLog strings.Builder
		for {
			d, err := stream.Recv()
			if err != nil {
				if err != io.EOF {
					t.Fatalf("logs apid: %v", err)
				}
				break
			}
			apidLog.Write(d.GetBytes())
		}
		if !strings.Contains(apidLog.String(), "serving") {
			t.Errorf("logs apid:\n%s", apidLog.String())
		}
	})

	t.Run("etcd through the gateway", func(t *testing.T) {
		// talosctl -n @controlplane etcd members: one real cluster of
		// three, seen from each member.
		list, err := cl.EtcdMemberList(client.WithNodes(testkit.Context(t), "@controlplane"), &machine.EtcdMemberListRequest{})
		if err != nil || len(list.GetMessages()) != 3 {
			t.Fatalf("etcd members of @controlplane: %v, %v", list, err)
		}
		for _, m := range list.GetMessages() {
			var names []string
			for _, member := range m.GetMembers() {
				names = append(names, member.GetHostname())
			}
			slices.Sort(names)
			if strings.Join(names, ",") != "node-1,node-2,node-3" {
				t.Errorf("%s sees members %v", m.GetMetadata().GetHostname(), names)
			}
		}
		// A worker runs none: its entry says so in Talos's words.
		_, err = cl.EtcdStatus(client.WithNodes(testkit.Context(t), "node-2", "node-4"))
		if err == nil || !strings.Contains(err.Error(), "etcd status is only available on control plane nodes") {
			t.Errorf("etcd status of node-2 and the worker: %v", err)
		}
		// talosctl -n node-2 etcd snapshot: one-to-one, streamed.
		rd, err := cl.EtcdSnapshot(client.WithNode(testkit.Context(t), "node-2"), &machine.EtcdSnapshotRequest{})
		if err != nil {
			t.Fatal(err)
		}
		n, err := io.Copy(io.Discard, rd)
		rd.Close()
		if err != nil || n < 16<<10 {
			t.Errorf("snapshot through the gateway: %d bytes, %v", n, err)
		}
	})

	t.Run("groups expand to inventory names", func(t *testing.T) {
		for _, tc := range []struct {
			nodes []string
			want  string
		}{
			{[]string{"@controlplane"}, "node-1,node-2,node-3"},
			{[]string{"@workers"}, "node-4"},
			{[]string{"@all"}, "node-1,node-2,node-3,node-4"},
			{[]string{"@zone=zone-b"}, "node-2,node-4"},
			{[]string{"node-4", "@controlplane", "node-1"}, "node-4,node-1,node-2,node-3"},
			// Named by address, stamped with exactly what was sent.
			{[]string{c.nodes[1], "node-3"}, c.nodes[1] + ",node-3"},
			// A name nobody knows is its own NOT_FOUND entry.
			{[]string{"node-1", "node-9"}, "node-1,node-9: error"},
		} {
			resp, err := cl.MachineClient.Version(client.WithNodes(testkit.Context(t), tc.nodes...), &emptypb.Empty{})
			if err != nil {
				t.Fatalf("%v: %v", tc.nodes, err)
			}
			if got := strings.Join(entries(resp), ","); got != tc.want {
				t.Errorf("%v: entries %s, want %s", tc.nodes, got, tc.want)
			}
		}
		resp, _ := cl.MachineClient.Version(client.WithNodes(testkit.Context(t), "node-9"), &emptypb.Empty{})
		if e := resp.GetMessages()[0].GetMetadata().GetError(); !strings.Contains(e, `node "node-9" is not in the inventory`) {
			t.Errorf("node-9 entry: %q", e)
		}
		_, err := cl.Version(client.WithNodes(testkit.Context(t), "@controlplanes"))
		if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "known groups are @all, @controlplane, @workers, @zone=zone-a, @zone=zone-b") {
			t.Errorf("unknown group: %v", err)
		}
	})

	t.Run("a worker serves only itself, as a Talos worker does", func(t *testing.T) {
		w := c.client(t, c.endpoint(3))
		for _, ctx := range []context.Context{
			client.WithNode(testkit.Context(t), c.nodes[0]),
			client.WithNodes(testkit.Context(t), c.nodes[0]),
			client.WithNodes(testkit.Context(t), "@controlplane"),
		} {
			_, err := w.Version(ctx)
			if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "no request forwarding") {
				t.Errorf("worker asked to forward: %v, want PermissionDenied no request forwarding", err)
			}
		}
		for _, ctx := range []context.Context{testkit.Context(t), client.WithNode(testkit.Context(t), c.nodes[3]), client.WithNodes(testkit.Context(t), "node-4")} {
			resp, err := w.Version(ctx)
			if err != nil || len(resp.GetMessages()) != 1 {
				t.Errorf("worker naming itself: %v, %v", resp, err)
			}
		}
	})

	t.Run("config new issues a client with exactly the roles asked", func(t *testing.T) {
		resp, err := cl.GenerateClientConfiguration(client.WithNodes(testkit.Context(t), "node-1"), &machine.GenerateClientConfigurationRequest{
			Roles: []string{"os:reader"}, CrtTtl: durationpb.New(24 * time.Hour),
		})
		if err != nil {
			t.Fatal(err)
		}
		gen := resp.GetMessages()[0]
		cfg, err := clientconfig.FromBytes(gen.GetTalosconfig())
		if err != nil {
			t.Fatal(err)
		}
		ctx := cfg.Contexts[cfg.Context]
		// The control-plane nodes: a worker's apid does not forward.
		endpoints := []string{c.endpoint(0), c.endpoint(1), c.endpoint(2)}
		if cfg.Context != "reader@apid-demo" || !slices.Equal(ctx.Endpoints, endpoints) {
			t.Errorf("talosconfig context %q endpoints %v, want reader@apid-demo and %v", cfg.Context, ctx.Endpoints, endpoints)
		}
		block, _ := pem.Decode(gen.GetCrt())
		crt, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(crt.Subject.Organization, []string{"os:reader"}) || crt.NotAfter.After(time.Now().Add(25*time.Hour)) {
			t.Errorf("certificate roles %v until %s", crt.Subject.Organization, crt.NotAfter)
		}
		// The new client works through apid, as a reader and no more.
		ctx.Endpoints = []string{c.endpoint(1)}
		reader, err := client.New(context.Background(), client.WithConfig(cfg))
		if err != nil {
			t.Fatal(err)
		}
		defer reader.Close()
		if _, err := reader.Version(client.WithNodes(testkit.Context(t), "@all")); err != nil {
			t.Errorf("reader Version: %v", err)
		}
		if err := reader.Reboot(client.WithNodes(testkit.Context(t), "node-2")); status.Code(err) != codes.PermissionDenied {
			t.Errorf("reader Reboot: %v, want PermissionDenied", err)
		}
		// Admin-only: the reader cannot mint itself an admin.
		if _, err := reader.GenerateClientConfiguration(client.WithNodes(testkit.Context(t), "node-1"), &machine.GenerateClientConfigurationRequest{
			Roles: []string{"os:admin"}, CrtTtl: durationpb.New(time.Hour)}); status.Code(err) != codes.PermissionDenied {
			t.Errorf("reader GenerateClientConfiguration: %v, want PermissionDenied", err)
		}

		for _, tc := range []struct {
			node  string
			req   *machine.GenerateClientConfigurationRequest
			code  codes.Code
			words string
		}{
			{"node-1", &machine.GenerateClientConfigurationRequest{Roles: []string{"os:raeder"}, CrtTtl: durationpb.New(time.Hour)}, codes.InvalidArgument, `unknown role "os:raeder"`},
			{"node-1", &machine.GenerateClientConfigurationRequest{Roles: []string{"os:impersonator"}, CrtTtl: durationpb.New(time.Hour)}, codes.InvalidArgument, "for apid nodes"},
			{"node-1", &machine.GenerateClientConfigurationRequest{Roles: []string{"os:admin"}, CrtTtl: durationpb.New(20 * 365 * 24 * time.Hour)}, codes.InvalidArgument, "longer than the client CA's remaining validity"},
			{"node-1", &machine.GenerateClientConfigurationRequest{Roles: []string{"os:admin"}}, codes.InvalidArgument, "crt_ttl should be positive"},
			{"node-4", &machine.GenerateClientConfigurationRequest{Roles: []string{"os:admin"}, CrtTtl: durationpb.New(time.Hour)}, codes.FailedPrecondition, "no client CA"},
		} {
			_, err := cl.GenerateClientConfiguration(client.WithNode(testkit.Context(t), tc.node), tc.req)
			if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.words) {
				t.Errorf("%s %v: %v, want %s %q", tc.node, tc.req, err, tc.code, tc.words)
			}
		}
	})

	health := func(t *testing.T, wait time.Duration, info *clusterapi.ClusterInfo) (lines []string, failure string) {
		t.Helper()
		stream, err := cl.ClusterHealthCheck(client.WithNode(testkit.Context(t), "node-2"), wait, info)
		if err != nil {
			t.Fatal(err)
		}
		for {
			msg, err := stream.Recv()
			if err == io.EOF {
				return lines, failure
			}
			if err != nil {
				t.Fatalf("health: %v", err)
			}
			lines = append(lines, msg.GetMessage())
			if e := msg.GetMetadata().GetError(); e != "" {
				failure = e
			}
		}
	}

	t.Run("health of the inventory passes", func(t *testing.T) {
		lines, failure := health(t, 20*time.Second, &clusterapi.ClusterInfo{})
		if failure != "" || lines[0] != "checking 4 nodes through apid: node-1, node-2, node-3, node-4" || lines[len(lines)-1] != "all checks passed" {
			t.Fatalf("failure %q\n%s", failure, strings.Join(lines, "\n"))
		}
	})

	t.Run("health with a node down fails within wait_timeout, naming it", func(t *testing.T) {
		start := time.Now()
		lines, failure := health(t, 3*time.Second, &clusterapi.ClusterInfo{ControlPlaneNodes: []string{"node-1", dead}, WorkerNodes: []string{"node-4"}})
		if !strings.Contains(failure, "node "+dead+" does not answer through apid within 3s (check: reachability)") {
			t.Fatalf("failure %q\n%s", failure, strings.Join(lines, "\n"))
		}
		if took := time.Since(start); took > 10*time.Second {
			t.Errorf("took %s for a wait of 3s", took)
		}
	})

	t.Run("health naming a node that routes nowhere is refused", func(t *testing.T) {
		for node, want := range map[string]codes.Code{"node-9": codes.NotFound, "@nosuch": codes.InvalidArgument} {
			stream, err := cl.ClusterHealthCheck(client.WithNode(testkit.Context(t), node), time.Second, &clusterapi.ClusterInfo{})
			if err == nil {
				_, err = stream.Recv()
			}
			if status.Code(err) != want {
				t.Errorf("health -n %s: %v, want %s", node, err, want)
			}
		}
	})

	t.Run("health as a caller without roles is refused", func(t *testing.T) {
		nobody := c.clientWithRoles(t, "nobody", "os:nothing")
		stream, err := nobody.ClusterHealthCheck(testkit.Context(t), time.Second, &clusterapi.ClusterInfo{})
		if err == nil {
			_, err = stream.Recv()
		}
		if status.Code(err) != codes.PermissionDenied {
			t.Fatalf("health without roles: %v", err)
		}
	})

	t.Run("new methods fan out with a node down", func(t *testing.T) {
		nodes := []string{"node-1", "node-3", dead}
		want := "node-1,node-3," + dead + ": error"
		unary := map[string]func(ctx context.Context) (proto.Message, error){
			"ServiceList": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.ServiceList(ctx, &emptypb.Empty{})
			},
			"Processes": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.Processes(ctx, &emptypb.Empty{})
			},
			"Mounts": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.Mounts(ctx, &emptypb.Empty{})
			},
			"LoadAvg": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.LoadAvg(ctx, &emptypb.Empty{})
			},
			"SystemStat": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.SystemStat(ctx, &emptypb.Empty{})
			},
			"CPUInfo": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.CPUInfo(ctx, &emptypb.Empty{})
			},
			"NetworkDeviceStats": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.NetworkDeviceStats(ctx, &emptypb.Empty{})
			},
			"DiskStats": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.DiskStats(ctx, &emptypb.Empty{})
			},
			"Netstat": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.Netstat(ctx, &machine.NetstatRequest{Filter: machine.NetstatRequest_LISTENING})
			},
			"ServiceRestart": func(ctx context.Context) (proto.Message, error) {
				list, err := cl.MachineClient.ServiceList(client.WithNode(ctx, "node-1"), &emptypb.Empty{})
				if err != nil || len(list.GetMessages()) == 0 {
					return nil, fmt.Errorf("no service list: %v", err)
				}
				// The first the agent manages (apid runs beside it).
				for _, svc := range list.GetMessages()[0].GetServices() {
					if svc.GetId() != "apid" {
						return cl.MachineClient.ServiceRestart(ctx, &machine.ServiceRestartRequest{Id: svc.GetId()})
					}
				}
				return nil, fmt.Errorf("no service to restart in %v", list)
			},
			"Time": func(ctx context.Context) (proto.Message, error) { return cl.TimeClient.Time(ctx, &emptypb.Empty{}) },
			"Version": func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.Version(ctx, &emptypb.Empty{})
			},
		}
		for name, call := range unary {
			resp, err := call(client.WithNodes(testkit.Context(t), nodes...))
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			if got := strings.Join(entries(resp), ","); got != want {
				t.Errorf("%s: entries %s, want %s", name, got, want)
			}
		}

		// Streams: each node's messages arrive stamped, the dead node is
		// one error message.
		streams := map[string]func(ctx context.Context) (grpc.ClientStream, func() (proto.Message, error), error){
			"List": func(ctx context.Context) (grpc.ClientStream, func() (proto.Message, error), error) {
				s, err := cl.MachineClient.List(ctx, &machine.ListRequest{Root: "/proc/self"})
				return s, func() (proto.Message, error) { return s.Recv() }, err
			},
			"DiskUsage": func(ctx context.Context) (grpc.ClientStream, func() (proto.Message, error), error) {
				s, err := cl.MachineClient.DiskUsage(ctx, &machine.DiskUsageRequest{Paths: []string{"/proc/self/fd"}})
				return s, func() (proto.Message, error) { return s.Recv() }, err
			},
			"Events": func(ctx context.Context) (grpc.ClientStream, func() (proto.Message, error), error) {
				s, err := cl.MachineClient.Events(ctx, &machine.EventsRequest{TailEvents: 3})
				return s, func() (proto.Message, error) { return s.Recv() }, err
			},
		}
		for name, open := range streams {
			ctx, cancel := context.WithTimeout(client.WithNodes(testkit.Context(t), nodes...), 3*time.Second)
			_, recv, err := open(ctx)
			if err != nil {
				cancel()
				t.Errorf("%s: %v", name, err)
				continue
			}
			seen := map[string]bool{}
			for {
				m, err := recv()
				if err != nil {
					// Events follow until the deadline; the others end.
					if err != io.EOF && !(name == "Events" && status.Code(err) == codes.DeadlineExceeded) {
						t.Errorf("%s: %v", name, err)
					}
					break
				}
				for _, e := range entries(m) {
					seen[e] = true
				}
				if name == "Events" && len(seen) == 3 {
					break
				}
			}
			cancel()
			var got []string
			for e := range seen {
				got = append(got, e)
			}
			slices.Sort(got)
			if strings.Join(got, ",") != dead+": error,node-1,node-3" {
				t.Errorf("%s: entries %v", name, got)
			}
		}

		// Lifecycle calls come last, one after the other: one simulated
		// operation runs at a time on a node (others get
		// FailedPrecondition), the gateway's disruption budget takes node-3
		// and node-1 down one after the other, and each comes back: the
		// next call goes once both run every service again.
		settled := func() bool {
			if c.disruptions("held") != 0 || c.disruptions("active") != 0 {
				return false // a node the last step took down is not back yet
			}
			resp, err := cl.ServiceList(client.WithNodes(testkit.Context(t), "node-1", "node-3"))
			if err != nil || len(resp.GetMessages()) != 2 {
				return false
			}
			for _, m := range resp.GetMessages() {
				if m.GetMetadata().GetError() != "" {
					return false
				}
				for _, svc := range m.GetServices() {
					if svc.GetState() != "Running" {
						return false
					}
				}
			}
			return true
		}
		for _, step := range []struct {
			name string
			call func(ctx context.Context) (proto.Message, error)
		}{
			{"Upgrade", func(ctx context.Context) (proto.Message, error) {
				//lint:ignore SA1019 released talosctl (v1.11, v1.13) upgrades through this call
				return cl.MachineClient.Upgrade(ctx, &machine.UpgradeRequest{Image: "example/installer:v0"})
			}},
			{"Shutdown", func(ctx context.Context) (proto.Message, error) {
				return cl.MachineClient.Shutdown(ctx, &machine.ShutdownRequest{})
			}},
		} {
			name, call := step.name, step.call
			if !testkit.Eventually(30*time.Second, settled) {
				t.Fatalf("before %s: node-1 and node-3 not running every service within 30s", name)
			}
			deadline := time.Now().Add(30 * time.Second)
			for {
				resp, err := call(client.WithNodes(testkit.Context(t), nodes...))
				if err != nil {
					t.Fatalf("%s: %v", name, err)
				}
				got := strings.Join(entries(resp), ",")
				if got == want {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("%s: entries %s, want %s (%s)", name, got, want, protojson.Format(resp))
				}
				time.Sleep(200 * time.Millisecond)
			}
		}

	})

	t.Run("reboot completes as talosctl waits for it", func(t *testing.T) {
		// What talosctl reboot (default --wait) does, through apid: read the
		// boot ID, watch the node's events, reboot it, wait for the machine
		// to be ready again, then compare boot IDs (the simulated machine's:
		// its reboot makes a new one).
		ctx, cancel := context.WithTimeout(client.WithNode(context.Background(), "node-2"), 20*time.Second)
		defer cancel()
		readBootID := func() string {
			r, err := cl.Read(ctx, "/proc/sys/kernel/random/boot_id")
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			b, err := io.ReadAll(r)
			if err != nil {
				t.Fatal(err)
			}
			return string(b)
		}
		before := readBootID()
		events := make(chan client.EventResult)
		if err := cl.EventsWatchV2(ctx, events); err != nil {
			t.Fatal(err)
		}
		resp, err := cl.RebootWithResponse(ctx)
		if err != nil {
			t.Fatal(err)
		}
		actor := resp.GetMessages()[0].GetActorId()
		var seen []string
		for ready := false; !ready; {
			select {
			case ev := <-events:
				if ev.Error != nil {
					t.Fatalf("events: %v", ev.Error)
				}
				switch p := ev.Event.Payload.(type) {
				case *machine.SequenceEvent:
					if ev.Event.ActorID == actor {
						seen = append(seen, p.GetSequence()+" "+p.GetAction().String())
					}
				case *machine.MachineStatusEvent:
					ready = p.GetStage() == machine.MachineStatusEvent_RUNNING && p.GetStatus().GetReady()
				}
			case <-ctx.Done():
				t.Fatalf("no ready event after the reboot; sequences seen %v", seen)
			}
		}
		if len(seen) == 0 || seen[0] != "reboot START" {
			t.Errorf("sequences of actor %s: %v", actor, seen)
		}
		if after := readBootID(); after == before || len(after) != 37 {
			t.Errorf("boot ID %q before the reboot, %q after", before, after)
		}
	})

	t.Run("services apid does not know pass through untouched", func(t *testing.T) {
		// The example agent serves no StorageService: its own
		// Unimplemented comes back, one-to-one and per node.
		if _, err := cl.Disks(client.WithNode(testkit.Context(t), "node-3")); status.Code(err) != codes.Unimplemented || !strings.Contains(err.Error(), "storage.StorageService") {
			t.Errorf("Storage one-to-one: %v", err)
		}
		resp, err := cl.StorageClient.Disks(client.WithNodes(testkit.Context(t), "node-1", "node-2"), &emptypb.Empty{})
		if err != nil || len(resp.GetMessages()) != 2 || !strings.Contains(resp.GetMessages()[1].GetMetadata().GetError(), "Unimplemented") {
			t.Errorf("Storage fan-out: %v, %v", resp, err)
		}
	})
}

// clientWithRoles is an official client of the demo whose certificate,
// from the demo's CA, carries roles.
func (c *cluster) clientWithRoles(t *testing.T, cn string, roles ...string) *client.Client {
	t.Helper()
	ca, err := pki.ReadCA(filepath.Join(c.dir, "ca.crt"), filepath.Join(c.dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	certPEM, keyPEM, err := ca.IssueClient(cn, roles, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca.Cert)
	cl, err := client.New(context.Background(), client.WithEndpoints(c.endpoint(0)), client.WithTLSConfig(clientTLS(pool, &pair)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// TestMultiplexingClient drives the demo as talosctl since v1.14 does: no
// nodes header ever, one concurrent node call per -n value over one
// connection. maxNodes (1,000) such calls at once from one identity fit
// its limits; a group sent as node is served as the group's fan-out.
func TestMultiplexingClient(t *testing.T) {
	c := startDemo(t, 83, 5)
	cl := c.client(t, c.endpoint(0))
	const calls = 1000 // the default maxNodes: one -n list's worth
	names := []string{"node-1", "node-2", "node-3", "node-4", "node-5"}
	var wg sync.WaitGroup
	errs := make(chan error, calls)
	for i := range calls {
		wg.Go(func() {
			node := names[i%len(names)]
			resp, err := cl.Version(client.WithNode(testkit.Context(t), node))
			switch {
			case err != nil:
				errs <- fmt.Errorf("%s: %w", node, err)
			case len(resp.GetMessages()) != 1 || resp.GetMessages()[0].GetVersion().GetTag() == "":
				errs <- fmt.Errorf("%s: reply %v", node, resp)
			}
		})
	}
	wg.Wait()
	close(errs)
	failed := 0
	for err := range errs {
		if failed++; failed <= 3 {
			t.Errorf("%v", err)
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d multiplexed calls failed", failed, calls)
	}

	// -n @controlplane as a multiplexing client sends it.
	resp, err := cl.Version(client.WithNode(testkit.Context(t), "@controlplane"))
	if err != nil {
		t.Fatal(err)
	}
	if got := strings.Join(entries(resp), ","); got != "node-1,node-2,node-3" {
		t.Errorf("node: @controlplane gave %s, want the three control-plane nodes stamped", got)
	}
}
