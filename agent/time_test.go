package agent_test

import (
	"os"
	"regexp"
	"strings"
	"testing"
	"time"

	timeapi "github.com/siderolabs/talos/pkg/machinery/api/time"
	"google.golang.org/grpc/codes"

	"github.com/apid/apid/agent"
	"github.com/apid/apid/internal/testkit"
)

func TestTime(t *testing.T) {
	c, _ := officialClient(t, agent.Config{})
	ctx := testkit.Context(t)
	check := func(t *testing.T, resp *timeapi.TimeResponse, server string) {
		t.Helper()
		if len(resp.GetMessages()) != 1 {
			t.Fatalf("%d messages, want 1", len(resp.GetMessages()))
		}
		m := resp.GetMessages()[0]
		if !strings.Contains(m.GetServer(), server) || !strings.Contains(m.GetServer(), "no NTP client") {
			t.Errorf("server %q does not name %q and say that there is no NTP client", m.GetServer(), server)
		}
		// talosctl time refuses a reply without both times.
		if !m.GetLocaltime().IsValid() || !m.GetRemotetime().IsValid() {
			t.Fatalf("times %v, %v", m.GetLocaltime(), m.GetRemotetime())
		}
		if d := time.Since(m.GetLocaltime().AsTime()).Abs(); d > time.Second {
			t.Errorf("local time is %v away from now", d)
		}
		if !m.GetRemotetime().AsTime().Equal(m.GetLocaltime().AsTime()) {
			t.Errorf("remote time %v differs from the local clock %v", m.GetRemotetime().AsTime(), m.GetLocaltime().AsTime())
		}
	}

	resp, err := c.Time(ctx)
	if err != nil {
		t.Fatal(err)
	}
	check(t, resp, agent.LocalClockServer)

	resp, err = c.TimeCheck(ctx, "pool.ntp.org")
	if err != nil {
		t.Fatal(err)
	}
	check(t, resp, "pool.ntp.org")

	_, err = c.TimeCheck(ctx, "")
	wantCode(t, err, codes.InvalidArgument)
}

// TestVersionTag checks that the tag names the machinery version in go.mod,
// which talosctl compares with its own.
func TestVersionTag(t *testing.T) {
	mod, err := os.ReadFile("../go.mod")
	if err != nil {
		t.Skipf("no go.mod: %v", err)
	}
	m := regexp.MustCompile(`(?m)^\s*github\.com/siderolabs/talos/pkg/machinery (v\S+)`).FindSubmatch(mod)
	if m == nil {
		t.Fatal("go.mod does not require github.com/siderolabs/talos/pkg/machinery")
	}
	if want := string(m[1]) + "+apid-example"; agent.VersionTag != want {
		t.Errorf("VersionTag = %q, want %q", agent.VersionTag, want)
	}

	c, _ := officialClient(t, agent.Config{})
	v, err := c.Version(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	if !v.GetMessages()[0].GetFeatures().GetRbac() {
		t.Error("features.rbac is not set")
	}
}
