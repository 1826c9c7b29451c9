package identity_test

import (
	"os"
	"regexp"
	"runtime"
	"testing"

	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/identity"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

func TestVersion(t *testing.T) {
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	resp, err := c.Version(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetMessages()) != 1 {
		t.Fatalf("got %d messages, want 1", len(resp.GetMessages()))
	}
	m := resp.GetMessages()[0]
	v := m.GetVersion()
	if v.GetTag() != identity.VersionTag || v.GetGoVersion() != runtime.Version() ||
		v.GetOs() != runtime.GOOS || v.GetArch() != runtime.GOARCH || v.GetSha() == "" {
		t.Errorf("version = %v", v)
	}
	if p := m.GetPlatform(); p.GetName() != identity.PlatformName || p.GetMode() != identity.PlatformMode {
		t.Errorf("platform = %v", p)
	}
	if m.GetMetadata() != nil {
		t.Errorf("metadata = %v, want none: stamping is the proxy's job", m.GetMetadata())
	}
}

// TestVersionTag checks that the tag names the machinery version in go.mod,
// which talosctl compares with its own.
func TestVersionTag(t *testing.T) {
	mod, err := os.ReadFile("../../../go.mod")
	if err != nil {
		t.Skipf("no go.mod: %v", err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/siderolabs/talos/pkg/machinery (v\S+)`).FindSubmatch(mod)
	if m == nil {
		t.Fatal("go.mod does not require github.com/siderolabs/talos/pkg/machinery")
	}
	if want := string(m[1]) + "+apid-example"; identity.VersionTag != want {
		t.Errorf("VersionTag = %q, want %q", identity.VersionTag, want)
	}

	c, _ := nodetest.OfficialClient(t, node.Config{})
	v, err := c.Version(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	if !v.GetMessages()[0].GetFeatures().GetRbac() {
		t.Error("features.rbac is not set")
	}
}
