package director

import (
	"fmt"

	// The APIs whose descriptors say what each method is: Talos's
	// machinery services, the COSI resource state, gRPC health and reflection.
	_ "github.com/cosi-project/runtime/api/v1alpha1"
	_ "github.com/siderolabs/talos/pkg/machinery/api/cluster"
	_ "github.com/siderolabs/talos/pkg/machinery/api/inspect"
	_ "github.com/siderolabs/talos/pkg/machinery/api/machine"
	_ "github.com/siderolabs/talos/pkg/machinery/api/security"
	_ "github.com/siderolabs/talos/pkg/machinery/api/storage"
	_ "github.com/siderolabs/talos/pkg/machinery/api/time"
	_ "google.golang.org/grpc/health/grpc_health_v1"
	_ "google.golang.org/grpc/reflection/grpc_reflection_v1"
	_ "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	"github.com/apid/apid/proxy"
)

// Method is what routing knows of one method: its shape, and whether its
// replies carry common.Metadata first, which is what lets one-to-many stamp
// and merge them.
type Method struct {
	Kind    proxy.Kind
	Stamped bool
	// Known: the method is in the compiled descriptors or the
	// configuration. An unknown method (a newer Talos's, say) has a shape
	// apid cannot guess: one-to-one relays every frame both ways, as a
	// bidirectional stream does whatever the method's real shape, and it
	// never fans out.
	Known bool
}

// apiMethods is every method of every service compiled into apid, read
// from the protobuf descriptors: the one source of a method's shape
// (routing, metrics and the policy's tests read it here).
var apiMethods = describeMethods(protoregistry.GlobalFiles)

// legacyServerStreams are streaming methods of older Talos releases that
// the descriptors no longer hold, still sent by old clients.
var legacyServerStreams = []string{"/os.OSService/Dmesg"}

func describeMethods(files *protoregistry.Files) map[string]Method {
	out := map[string]Method{}
	files.RangeFiles(func(f protoreflect.FileDescriptor) bool {
		for i := range f.Services().Len() {
			s := f.Services().Get(i)
			for j := range s.Methods().Len() {
				m := s.Methods().Get(j)
				out[fmt.Sprintf("/%s/%s", s.FullName(), m.Name())] = Method{
					Kind:    kindOf(m.IsStreamingClient(), m.IsStreamingServer()),
					Stamped: stamped(m.Output(), m.IsStreamingServer()),
					Known:   true,
				}
			}
		}
		return true
	})
	for _, m := range legacyServerStreams {
		out[m] = Method{Kind: proxy.ServerStream, Stamped: true, Known: true}
	}
	return out
}

func kindOf(client, server bool) proxy.Kind {
	switch {
	case client && server:
		return proxy.BidiStream
	case client:
		return proxy.ClientStream
	case server:
		return proxy.ServerStream
	}
	return proxy.Unary
}

// stamped reports whether replies of type m carry the node's
// common.Metadata as field 1: a streamed message directly, a unary reply
// in each entry of its repeated field 1.
func stamped(m protoreflect.MessageDescriptor, streamed bool) bool {
	const metadata = "common.Metadata"
	f := m.Fields().ByNumber(1)
	if f == nil || f.Message() == nil {
		return false
	}
	if streamed {
		return f.Message().FullName() == metadata && !f.IsList()
	}
	entry := f.Message().Fields().ByNumber(1)
	return f.IsList() && entry != nil && entry.Message() != nil && entry.Message().FullName() == metadata && !entry.IsList()
}

// methodKinds answers what a method is: the descriptors', with the
// configuration's methods laid over them.
type methodKinds map[string]Method

func newMethodKinds(unary, serverStreaming, clientStreaming, bidi []string) methodKinds {
	if len(unary)+len(serverStreaming)+len(clientStreaming)+len(bidi) == 0 {
		return apiMethods
	}
	k := make(methodKinds, len(apiMethods)+len(unary)+len(serverStreaming)+len(clientStreaming)+len(bidi))
	for m, info := range apiMethods {
		k[m] = info
	}
	// Methods declared in the configuration follow the layout fan-out
	// needs: that is why they are declared.
	for _, list := range []struct {
		kind    proxy.Kind
		methods []string
	}{{proxy.Unary, unary}, {proxy.ServerStream, serverStreaming}, {proxy.ClientStream, clientStreaming}, {proxy.BidiStream, bidi}} {
		for _, m := range list.methods {
			k[m] = Method{Kind: list.kind, Stamped: true, Known: true}
		}
	}
	return k
}

func (k methodKinds) method(fullMethod string) Method {
	if m, ok := k[fullMethod]; ok {
		return m
	}
	return Method{Kind: proxy.BidiStream}
}

func (k methodKinds) kind(fullMethod string) proxy.Kind { return k.method(fullMethod).Kind }

// Describe returns what apid knows of a method from the compiled
// descriptors, without the configuration's additions.
func Describe(fullMethod string) Method { return methodKinds(apiMethods).method(fullMethod) }

// singleNodeMethods are the methods talosctl never sends to several nodes
// (it refuses -n a,b for them: read, cp, kubeconfig, pcap, config new,
// inspect dependencies, etcd snapshot, defrag, leave and downgrade, as
// its FailIfMultiNodes guard in v1.13 lists them). A group reaches the
// gateway as one -n value that talosctl cannot see through, so the
// gateway keeps the guard for groups: an etcd leave must never reach every
// member because @controlplane slipped past the client.
var singleNodeMethods = map[string]string{
	"/machine.MachineService/Read":                          "read",
	"/machine.MachineService/Copy":                          "cp",
	"/machine.MachineService/Kubeconfig":                    "kubeconfig",
	"/machine.MachineService/PacketCapture":                 "pcap",
	"/machine.MachineService/GenerateClientConfiguration":   "config new",
	"/inspect.InspectService/ControllerRuntimeDependencies": "inspect dependencies",
	"/machine.MachineService/EtcdSnapshot":                  "etcd snapshot",
	"/machine.MachineService/EtcdDefragment":                "etcd defrag",
	"/machine.MachineService/EtcdLeaveCluster":              "etcd leave",
	"/machine.MachineService/EtcdDowngradeValidate":         "etcd downgrade validate",
	"/machine.MachineService/EtcdDowngradeEnable":           "etcd downgrade enable",
	"/machine.MachineService/EtcdDowngradeCancel":           "etcd downgrade cancel",
}
