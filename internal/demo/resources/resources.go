package resources

import (
	"context"
	"crypto/sha256"
	"encoding/base32"
	"net/netip"
	"os"
	"slices"
	"strings"

	cosiapi "github.com/cosi-project/runtime/api/v1alpha1"
	cosiruntime "github.com/cosi-project/runtime/pkg/controller/runtime"
	"github.com/cosi-project/runtime/pkg/resource"
	"github.com/cosi-project/runtime/pkg/resource/meta"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/cosi-project/runtime/pkg/state/impl/inmem"
	"github.com/cosi-project/runtime/pkg/state/impl/namespaced"
	cosiserver "github.com/cosi-project/runtime/pkg/state/protobuf/server"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosconfig "github.com/siderolabs/talos/pkg/machinery/config"
	configmachine "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/resources/cluster"
	"github.com/siderolabs/talos/pkg/machinery/resources/config"
	"github.com/siderolabs/talos/pkg/machinery/resources/hardware"
	"github.com/siderolabs/talos/pkg/machinery/resources/network"
	"github.com/siderolabs/talos/pkg/machinery/resources/runtime"
	"github.com/siderolabs/talos/pkg/machinery/resources/v1alpha1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/apid/apid/internal/demo/caller"
	"github.com/apid/apid/internal/demo/identity"
)

// Member is a node of the cluster as the resource API's cluster members
// show it (`talosctl get members`).
type Member struct {
	Hostname     string
	Addresses    []string
	ControlPlane bool
}

// Config describes the node whose resources an API serves.
type Config struct {
	// Hostname is the node's name, which its entry among the members has.
	Hostname string
	// ClusterName names the cluster until a machine configuration does.
	ClusterName string
	// Members are the cluster's nodes.
	Members []Member
}

// API is the node's resource API: its resource state, the controllers that
// keep part of it, and the gRPC services that serve it. Create it with
// [New]; it is safe for concurrent use.
type API struct {
	cfg Config
	st  state.State
	rt  *cosiruntime.Runtime // nil until StartControllers
}

// New makes the state with its namespaces, the definitions of the types it
// holds, and the resources the configuration describes.
func New(cfg Config) (*API, error) {
	r := &API{cfg: cfg, st: state.WrapCore(namespaced.NewState(inmem.Build))}
	ctx := context.Background()
	for _, ns := range []struct {
		id   resource.Namespace
		desc string
	}{
		{meta.NamespaceName, "Metadata namespace which contains resource and namespace definitions."},
		{v1alpha1.NamespaceName, "Talos v1alpha1 subsystems glue resources."},
		{cluster.NamespaceName, "Cluster configuration and discovery resources."},
		{network.NamespaceName, "Networking resources."},
		{config.NamespaceName, "Talos node configuration."},
		{hardware.NamespaceName, "Hardware resources."},
	} {
		if err := r.st.Create(ctx, meta.NewNamespace(ns.id, meta.NamespaceSpec{Description: ns.desc})); err != nil {
			return nil, err
		}
	}
	for _, res := range []meta.ResourceDefinitionProvider{
		&meta.ResourceDefinition{}, &meta.Namespace{},
		&cluster.Member{}, &cluster.Info{}, &network.HostnameStatus{}, &network.NodeAddress{}, &network.ResolverStatus{},
		&network.TimeServerStatus{}, &network.Status{}, &v1alpha1.Service{}, &runtime.MachineStatus{}, &runtime.Version{}, &runtime.SecurityState{},
		config.NewMachineType(), &hardware.SystemInformation{}, &config.MachineConfig{},
	} {
		rd, err := meta.NewResourceDefinition(res.ResourceDefinition())
		if err != nil {
			return nil, err
		}
		if err := r.st.Create(ctx, rd); err != nil {
			return nil, err
		}
	}

	host := network.NewHostnameStatus(network.NamespaceName, network.HostnameID)
	name, domain, _ := strings.Cut(cfg.Hostname, ".")
	host.TypedSpec().Hostname, host.TypedSpec().Domainname = name, domain
	if err := r.st.Create(ctx, host); err != nil {
		return nil, err
	}
	for _, res := range r.node() {
		if err := r.st.Create(ctx, res); err != nil {
			return nil, err
		}
	}
	if err := r.SetMembers(cfg.Members); err != nil {
		return nil, err
	}
	return r, nil
}

// SetMembers makes the cluster's members those of ms: new ones created,
// changed ones updated, gone ones destroyed, so that a watch sees members
// join and leave (as a Talos node's discovery sees nodes join and leave).
func (r *API) SetMembers(ms []Member) error {
	ctx := context.Background()
	keep := map[resource.ID]bool{}
	for _, m := range ms {
		keep[m.Hostname] = true
		if err := safe.StateModify(ctx, r.st, cluster.NewMember(cluster.NamespaceName, m.Hostname), func(res *cluster.Member) error {
			spec := res.TypedSpec()
			// As a Talos node reports its OS: the version of the API it follows.
			spec.NodeID, spec.Hostname, spec.OperatingSystem = nodeID(m.Hostname), m.Hostname, "Talos ("+identity.MachineryVersion()+")"
			spec.MachineType = configmachine.TypeWorker
			if m.ControlPlane {
				spec.MachineType = configmachine.TypeControlPlane
			}
			spec.Addresses = nil
			for _, a := range m.Addresses {
				if ip, err := netip.ParseAddr(a); err == nil {
					spec.Addresses = append(spec.Addresses, ip)
				}
			}
			return nil
		}); err != nil {
			return err
		}
	}
	current, err := safe.StateListAll[*cluster.Member](ctx, r.st)
	if err != nil {
		return err
	}
	for m := range current.All() {
		if !keep[m.Metadata().ID()] {
			if err := r.st.Destroy(ctx, m.Metadata()); err != nil {
				return err
			}
		}
	}
	return nil
}

// node returns the resources that describe this node, as the dashboard's
// summary reads them: its addresses (from its entry among the members),
// version, resolvers, time servers (none: the agent keeps no time),
// machine identity and network status. Its role and the cluster's
// identity are the controllers' (controllers.go).
func (r *API) node() []resource.Resource {
	cfg := r.cfg
	self := selfMember(cfg)
	var prefixes []netip.Prefix
	if self != nil {
		for _, a := range self.Addresses {
			if ip, err := netip.ParseAddr(a); err == nil {
				prefixes = append(prefixes, netip.PrefixFrom(ip, ip.BitLen()))
			}
		}
	}
	var out []resource.Resource
	// The node's addresses as Talos sorts them: all of them, the current
	// ones, those routed (what the dashboard shows as IP).
	for _, id := range []resource.ID{network.NodeAddressDefaultID, network.NodeAddressCurrentID, network.NodeAddressRoutedID, network.NodeAddressAccumulativeID} {
		addrs := network.NewNodeAddress(network.NamespaceName, id)
		addrs.TypedSpec().Addresses = slices.Clone(prefixes)
		out = append(out, addrs)
	}
	ver := runtime.NewVersion()
	ver.TypedSpec().Version, ver.TypedSpec().Name = identity.VersionTag, "Talos (apid example agent)"
	resolvers := network.NewResolverStatus(network.NamespaceName, network.ResolverID)
	resolvers.TypedSpec().DNSServers, resolvers.TypedSpec().SearchDomains = resolvConf("/etc/resolv.conf")
	sys := hardware.NewSystemInformation(hardware.SystemInformationID)
	sys.TypedSpec().UUID = readLine("/sys/class/dmi/id/product_uuid")
	if sys.TypedSpec().UUID == "" {
		sys.TypedSpec().UUID = nodeID("uuid " + cfg.Hostname)
	}
	sys.TypedSpec().Manufacturer, sys.TypedSpec().ProductName = readLine("/sys/class/dmi/id/sys_vendor"), readLine("/sys/class/dmi/id/product_name")
	netStatus := network.NewStatus(network.NamespaceName, network.StatusID)
	*netStatus.TypedSpec() = network.StatusSpec{AddressReady: true, ConnectivityReady: true, HostnameReady: true, EtcFilesReady: true}
	// No secure boot, no UKI, no SELinux: the simulated machine boots
	// nothing. (Talos's own tests wait for this resource before any other.)
	return append(out, runtime.NewSecurityStateSpec(runtime.NamespaceName), ver, resolvers, network.NewTimeServerStatus(network.NamespaceName, network.TimeServerID), sys, netStatus)
}

// selfMember is the node's own entry among the members, if any.
func selfMember(cfg Config) *Member {
	for i, m := range cfg.Members {
		if m.Hostname == cfg.Hostname {
			return &cfg.Members[i]
		}
	}
	return nil
}

// resolvConf returns the name servers and search domains of a
// resolv.conf.
func resolvConf(path string) (servers []netip.Addr, search []string) {
	b, _ := os.ReadFile(path)
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		switch {
		case len(f) >= 2 && f[0] == "nameserver":
			if ip, err := netip.ParseAddr(f[1]); err == nil {
				servers = append(servers, ip)
			}
		case len(f) >= 2 && f[0] == "search":
			search = append(search, f[1:]...)
		}
	}
	return servers, search
}

// readLine returns the first line of a small sysfs file, or "".
func readLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSpace(line)
}

// nodeID derives a stable node ID from a hostname (Talos makes a random
// one per machine; the demo's nodes are known by name).
func nodeID(hostname string) string {
	sum := sha256.Sum256([]byte("apid example agent node " + hostname))
	return strings.ToLower(base32.StdEncoding.WithPadding(base32.NoPadding).EncodeToString(sum[:20]))
}

// Reflect updates the resources an event of the machine describes: a
// service's state, the machine's stage.
func (r *API) Reflect(payload proto.Message) {
	ctx := context.Background()
	switch p := payload.(type) {
	case *machine.ServiceStateEvent:
		_ = safe.StateModify(ctx, r.st, v1alpha1.NewService(p.GetService()), func(s *v1alpha1.Service) error {
			spec := s.TypedSpec()
			spec.Running = p.GetAction() == machine.ServiceStateEvent_RUNNING
			spec.Healthy = p.GetHealth().GetHealthy()
			spec.Unknown = p.GetHealth().GetUnknown()
			return nil
		})
	case *machine.MachineStatusEvent:
		_ = safe.StateModify(ctx, r.st, runtime.NewMachineStatus(), func(m *runtime.MachineStatus) error {
			spec := m.TypedSpec()
			spec.Stage = runtime.MachineStage(p.GetStage())
			spec.Status.Ready = p.GetStatus().GetReady()
			spec.Status.UnmetConditions = nil
			for _, u := range p.GetStatus().GetUnmetConditions() {
				spec.Status.UnmetConditions = append(spec.Status.UnmetConditions, runtime.UnmetCondition{Name: u.GetName(), Reason: u.GetReason()})
			}
			return nil
		})
	}
}

// Register serves the state as cosi.resource.State and the controllers'
// graph as InspectService on g.
func (r *API) Register(g *grpc.Server) {
	cosiapi.RegisterStateServer(g, cosiserver.NewState(r.st))
	inspectServer{r: r}.register(g)
}

// cosiWrites are the resource API's methods that change state: refused,
// as Talos refuses them to API clients.
var cosiWrites = []string{"Create", "Update", "Destroy", "Teardown", "AddFinalizer", "RemoveFinalizer"}

const cosiService = "/cosi.resource.State/"

// cosiAccess refuses what Talos's access rules refuse through the API:
// writes, and reads of a sensitive type (its definition says so) by a
// caller whose forwarded roles (talos-role) lack os:admin. A caller with no
// forwarded roles is this socket's peer, trusted as machined trusts apid.
func (r *API) cosiAccess(ctx context.Context, fullMethod string, req any) error {
	method, ok := strings.CutPrefix(fullMethod, cosiService)
	if !ok {
		return nil
	}
	if slices.Contains(cosiWrites, method) {
		return status.Errorf(codes.PermissionDenied, "not authorized: %s: resources are read-only through the API", fullMethod)
	}
	typed, ok := req.(interface{ GetType() string })
	if !ok {
		return nil
	}
	roles := caller.Roles(ctx)
	if len(roles) == 0 || slices.Contains(roles, caller.Admin) {
		return nil
	}
	rd, err := safe.StateGetByID[*meta.ResourceDefinition](ctx, r.st, strings.ToLower(typed.GetType()))
	if err == nil && rd.TypedSpec().Sensitivity == meta.Sensitive {
		return status.Errorf(codes.PermissionDenied, "not authorized: %s is sensitive: os:admin only", typed.GetType())
	}
	return nil
}

// UnaryAccess applies the resource API's access rules to unary calls.
func (r *API) UnaryAccess(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := r.cosiAccess(ctx, info.FullMethod, req); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

// StreamAccess applies them to streams, on the request as it is read.
func (r *API) StreamAccess(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if !strings.HasPrefix(info.FullMethod, cosiService) {
		return handler(srv, ss)
	}
	return handler(srv, &checkedStream{ServerStream: ss, check: func(m any) error { return r.cosiAccess(ss.Context(), info.FullMethod, m) }})
}

// checkedStream checks each message it receives.
type checkedStream struct {
	grpc.ServerStream
	check func(m any) error
}

func (c *checkedStream) RecvMsg(m any) error {
	if err := c.ServerStream.RecvMsg(m); err != nil {
		return err
	}
	return c.check(m)
}

// PutMachineConfig creates or replaces the machineconfig resource: the
// active machine configuration.
func (r *API) PutMachineConfig(cfg talosconfig.Provider) error {
	ctx := context.Background()
	next := config.NewMachineConfigWithID(cfg, config.ActiveID)
	cur, err := r.st.Get(ctx, next.Metadata())
	switch {
	case state.IsNotFoundError(err):
		return r.st.Create(ctx, next)
	case err != nil:
		return err
	}
	next.Metadata().SetVersion(cur.Metadata().Version())
	return r.st.Update(ctx, next)
}
