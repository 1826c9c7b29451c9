package containers_test

import (
	"errors"
	"io"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"

	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

// drain receives a server stream to its end.
func drain[T any](t *testing.T, stream grpc.ServerStreamingClient[T], err error) ([]*T, error) {
	t.Helper()
	if err != nil {
		return nil, err
	}
	var out []*T
	for {
		m, err := stream.Recv()
		if errors.Is(err, io.EOF) {
			return out, nil
		}
		if err != nil {
			return out, err
		}
		out = append(out, m)
	}
}

// TestImagePullAndUpgrade walks what talosctl v1.13's upgrade calls: an
// image pull (progress, then the normalized name), the upgrade's install
// (messages, then exit code 0), and the image in both listings; an
// upgrade of an image not pulled is refused, as Talos refuses it.
func TestImagePullAndUpgrade(t *testing.T) {
	mc, conn, _ := nodetest.Start(t, node.Config{}, "unix")
	images, lifecycle := machine.NewImageServiceClient(conn), machine.NewLifecycleServiceClient(conn)
	ctx := testkit.Context(t)

	upgrade := func(image string) ([]*machine.LifecycleServiceUpgradeResponse, error) {
		s, err := lifecycle.Upgrade(ctx, &machine.LifecycleServiceUpgradeRequest{Source: &machine.InstallArtifactsSource{ImageName: image}})
		return drain(t, s, err)
	}
	_, err := upgrade("ghcr.io/siderolabs/installer:v1.13.9")
	nodetest.WantCode(t, err, codes.FailedPrecondition)

	s, err := images.Pull(ctx, &machine.ImageServicePullRequest{ImageRef: "ghcr.io/siderolabs/installer:v1.13.9"})
	pulled, err := drain(t, s, err)
	if err != nil || len(pulled) < 2 {
		t.Fatalf("pull: %d messages, %v", len(pulled), err)
	}
	if got := pulled[len(pulled)-1].GetName(); got != "ghcr.io/siderolabs/installer:v1.13.9" {
		t.Errorf("pulled name %q", got)
	}
	if pulled[0].GetPullProgress().GetLayerId() == "" {
		t.Errorf("first message is not layer progress: %v", pulled[0])
	}

	progress, err := upgrade("ghcr.io/siderolabs/installer:v1.13.9")
	if err != nil || len(progress) == 0 {
		t.Fatalf("upgrade: %v", err)
	}
	last := progress[len(progress)-1].GetProgress()
	if _, ok := last.GetResponse().(*machine.LifecycleServiceInstallProgress_ExitCode); !ok || last.GetExitCode() != 0 {
		t.Errorf("upgrade ended with %v, want exit code 0", last)
	}

	ls, err := images.List(ctx, &machine.ImageServiceListRequest{})
	listed, err := drain(t, ls, err)
	if err != nil || len(listed) != 1 || listed[0].GetName() != "ghcr.io/siderolabs/installer:v1.13.9" || listed[0].GetDigest() == "" {
		t.Fatalf("list: %v, %v", listed, err)
	}
	//lint:ignore SA1019 talosctl v1.11 still calls it, and so the agent serves it.
	ol, err := mc.ImageList(ctx, &machine.ImageListRequest{Namespace: common.ContainerdNamespace_NS_SYSTEM})
	old, err := drain(t, ol, err)
	if err != nil || len(old) != 1 || old[0].GetDigest() != listed[0].GetDigest() {
		t.Fatalf("ImageList: %v, %v", old, err)
	}
	// Other namespaces are apart.
	cri, err := images.List(ctx, &machine.ImageServiceListRequest{Containerd: &common.ContainerdInstance{Namespace: common.ContainerdNamespace_NS_CRI}})
	if got, err := drain(t, cri, err); err != nil || len(got) != 0 {
		t.Fatalf("cri namespace: %v, %v", got, err)
	}

	// The legacy unary pull, a bare name normalized as containerd does,
	// and removal.
	//lint:ignore SA1019 talosctl falls back to it for an older node.
	if _, err := mc.ImagePull(ctx, &machine.ImagePullRequest{Reference: "alpine"}); err != nil {
		t.Fatal(err)
	}
	if _, err := images.Remove(ctx, &machine.ImageServiceRemoveRequest{ImageRef: "docker.io/library/alpine:latest"}); err != nil {
		t.Fatalf("remove the normalized alpine: %v", err)
	}
	_, err = images.Remove(ctx, &machine.ImageServiceRemoveRequest{ImageRef: "alpine"})
	nodetest.WantCode(t, err, codes.NotFound)

	for _, bad := range []string{"", "has space:1", "registry.example/", "x@md5:abc"} {
		s, err := images.Pull(ctx, &machine.ImageServicePullRequest{ImageRef: bad})
		_, err = drain(t, s, err)
		nodetest.WantCode(t, err, codes.InvalidArgument)
	}
	_, err = images.Verify(ctx, &machine.ImageServiceVerifyRequest{})
	nodetest.WantCode(t, err, codes.FailedPrecondition)
	is, err := lifecycle.Install(ctx, &machine.LifecycleServiceInstallRequest{})
	_, err = drain(t, is, err)
	nodetest.WantCode(t, err, codes.FailedPrecondition)
}
