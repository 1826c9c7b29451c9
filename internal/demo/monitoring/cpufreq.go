package monitoring

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/protobuf/types/known/emptypb"
)

// cpufreqGlob finds the frequency scaling directory of each CPU.
const cpufreqGlob = "/sys/devices/system/cpu/cpu[0-9]*/cpufreq"

// CPUFreqStats reports each CPU's frequency scaling (kHz) and governor, as
// the kernel's cpufreq driver shows them; a machine without one (many
// virtual machines) has none to report, and the list is empty, as on Talos.
func (*Monitor) CPUFreqStats(ctx context.Context, _ *emptypb.Empty) (*machine.CPUFreqStatsResponse, error) {
	dirs, _ := filepath.Glob(cpufreqGlob)
	cpu := func(dir string) int {
		n, _ := strconv.Atoi(strings.TrimPrefix(filepath.Base(filepath.Dir(dir)), "cpu"))
		return n
	}
	slices.SortFunc(dirs, func(a, b string) int { return cpu(a) - cpu(b) })
	stats := make([]*machine.CPUFreqStats, 0, len(dirs))
	for _, dir := range dirs {
		stats = append(stats, &machine.CPUFreqStats{
			CurrentFrequency: readUint(filepath.Join(dir, "scaling_cur_freq")),
			MinimumFrequency: readUint(filepath.Join(dir, "scaling_min_freq")),
			MaximumFrequency: readUint(filepath.Join(dir, "scaling_max_freq")),
			Governor:         readLine(filepath.Join(dir, "scaling_governor")),
		})
	}
	return &machine.CPUFreqStatsResponse{Messages: []*machine.CPUsFreqStats{{CpuFreqStats: stats}}}, nil
}

// readLine returns the first line of a small sysfs file, or "".
func readLine(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	line, _, _ := strings.Cut(string(b), "\n")
	return strings.TrimSpace(line)
}

// readUint returns the number a sysfs file holds, or 0.
func readUint(path string) uint64 {
	n, _ := strconv.ParseUint(readLine(path), 10, 64)
	return n
}
