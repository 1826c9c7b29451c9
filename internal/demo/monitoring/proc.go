package monitoring

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"

	"github.com/prometheus/procfs"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// procPath is the procfs the statistics methods read. It is the agent's own
// view: in a container that means the container's processes, mounts and
// network namespace, but the host's kernel-wide counters (CPU, load, disks).
const procPath = "/proc"

// sysBlockPath lists the whole block devices; DiskStats uses it to tell
// disks from partitions.
const sysBlockPath = "/sys/block"

// procFS opens procPath for the prometheus/procfs parsers.
func procFS() (procfs.FS, error) {
	pfs, err := procfs.NewFS(procPath)
	if err != nil {
		return procfs.FS{}, status.Errorf(codes.Unavailable, "open %s: %v", procPath, err)
	}
	return pfs, nil
}

// allProcs lists the processes of /proc, as a gRPC status on error.
func allProcs() (procfs.Procs, error) {
	pfs, err := procFS()
	if err != nil {
		return nil, err
	}
	procs, err := pfs.AllProcs()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "list processes: %v", err)
	}
	return procs, nil
}

// Processes lists every process in /proc with the fields talosctl processes
// shows: CPU time in seconds, memory in bytes, the command (comm), the
// executable and the command line joined with spaces.
//
// A process that exits while it is being read, or that procfs hides from
// the agent (hidepid), is left out rather than failing the call. Fields the
// kernel does not let the agent read are left empty: the executable of
// another user's process when the agent is not root, and the label when no
// security module reports one in /proc/<pid>/attr/current.
func (*Monitor) Processes(ctx context.Context, _ *emptypb.Empty) (_ *machine.ProcessesResponse, err error) {
	procs, err := allProcs()
	if err != nil {
		return nil, err
	}
	slices.SortFunc(procs, func(a, b procfs.Proc) int { return a.PID - b.PID })
	out := make([]*machine.ProcessInfo, 0, len(procs))
	for _, p := range procs {
		if err := ctx.Err(); err != nil {
			return nil, status.FromContextError(err).Err()
		}
		if info, ok := readProcess(p); ok {
			out = append(out, info)
		}
	}
	return &machine.ProcessesResponse{Messages: []*machine.Process{{Processes: out}}}, nil
}

// readProcess describes one process; ok is false when it is gone or hidden.
func readProcess(p procfs.Proc) (_ *machine.ProcessInfo, ok bool) {
	st, err := p.Stat()
	if err != nil {
		return nil, false
	}
	info := &machine.ProcessInfo{
		Pid:            int32(st.PID),
		Ppid:           int32(st.PPID),
		State:          st.State,
		Threads:        int32(st.NumThreads),
		CpuTime:        st.CPUTime(), // utime+stime in USER_HZ ticks, as seconds
		VirtualMemory:  uint64(st.VirtualMemory()),
		ResidentMemory: uint64(max(st.ResidentMemory(), 0)),
		Command:        st.Comm, // the same text as /proc/<pid>/comm
	}
	args, err := p.CmdLine()
	if gone(err) {
		return nil, false
	}
	// Kernel threads have an empty command line, and so no args.
	info.Args = strings.Join(args, " ")
	if exe, err := p.Executable(); err == nil {
		info.Executable = exe
	}
	if label, err := os.ReadFile(filepath.Join(procPath, strconv.Itoa(p.PID), "attr", "current")); err == nil {
		info.Label = string(bytes.Trim(label, "\x00\n"))
	}
	return info, true
}

// gone reports whether err says a process exited while it was being read:
// its directory disappeared (ENOENT) or a read found it dead (ESRCH).
func gone(err error) bool {
	return errors.Is(err, fs.ErrNotExist) || errors.Is(err, syscall.ESRCH)
}

// LoadAvg reports the 1, 5 and 15 minute load averages from /proc/loadavg.
func (*Monitor) LoadAvg(ctx context.Context, _ *emptypb.Empty) (_ *machine.LoadAvgResponse, err error) {
	pfs, err := procFS()
	if err != nil {
		return nil, err
	}
	avg, err := pfs.LoadAvg()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read load average: %v", err)
	}
	return &machine.LoadAvgResponse{Messages: []*machine.LoadAvg{{
		Load1: avg.Load1, Load5: avg.Load5, Load15: avg.Load15,
	}}}, nil
}

// SystemStat reports /proc/stat. CPU times are in seconds (the kernel's
// USER_HZ ticks divided by 100), the other counters as the kernel prints
// them; Cpu is indexed by CPU number.
func (m *Monitor) SystemStat(ctx context.Context, _ *emptypb.Empty) (_ *machine.SystemStatResponse, err error) {
	pfs, err := procFS()
	if err != nil {
		return nil, err
	}
	st, err := pfs.Stat()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read system statistics: %v", err)
	}
	maxCPU := int64(-1)
	for n := range st.CPU {
		maxCPU = max(maxCPU, n)
	}
	// /proc/stat omits offline CPUs; their slots get empty statistics so
	// that Cpu[i] stays CPU i (a nil element cannot be marshalled).
	cpus := make([]*machine.CPUStat, maxCPU+1)
	for i := range cpus {
		cpus[i] = cpuStat(st.CPU[int64(i)])
	}
	sirq := st.SoftIRQ
	boot := st.BootTime
	if m.bootTime != nil {
		boot = uint64(m.bootTime().Unix())
	}
	return &machine.SystemStatResponse{Messages: []*machine.SystemStat{{
		BootTime:        boot,
		CpuTotal:        cpuStat(st.CPUTotal),
		Cpu:             cpus,
		IrqTotal:        st.IRQTotal,
		Irq:             st.IRQ,
		ContextSwitches: st.ContextSwitches,
		ProcessCreated:  st.ProcessCreated,
		ProcessRunning:  st.ProcessesRunning,
		ProcessBlocked:  st.ProcessesBlocked,
		SoftIrqTotal:    st.SoftIRQTotal,
		SoftIrq: &machine.SoftIRQStat{
			Hi: sirq.Hi, Timer: sirq.Timer, NetTx: sirq.NetTx, NetRx: sirq.NetRx, Block: sirq.Block,
			BlockIoPoll: sirq.BlockIoPoll, Tasklet: sirq.Tasklet, Sched: sirq.Sched, Hrtimer: sirq.Hrtimer, Rcu: sirq.Rcu,
		},
	}}}, nil
}

func cpuStat(c procfs.CPUStat) *machine.CPUStat {
	return &machine.CPUStat{
		User: c.User, Nice: c.Nice, System: c.System, Idle: c.Idle, Iowait: c.Iowait,
		Irq: c.IRQ, SoftIrq: c.SoftIRQ, Steal: c.Steal, Guest: c.Guest, GuestNice: c.GuestNice,
	}
}

// CPUInfo reports /proc/cpuinfo, one entry per processor. Which fields are
// filled depends on the architecture: the x86 layout has them all.
func (*Monitor) CPUInfo(ctx context.Context, _ *emptypb.Empty) (_ *machine.CPUInfoResponse, err error) {
	pfs, err := procFS()
	if err != nil {
		return nil, err
	}
	infos, err := pfs.CPUInfo()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read CPU information: %v", err)
	}
	out := make([]*machine.CPUInfo, len(infos))
	for i, c := range infos {
		out[i] = &machine.CPUInfo{
			Processor:       uint32(c.Processor),
			VendorId:        c.VendorID,
			CpuFamily:       c.CPUFamily,
			Model:           c.Model,
			ModelName:       c.ModelName,
			Stepping:        c.Stepping,
			Microcode:       c.Microcode,
			CpuMhz:          c.CPUMHz,
			CacheSize:       c.CacheSize,
			PhysicalId:      c.PhysicalID,
			Siblings:        uint32(c.Siblings),
			CoreId:          c.CoreID,
			CpuCores:        uint32(c.CPUCores),
			ApicId:          c.APICID,
			InitialApicId:   c.InitialAPICID,
			Fpu:             c.FPU,
			FpuException:    c.FPUException,
			CpuIdLevel:      uint32(c.CPUIDLevel),
			Wp:              c.WP,
			Flags:           c.Flags,
			Bugs:            c.Bugs,
			BogoMips:        c.BogoMips,
			ClFlushSize:     uint32(c.CLFlushSize),
			CacheAlignment:  uint32(c.CacheAlignment),
			AddressSizes:    c.AddressSizes,
			PowerManagement: c.PowerManagement,
		}
	}
	return &machine.CPUInfoResponse{Messages: []*machine.CPUsInfo{{CpuInfo: out}}}, nil
}

// NetworkDeviceStats reports /proc/net/dev for the agent's network
// namespace: every interface, sorted by name, and their sum in Total, whose
// name lists the interfaces summed (as Talos reports it).
func (*Monitor) NetworkDeviceStats(ctx context.Context, _ *emptypb.Empty) (_ *machine.NetworkDeviceStatsResponse, err error) {
	pfs, err := procFS()
	if err != nil {
		return nil, err
	}
	devs, err := pfs.NetDev()
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read network device statistics: %v", err)
	}
	out := make([]*machine.NetDev, 0, len(devs))
	for _, d := range devs {
		out = append(out, netDev(d))
	}
	slices.SortFunc(out, func(a, b *machine.NetDev) int { return strings.Compare(a.GetName(), b.GetName()) })
	return &machine.NetworkDeviceStatsResponse{Messages: []*machine.NetworkDeviceStats{{
		Total:   netDev(devs.Total()),
		Devices: out,
	}}}, nil
}

func netDev(d procfs.NetDevLine) *machine.NetDev {
	return &machine.NetDev{
		Name:         d.Name,
		RxBytes:      d.RxBytes,
		RxPackets:    d.RxPackets,
		RxErrors:     d.RxErrors,
		RxDropped:    d.RxDropped,
		RxFifo:       d.RxFIFO,
		RxFrame:      d.RxFrame,
		RxCompressed: d.RxCompressed,
		RxMulticast:  d.RxMulticast,
		TxBytes:      d.TxBytes,
		TxPackets:    d.TxPackets,
		TxErrors:     d.TxErrors,
		TxDropped:    d.TxDropped,
		TxFifo:       d.TxFIFO,
		TxCollisions: d.TxCollisions,
		TxCarrier:    d.TxCarrier,
		TxCompressed: d.TxCompressed,
	}
}

// DiskStats reports /proc/diskstats: every line as a device, in the
// kernel's order. Total sums the whole devices (those in /sys/block) and
// leaves partitions out, because a partition's I/O is already counted on its
// disk; when /sys/block cannot be read every line is summed. Kernels before
// 4.18 have no discard counters, which are then zero.
func (*Monitor) DiskStats(ctx context.Context, _ *emptypb.Empty) (_ *machine.DiskStatsResponse, err error) {
	data, err := os.ReadFile(filepath.Join(procPath, "diskstats"))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read disk statistics: %v", err)
	}
	devs, err := parseDiskstats(data)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "parse %s/diskstats: %v", procPath, err)
	}
	total := diskTotal(devs, wholeDisks(sysBlockPath))
	return &machine.DiskStatsResponse{Messages: []*machine.DiskStats{{Total: total, Devices: devs}}}, nil
}

// wholeDisks returns the names of the whole block devices listed in
// sysBlock, or nil if it cannot be read.
func wholeDisks(sysBlock string) map[string]bool {
	entries, err := os.ReadDir(sysBlock)
	if err != nil {
		return nil
	}
	disks := make(map[string]bool, len(entries))
	for _, e := range entries {
		// /sys/block spells a "/" in a device name (cciss/c0d0) as "!".
		disks[strings.ReplaceAll(e.Name(), "!", "/")] = true
	}
	return disks
}

// diskTotal sums the devices named in disks, or all of them if disks is nil.
func diskTotal(devs []*machine.DiskStat, disks map[string]bool) *machine.DiskStat {
	total := &machine.DiskStat{}
	for _, d := range devs {
		if disks == nil || disks[d.GetName()] {
			addDiskStat(total, d)
		}
	}
	return total
}

// parseDiskstats reads lines of "major minor name" and 11 (before Linux
// 4.18), 15 (before 5.5) or 17 counters. DiskStat holds the first 15.
func parseDiskstats(data []byte) ([]*machine.DiskStat, error) {
	devs := []*machine.DiskStat{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for line := 1; sc.Scan(); line++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		if len(f) < 3+11 {
			return nil, fmt.Errorf("line %d: %d fields, want at least 14", line, len(f))
		}
		var v [15]uint64
		for i := 0; i < len(v) && 3+i < len(f); i++ {
			n, err := strconv.ParseUint(f[3+i], 10, 64)
			if err != nil {
				return nil, fmt.Errorf("line %d: field %d: %v", line, 4+i, err)
			}
			v[i] = n
		}
		devs = append(devs, &machine.DiskStat{
			Name:             f[2],
			ReadCompleted:    v[0],
			ReadMerged:       v[1],
			ReadSectors:      v[2],
			ReadTimeMs:       v[3],
			WriteCompleted:   v[4],
			WriteMerged:      v[5],
			WriteSectors:     v[6],
			WriteTimeMs:      v[7],
			IoInProgress:     v[8],
			IoTimeMs:         v[9],
			IoTimeWeightedMs: v[10],
			DiscardCompleted: v[11],
			DiscardMerged:    v[12],
			DiscardSectors:   v[13],
			DiscardTimeMs:    v[14],
		})
	}
	return devs, sc.Err()
}

func addDiskStat(t, d *machine.DiskStat) {
	t.ReadCompleted += d.ReadCompleted
	t.ReadMerged += d.ReadMerged
	t.ReadSectors += d.ReadSectors
	t.ReadTimeMs += d.ReadTimeMs
	t.WriteCompleted += d.WriteCompleted
	t.WriteMerged += d.WriteMerged
	t.WriteSectors += d.WriteSectors
	t.WriteTimeMs += d.WriteTimeMs
	t.IoInProgress += d.IoInProgress
	t.IoTimeMs += d.IoTimeMs
	t.IoTimeWeightedMs += d.IoTimeWeightedMs
	t.DiscardCompleted += d.DiscardCompleted
	t.DiscardMerged += d.DiscardMerged
	t.DiscardSectors += d.DiscardSectors
	t.DiscardTimeMs += d.DiscardTimeMs
}

// Mounts lists the agent's mounts from /proc/self/mountinfo, in the kernel's
// order, with the size and free space statfs reports for each (in bytes;
// Available is what an unprivileged user may use, as df shows it). A mount
// statfs fails on (permission, a vanished mount point) is listed with zero
// sizes. statfs is not interruptible: a hung network file system delays the
// reply as it would df.
func (*Monitor) Mounts(ctx context.Context, _ *emptypb.Empty) (_ *machine.MountsResponse, err error) {
	data, err := os.ReadFile(filepath.Join(procPath, "self", "mountinfo"))
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read mounts: %v", err)
	}
	mounts, err := parseMountinfo(data)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "parse %s/self/mountinfo: %v", procPath, err)
	}
	for _, m := range mounts {
		if err := ctx.Err(); err != nil {
			return nil, status.FromContextError(err).Err()
		}
		var st unix.Statfs_t
		if unix.Statfs(m.GetMountedOn(), &st) != nil {
			continue
		}
		unit := uint64(st.Frsize) // the unit of the block counts; older kernels leave it 0
		if unit == 0 {
			unit = uint64(st.Bsize)
		}
		m.Size = st.Blocks * unit
		m.Available = st.Bavail * unit
	}
	return &machine.MountsResponse{Messages: []*machine.Mounts{{Stats: mounts}}}, nil
}

// parseMountinfo reads the mount point (field 5) and the source (second
// field after the "-" separator) of each mountinfo line; see proc_pid_mountinfo(5).
func parseMountinfo(data []byte) ([]*machine.MountStat, error) {
	var out []*machine.MountStat
	sc := bufio.NewScanner(bytes.NewReader(data))
	for line := 1; sc.Scan(); line++ {
		f := strings.Fields(sc.Text())
		if len(f) == 0 {
			continue
		}
		sep := slices.Index(f, "-")
		if sep < 6 || len(f) < sep+3 {
			return nil, fmt.Errorf("line %d: malformed mount entry", line)
		}
		out = append(out, &machine.MountStat{
			Filesystem: unescapeMountField(f[sep+2]),
			MountedOn:  unescapeMountField(f[4]),
		})
	}
	return out, sc.Err()
}

// unescapeMountField undoes the kernel's octal escapes (\040 for a space,
// \011, \012, \134) in a mountinfo field.
func unescapeMountField(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) && s[i+1] <= '3' && isOctal(s[i+1]) && isOctal(s[i+2]) && isOctal(s[i+3]) {
			b.WriteByte((s[i+1]-'0')<<6 | (s[i+2]-'0')<<3 | (s[i+3] - '0'))
			i += 3
			continue
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func isOctal(c byte) bool { return c >= '0' && c <= '7' }
