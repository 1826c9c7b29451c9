package gateway

import (
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/reflection"
	reflectionv1 "google.golang.org/grpc/reflection/grpc_reflection_v1"
	reflectionv1alpha "google.golang.org/grpc/reflection/grpc_reflection_v1alpha"
)

// registerReflection serves gRPC server reflection from the gateway itself:
// the services a client can reach through it, those apid serves (health,
// the cluster health check) and those the policy names (the node API), with
// the descriptors compiled into apid. The local agent's own reflection
// would list only the node's services.
func (g *Gateway) registerReflection(srv *grpc.Server) {
	opts := reflection.ServerOptions{Services: reachable{g, srv}}
	reflectionv1.RegisterServerReflectionServer(srv, reflection.NewServerV1(opts))
	reflectionv1alpha.RegisterServerReflectionServer(srv, reflection.NewServer(opts))
}

// reachable lists the services a client may call through the gateway.
type reachable struct {
	g   *Gateway
	srv *grpc.Server
}

func (r reachable) GetServiceInfo() map[string]grpc.ServiceInfo {
	out := r.srv.GetServiceInfo() // health, cluster, reflection
	for _, svc := range r.g.policy.Policy().Services() {
		if _, ok := out[svc]; !ok && knownService(svc) {
			out[svc] = grpc.ServiceInfo{}
		}
	}
	return out
}

// knownService reports whether a descriptor of svc is compiled in (a policy
// rule may name a service apid has no descriptor for).
func knownService(svc string) bool {
	prefix := "/" + svc + "/"
	for m := range knownMethods {
		if strings.HasPrefix(m, prefix) {
			return true
		}
	}
	return false
}
