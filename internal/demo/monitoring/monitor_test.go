package monitoring_test

import (
	"os"
	"path/filepath"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/monitoring"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

func TestMemory(t *testing.T) {
	t.Run("host", func(t *testing.T) {
		if _, err := os.Stat(monitoring.DefaultMeminfoPath); err != nil {
			t.Skipf("no %s: %v", monitoring.DefaultMeminfoPath, err)
		}
		c, _, _ := nodetest.Start(t, node.Config{}, "unix")
		resp, err := c.Memory(testkit.Context(t), &emptypb.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		mi := resp.GetMessages()[0].GetMeminfo()
		if mi.GetMemtotal() == 0 || mi.GetMemfree() > mi.GetMemtotal() {
			t.Errorf("meminfo = %v", mi)
		}
	})
	t.Run("fixture", func(t *testing.T) {
		c, _, _ := nodetest.Start(t, node.Config{MeminfoPath: "testdata/meminfo"}, "unix")
		resp, err := c.Memory(testkit.Context(t), &emptypb.Empty{})
		if err != nil {
			t.Fatal(err)
		}
		mi := resp.GetMessages()[0].GetMeminfo()
		if mi.GetMemtotal() != 1000 || mi.GetActiveanon() != 9008 || mi.GetCommittedas() != 34033 ||
			mi.GetHugepagestotal() != 46045 || mi.GetHugepagesize() != 50049 {
			t.Errorf("meminfo = %v", mi)
		}
	})
	t.Run("unreadable", func(t *testing.T) {
		c, _, _ := nodetest.Start(t, node.Config{MeminfoPath: filepath.Join(t.TempDir(), "missing")}, "unix")
		_, err := c.Memory(testkit.Context(t), &emptypb.Empty{})
		nodetest.WantCode(t, err, codes.Unavailable)
	})
}

// TestCPUFreqStats: one message, one entry per CPU the kernel's cpufreq
// driver shows (none on many virtual machines), each with its limits in
// order.
func TestCPUFreqStats(t *testing.T) {
	c, _, _ := nodetest.Start(t, node.Config{}, "unix")
	resp, err := c.CPUFreqStats(testkit.Context(t), &emptypb.Empty{})
	if err != nil || len(resp.GetMessages()) != 1 {
		t.Fatalf("%v, %v", resp, err)
	}
	dirs, _ := filepath.Glob("/sys/devices/system/cpu/cpu[0-9]*/cpufreq")
	stats := resp.GetMessages()[0].GetCpuFreqStats()
	if len(stats) != len(dirs) {
		t.Fatalf("%d entries for %d cpufreq directories", len(stats), len(dirs))
	}
	for i, s := range stats {
		if s.GetMaximumFrequency() < s.GetMinimumFrequency() {
			t.Errorf("cpu %d: max %d below min %d", i, s.GetMaximumFrequency(), s.GetMinimumFrequency())
		}
	}
}
