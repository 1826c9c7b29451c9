package machineconfig_test

import (
	"strings"
	"testing"
	"time"

	"github.com/cosi-project/runtime/pkg/safe"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/config"
	"github.com/siderolabs/talos/pkg/machinery/config/encoder"
	"github.com/siderolabs/talos/pkg/machinery/config/generate"
	"github.com/siderolabs/talos/pkg/machinery/config/generate/secrets"
	configmachine "github.com/siderolabs/talos/pkg/machinery/config/machine"
	clusterres "github.com/siderolabs/talos/pkg/machinery/resources/cluster"
	configres "github.com/siderolabs/talos/pkg/machinery/resources/config"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

// machineConfig generates a control-plane configuration as talosctl gen
// config does, for cluster name.
func machineConfig(t *testing.T, name string) []byte {
	t.Helper()
	bundle, err := secrets.NewBundle(secrets.NewClock(), config.TalosVersionCurrent)
	if err != nil {
		t.Fatal(err)
	}
	in, err := generate.NewInput(name, "https://127.0.0.1:6443", "1.36.3", generate.WithSecretsBundle(bundle))
	if err != nil {
		t.Fatal(err)
	}
	cfg, err := in.Config(configmachine.TypeControlPlane)
	if err != nil {
		t.Fatal(err)
	}
	b, err := cfg.EncodeBytes(encoder.WithComments(encoder.CommentsDisabled))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestApplyConfiguration: what talosctl apply-config does, in each mode,
// and what machineconfig then holds.
func TestApplyConfiguration(t *testing.T) {
	first, second := machineConfig(t, "first"), machineConfig(t, "second")
	// No downtime: the reboot that applies the staged configuration is
	// not what is tested, and the node refuses calls while down.
	c, _ := nodetest.OfficialClient(t, node.Config{MachineConfig: first, Downtime: -1})
	ctx := testkit.Context(t)
	admin := metadata.AppendToOutgoingContext(ctx, "talos-role", "os:admin")
	reader := metadata.AppendToOutgoingContext(ctx, "talos-role", "os:reader")
	apply := func(req *machine.ApplyConfigurationRequest) (*machine.ApplyConfiguration, error) {
		resp, err := c.ApplyConfiguration(admin, req)
		if err != nil {
			return nil, err
		}
		return resp.GetMessages()[0], nil
	}
	clusterName := func() string {
		t.Helper()
		mc, err := safe.StateGetByID[*configres.MachineConfig](admin, c.COSI, configres.ActiveID)
		if err != nil {
			t.Fatal(err)
		}
		return mc.Config().Cluster().Name()
	}
	if got := clusterName(); got != "first" {
		t.Fatalf("initial configuration of cluster %q", got)
	}

	// Bad documents: the loader's words, InvalidArgument.
	_, err := apply(&machine.ApplyConfigurationRequest{Data: []byte("bad: x\n")})
	nodetest.WantCode(t, err, codes.InvalidArgument)
	if !strings.Contains(err.Error(), "missing kind") {
		t.Errorf("bad document: %v", err)
	}
	// A reader may neither apply nor read the configuration.
	_, err = c.ApplyConfiguration(reader, &machine.ApplyConfigurationRequest{Data: second})
	nodetest.WantCode(t, err, codes.PermissionDenied)
	if _, err := safe.StateGetByID[*configres.MachineConfig](reader, c.COSI, configres.ActiveID); err == nil || !strings.Contains(err.Error(), "sensitive") {
		t.Errorf("reader reading machineconfig: %v", err)
	}

	// Dry run: the diff, nothing applied.
	dry, err := apply(&machine.ApplyConfigurationRequest{Data: second, DryRun: true, Mode: machine.ApplyConfigurationRequest_AUTO})
	if err != nil || !strings.Contains(dry.GetModeDetails(), "Dry run summary") || !strings.Contains(dry.GetModeDetails(), "-    clusterName: first") {
		t.Fatalf("dry run: %v\n%s", err, dry.GetModeDetails())
	}
	if clusterName() != "first" {
		t.Fatal("a dry run applied the configuration")
	}

	// Auto: in place.
	got, err := apply(&machine.ApplyConfigurationRequest{Data: second, Mode: machine.ApplyConfigurationRequest_AUTO})
	if err != nil || got.GetMode() != machine.ApplyConfigurationRequest_NO_REBOOT || clusterName() != "second" {
		t.Fatalf("auto: %v, %v, cluster %s", got, err, clusterName())
	}
	// The cluster's identity follows the configuration (its controller).
	if !testkit.Eventually(5*time.Second, func() bool {
		info, err := safe.StateGetByID[*clusterres.Info](admin, c.COSI, clusterres.InfoID)
		return err == nil && info.TypedSpec().ClusterName == "second"
	}) {
		t.Error("cluster info did not follow the applied configuration")
	}

	// Try: applied, then rolled back after its timeout.
	got, err = apply(&machine.ApplyConfigurationRequest{Data: first, Mode: machine.ApplyConfigurationRequest_TRY, TryModeTimeout: durationpb.New(300 * time.Millisecond)})
	if err != nil || !strings.Contains(got.GetModeDetails(), "automatically reverted back in 300ms") || clusterName() != "first" {
		t.Fatalf("try: %v, %v", got, err)
	}
	if !testkit.Eventually(5*time.Second, func() bool { return clusterName() == "second" }) {
		t.Fatal("try mode never rolled back")
	}

	// Staged: applied when the (simulated) machine boots again.
	if _, err := apply(&machine.ApplyConfigurationRequest{Data: first, Mode: machine.ApplyConfigurationRequest_STAGED}); err != nil || clusterName() != "second" {
		t.Fatalf("staged: %v, cluster %s", err, clusterName())
	}
	if _, err := c.MachineClient.Reboot(ctx, &machine.RebootRequest{}); err != nil {
		t.Fatal(err)
	}
	if !testkit.Eventually(10*time.Second, func() bool { return clusterName() == "first" }) {
		t.Fatal("the staged configuration was not applied by the reboot")
	}
}

// TestApplyLargeConfiguration: a configuration of 11 MB, as Talos's own
// TestBigPayload applies, within machined's 32 MiB message bound.
func TestApplyLargeConfiguration(t *testing.T) {
	doc := machineConfig(t, "big")
	c, _ := nodetest.OfficialClient(t, node.Config{MachineConfig: doc})
	// Pad the document with a YAML comment to 11 MB.
	big := append([]byte("# "+strings.Repeat("x", 11<<20)+"\n"), doc...)
	resp, err := c.ApplyConfiguration(testkit.Context(t), &machine.ApplyConfigurationRequest{Data: big, Mode: machine.ApplyConfigurationRequest_NO_REBOOT},
		grpc.MaxCallSendMsgSize(32<<20))
	if err != nil || !strings.Contains(resp.GetMessages()[0].GetModeDetails(), "without a reboot") {
		t.Fatalf("an 11 MB configuration: %v, %v", resp, err)
	}
}
