package director

import (
	"strings"

	"github.com/apid/apid/proxy"
)

// defaultKinds lists the streaming methods of the Talos API. Every other
// method is unary, except that by convention a method whose name ends in
// "Stream" streams its replies.
var defaultKinds = map[string]proxy.Kind{
	"/machine.MachineService/Copy":          proxy.ServerStream,
	"/machine.MachineService/DiskUsage":     proxy.ServerStream,
	"/machine.MachineService/Dmesg":         proxy.ServerStream,
	"/machine.MachineService/EtcdSnapshot":  proxy.ServerStream,
	"/machine.MachineService/Events":        proxy.ServerStream,
	"/machine.MachineService/ImageList":     proxy.ServerStream,
	"/machine.MachineService/Kubeconfig":    proxy.ServerStream,
	"/machine.MachineService/List":          proxy.ServerStream,
	"/machine.MachineService/Logs":          proxy.ServerStream,
	"/machine.MachineService/PacketCapture": proxy.ServerStream,
	"/machine.MachineService/Read":          proxy.ServerStream,
	"/machine.MachineService/EtcdRecover":   proxy.ClientStream,
	"/cluster.ClusterService/HealthCheck":   proxy.ServerStream,
	"/machine.LifecycleService/Install":     proxy.ServerStream,
	"/machine.LifecycleService/Upgrade":     proxy.ServerStream,
	"/os.OSService/Dmesg":                   proxy.ServerStream,
}

// methodKinds answers what shape a method has.
type methodKinds map[string]proxy.Kind

func newMethodKinds(serverStreaming, clientStreaming, bidi []string) methodKinds {
	k := make(methodKinds, len(defaultKinds)+len(serverStreaming)+len(clientStreaming)+len(bidi))
	for m, kind := range defaultKinds {
		k[m] = kind
	}
	for _, m := range serverStreaming {
		k[m] = proxy.ServerStream
	}
	for _, m := range clientStreaming {
		k[m] = proxy.ClientStream
	}
	for _, m := range bidi {
		k[m] = proxy.BidiStream
	}
	return k
}

func (k methodKinds) kind(fullMethod string) proxy.Kind {
	if kind, ok := k[fullMethod]; ok {
		return kind
	}
	if strings.HasSuffix(fullMethod, "Stream") {
		return proxy.ServerStream
	}
	return proxy.Unary
}
