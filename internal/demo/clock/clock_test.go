package clock_test

import (
	"strings"
	"testing"
	"time"

	timeapi "github.com/siderolabs/talos/pkg/machinery/api/time"
	"google.golang.org/grpc/codes"

	"github.com/apid/apid/internal/demo/clock"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

func TestTime(t *testing.T) {
	c, _ := nodetest.OfficialClient(t, node.Config{})
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
	check(t, resp, clock.LocalClockServer)

	resp, err = c.TimeCheck(ctx, "pool.ntp.org")
	if err != nil {
		t.Fatal(err)
	}
	check(t, resp, "pool.ntp.org")

	_, err = c.TimeCheck(ctx, "")
	nodetest.WantCode(t, err, codes.InvalidArgument)
}
