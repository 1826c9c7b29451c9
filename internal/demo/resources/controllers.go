package resources

import (
	"context"
	"errors"
	"io"

	"github.com/cosi-project/runtime/pkg/controller"
	cosiruntime "github.com/cosi-project/runtime/pkg/controller/runtime"
	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/cosi-project/runtime/pkg/state"
	"github.com/siderolabs/gen/optional"
	"github.com/siderolabs/talos/pkg/machinery/api/inspect"
	configmachine "github.com/siderolabs/talos/pkg/machinery/config/machine"
	"github.com/siderolabs/talos/pkg/machinery/resources/cluster"
	"github.com/siderolabs/talos/pkg/machinery/resources/config"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"
)

// The resources the machine configuration decides are kept true by
// controllers in the public COSI controller runtime, as in Talos: the
// machine type and the cluster's identity follow every applied
// configuration. InspectService's dependency graph (talosctl inspect
// dependencies) is that runtime's.

// configInput is the machine configuration as a controller's input.
var configInput = controller.Input{Namespace: config.NamespaceName, Type: config.MachineConfigType, ID: optional.Some(config.ActiveID), Kind: controller.InputWeak}

// machineTypeController derives the machine type from the configuration
// (or, without one, from the node's entry among the members).
type machineTypeController struct{ fallback configmachine.Type }

func (machineTypeController) Name() string               { return "config.MachineTypeController" }
func (machineTypeController) Inputs() []controller.Input { return []controller.Input{configInput} }
func (machineTypeController) Outputs() []controller.Output {
	return []controller.Output{{Type: config.MachineTypeType, Kind: controller.OutputExclusive}}
}

func (c machineTypeController) Run(ctx context.Context, r controller.Runtime, _ *zap.Logger) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.EventCh():
		}
		t := c.fallback
		mc, err := safe.ReaderGetByID[*config.MachineConfig](ctx, r, config.ActiveID)
		switch {
		case err == nil && mc.Config().Machine() != nil:
			t = mc.Config().Machine().Type()
		case err != nil && !state.IsNotFoundError(err):
			return err
		}
		if err := safe.WriterModify(ctx, r, config.NewMachineType(), func(m *config.MachineType) error {
			m.SetMachineType(t)
			return nil
		}); err != nil {
			return err
		}
	}
}

// clusterInfoController derives the cluster's identity from the
// configuration (or, without one, names it after the agent's cluster).
type clusterInfoController struct{ name, id string }

func (clusterInfoController) Name() string               { return "cluster.InfoController" }
func (clusterInfoController) Inputs() []controller.Input { return []controller.Input{configInput} }
func (clusterInfoController) Outputs() []controller.Output {
	return []controller.Output{{Type: cluster.InfoType, Kind: controller.OutputExclusive}}
}

func (c clusterInfoController) Run(ctx context.Context, r controller.Runtime, _ *zap.Logger) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-r.EventCh():
		}
		name, id := c.name, c.id
		mc, err := safe.ReaderGetByID[*config.MachineConfig](ctx, r, config.ActiveID)
		switch {
		case err == nil && mc.Config().Cluster() != nil:
			name, id = mc.Config().Cluster().Name(), mc.Config().Cluster().ID()
		case err != nil && !state.IsNotFoundError(err):
			return err
		}
		if err := safe.WriterModify(ctx, r, cluster.NewInfo(), func(info *cluster.Info) error {
			info.TypedSpec().ClusterName, info.TypedSpec().ClusterID = name, id
			return nil
		}); err != nil {
			return err
		}
	}
}

// StartControllers runs the controllers on the resource state until ctx
// ends, logging to log (as Talos serves it: talosctl logs
// controller-runtime); done is closed when the runtime has stopped.
func (r *API) StartControllers(ctx context.Context, log io.Writer) (done <-chan struct{}, err error) {
	cfg, self := r.cfg, selfMember(r.cfg)
	// The runtime's log, as Talos serves it (talosctl logs controller-runtime).
	enc := zap.NewDevelopmentEncoderConfig()
	enc.EncodeTime = zapcore.RFC3339NanoTimeEncoder
	logger := zap.New(zapcore.NewCore(zapcore.NewConsoleEncoder(enc), zapcore.AddSync(log), zap.DebugLevel))
	rt, err := cosiruntime.NewRuntime(r.st, logger)
	if err != nil {
		return nil, err
	}
	mt := configmachine.TypeWorker
	if self != nil && self.ControlPlane {
		mt = configmachine.TypeControlPlane
	}
	for _, c := range []controller.Controller{
		machineTypeController{fallback: mt},
		clusterInfoController{name: cfg.ClusterName, id: nodeID("cluster " + cfg.ClusterName)},
	} {
		if err := rt.RegisterController(c); err != nil {
			return nil, err
		}
	}
	r.rt = rt
	stopped := make(chan struct{})
	go func() {
		defer close(stopped)
		_ = rt.Run(ctx)
	}()
	return stopped, nil
}

// inspectServer serves InspectService from the controller runtime.
type inspectServer struct {
	inspect.UnimplementedInspectServiceServer
	r *API
}

// edgeTypes maps the runtime's edge kinds to the API's (whose numbers
// differ).
var edgeTypes = map[controller.DependencyEdgeType]inspect.DependencyEdgeType{
	controller.EdgeOutputExclusive:   inspect.DependencyEdgeType_OUTPUT_EXCLUSIVE,
	controller.EdgeOutputShared:      inspect.DependencyEdgeType_OUTPUT_SHARED,
	controller.EdgeInputStrong:       inspect.DependencyEdgeType_INPUT_STRONG,
	controller.EdgeInputWeak:         inspect.DependencyEdgeType_INPUT_WEAK,
	controller.EdgeInputDestroyReady: inspect.DependencyEdgeType_INPUT_DESTROY_READY,
}

// ControllerRuntimeDependencies is the controllers' graph: what each
// reads and writes.
func (i inspectServer) ControllerRuntimeDependencies(context.Context, *emptypb.Empty) (*inspect.ControllerRuntimeDependenciesResponse, error) {
	if i.r == nil || i.r.rt == nil {
		return nil, errors.New("the controller runtime is not running")
	}
	graph, err := i.r.rt.GetDependencyGraph()
	if err != nil {
		return nil, err
	}
	out := &inspect.ControllerRuntimeDependency{}
	for _, e := range graph.Edges {
		out.Edges = append(out.Edges, &inspect.ControllerDependencyEdge{
			ControllerName: e.ControllerName, EdgeType: edgeTypes[e.EdgeType],
			ResourceNamespace: e.ResourceNamespace, ResourceType: e.ResourceType, ResourceId: e.ResourceID,
		})
	}
	return &inspect.ControllerRuntimeDependenciesResponse{Messages: []*inspect.ControllerRuntimeDependency{out}}, nil
}

func (i inspectServer) register(g *grpc.Server) { inspect.RegisterInspectServiceServer(g, i) }
