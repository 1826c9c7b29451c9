package monitoring_test

import (
	"bufio"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

func needProc(t *testing.T, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join("/proc", name))
	if err != nil {
		t.Skipf("no /proc/%s: %v", name, err)
	}
	return data
}

// procSelfStatField returns field n (1-based, as in proc_pid_stat(5)) of
// /proc/self/stat.
func procSelfStatField(t *testing.T, n int) uint64 {
	t.Helper()
	data := needProc(t, "self/stat")
	rest := string(data[strings.LastIndexByte(string(data), ')')+2:])
	f := strings.Fields(rest)
	v, err := strconv.ParseUint(f[n-3], 10, 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

func TestProcesses(t *testing.T) {
	needProc(t, "self/stat")
	child := exec.Command("sleep", "30")
	if err := child.Start(); err != nil {
		t.Skipf("cannot start sleep: %v", err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()

	cpuBefore := procSelfStatField(t, 14) + procSelfStatField(t, 15)
	c, _ := nodetest.OfficialClient(t, node.Config{})
	resp, err := c.Processes(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	cpuAfter := procSelfStatField(t, 14) + procSelfStatField(t, 15)
	if len(resp.GetMessages()) != 1 || resp.GetMessages()[0].GetMetadata() != nil {
		t.Fatalf("want one message without metadata, got %v", resp.GetMessages())
	}
	procs := resp.GetMessages()[0].GetProcesses()
	byPid := map[int32]*machine.ProcessInfo{}
	for i, p := range procs {
		if _, dup := byPid[p.GetPid()]; dup || i > 0 && p.GetPid() <= procs[i-1].GetPid() {
			t.Fatalf("pid %d repeated or out of order", p.GetPid())
		}
		byPid[p.GetPid()] = p
	}

	self := byPid[int32(os.Getpid())]
	if self == nil {
		t.Fatalf("own pid %d not among %d processes", os.Getpid(), len(procs))
	}
	comm := strings.TrimSpace(string(needProc(t, "self/comm")))
	exe, _ := os.Readlink("/proc/self/exe")
	if self.GetCommand() != comm || self.GetExecutable() != exe || self.GetArgs() != strings.Join(os.Args, " ") ||
		self.GetPpid() != int32(os.Getppid()) || self.GetThreads() < 1 || self.GetState() == "" {
		t.Errorf("own process = %v; want command %q, executable %q, args %q, ppid %d", self, comm, exe, os.Args, os.Getppid())
	}
	if self.GetResidentMemory() == 0 || self.GetVirtualMemory() < self.GetResidentMemory() {
		t.Errorf("own memory: virtual %d, resident %d", self.GetVirtualMemory(), self.GetResidentMemory())
	}
	if cpu := self.GetCpuTime(); cpu < float64(cpuBefore)/100 || cpu > float64(cpuAfter)/100 {
		t.Errorf("own cpu time %v s, want between %v and %v", cpu, float64(cpuBefore)/100, float64(cpuAfter)/100)
	}

	kid := byPid[int32(child.Process.Pid)]
	sleepExe, _ := filepath.EvalSymlinks(child.Path)
	if kid == nil || kid.GetPpid() != int32(os.Getpid()) || kid.GetCommand() != "sleep" || kid.GetArgs() != "sleep 30" ||
		kid.GetExecutable() != sleepExe || kid.GetThreads() != 1 || !strings.Contains("SR", kid.GetState()) {
		t.Errorf("child = %v; want sleep 30 (%s) with parent %d", kid, sleepExe, os.Getpid())
	}
	if byPid[1] == nil {
		t.Error("pid 1 missing")
	}
}

// loadavg parses the three load averages of /proc/loadavg.
func loadavg(t *testing.T) [3]float64 {
	t.Helper()
	f := strings.Fields(string(needProc(t, "loadavg")))
	var out [3]float64
	for i := range out {
		v, err := strconv.ParseFloat(f[i], 64)
		if err != nil {
			t.Fatal(err)
		}
		out[i] = v
	}
	return out
}

func TestLoadAvg(t *testing.T) {
	before := loadavg(t)
	c, _ := nodetest.OfficialClient(t, node.Config{})
	resp, err := c.MachineClient.LoadAvg(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	after := loadavg(t)
	m := resp.GetMessages()[0]
	got := [3]float64{m.GetLoad1(), m.GetLoad5(), m.GetLoad15()}
	// The kernel updates the averages every 5 seconds.
	if got != before && got != after {
		t.Errorf("load = %v; /proc/loadavg said %v, then %v", got, before, after)
	}
}

// procStat reads the single-value lines and the cpu lines of /proc/stat.
func procStat(t *testing.T) (values map[string]uint64, cpus [][]uint64) {
	t.Helper()
	values = map[string]uint64{}
	sc := bufio.NewScanner(strings.NewReader(string(needProc(t, "stat"))))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		var nums []uint64
		for _, s := range f[1:] {
			n, _ := strconv.ParseUint(s, 10, 64)
			nums = append(nums, n)
		}
		values[f[0]] = nums[0]
		if strings.HasPrefix(f[0], "cpu") {
			cpus = append(cpus, nums)
		}
	}
	return values, cpus
}

func TestSystemStat(t *testing.T) {
	before, cpusBefore := procStat(t)
	started := time.Now().Unix()
	c, _ := nodetest.OfficialClient(t, node.Config{})
	resp, err := c.MachineClient.SystemStat(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	after, cpusAfter := procStat(t)
	st := resp.GetMessages()[0]
	// The boot time is the simulated machine's (its reboots move it), not
	// the host's /proc/stat btime.
	if bt := int64(st.GetBootTime()); bt < started || bt > time.Now().Unix() || uint64(bt) == before["btime"] {
		t.Errorf("boot time %d, want the node's start (%d on); /proc/stat btime %d", bt, started, before["btime"])
	}
	between := func(name string, got, lo, hi uint64) {
		t.Helper()
		if got < lo || got > hi {
			t.Errorf("%s = %d, want between %d and %d", name, got, lo, hi)
		}
	}
	between("context switches", st.GetContextSwitches(), before["ctxt"], after["ctxt"])
	between("processes created", st.GetProcessCreated(), before["processes"], after["processes"])
	between("irq total", st.GetIrqTotal(), before["intr"], after["intr"])
	between("softirq total", st.GetSoftIrqTotal(), before["softirq"], after["softirq"])
	if st.GetProcessRunning() < 1 {
		t.Errorf("processes running = %d, want at least this one", st.GetProcessRunning())
	}
	// Line 0 is the total, then one per CPU; times are in 1/100 s.
	if len(st.GetCpu()) != len(cpusBefore)-1 {
		t.Errorf("%d CPUs, /proc/stat has %d", len(st.GetCpu()), len(cpusBefore)-1)
	}
	cpuTimes := func(c *machine.CPUStat) []float64 {
		return []float64{c.GetUser(), c.GetNice(), c.GetSystem(), c.GetIdle()}
	}
	for i, got := range append([]*machine.CPUStat{st.GetCpuTotal()}, st.GetCpu()...) {
		for j, v := range cpuTimes(got) {
			ticks := uint64(v*100 + 0.5)
			between("cpu line "+strconv.Itoa(i)+" field "+strconv.Itoa(j), ticks, cpusBefore[i][j], cpusAfter[i][j])
		}
	}
}

func TestCPUInfo(t *testing.T) {
	data := string(needProc(t, "cpuinfo"))
	var processors int
	var modelName string
	for line := range strings.Lines(data) {
		key, value, _ := strings.Cut(line, ":")
		switch strings.TrimSpace(key) {
		case "processor":
			processors++
		case "model name":
			if modelName == "" {
				modelName = strings.TrimSpace(value)
			}
		}
	}
	c, _ := nodetest.OfficialClient(t, node.Config{})
	resp, err := c.MachineClient.CPUInfo(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	infos := resp.GetMessages()[0].GetCpuInfo()
	if len(infos) != processors {
		t.Fatalf("%d processors, /proc/cpuinfo lists %d", len(infos), processors)
	}
	for i, ci := range infos {
		if ci.GetProcessor() != uint32(i) {
			t.Errorf("entry %d is processor %d", i, ci.GetProcessor())
		}
	}
	if modelName != "" && infos[0].GetModelName() != modelName {
		t.Errorf("model name %q, /proc/cpuinfo says %q", infos[0].GetModelName(), modelName)
	}
}

// netDevCounters reads the interface names and received bytes of /proc/net/dev.
func netDevCounters(t *testing.T) map[string]uint64 {
	t.Helper()
	out := map[string]uint64{}
	for i, line := range strings.Split(string(needProc(t, "net/dev")), "\n") {
		name, rest, ok := strings.Cut(line, ":")
		if i < 2 || !ok {
			continue
		}
		rx, _ := strconv.ParseUint(strings.Fields(rest)[0], 10, 64)
		out[strings.TrimSpace(name)] = rx
	}
	return out
}

func TestNetworkDeviceStats(t *testing.T) {
	before := netDevCounters(t)
	c, _ := nodetest.OfficialClient(t, node.Config{})
	resp, err := c.MachineClient.NetworkDeviceStats(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	after := netDevCounters(t)
	m := resp.GetMessages()[0]
	var names []string
	var sum uint64
	for _, d := range m.GetDevices() {
		names = append(names, d.GetName())
		sum += d.GetRxBytes()
		if rx := d.GetRxBytes(); rx < before[d.GetName()] || rx > after[d.GetName()] {
			t.Errorf("%s received %d bytes, /proc/net/dev said %d then %d", d.GetName(), rx, before[d.GetName()], after[d.GetName()])
		}
	}
	want := slices.Sorted(func(yield func(string) bool) {
		for n := range before {
			if !yield(n) {
				return
			}
		}
	})
	if !slices.Equal(names, want) || !slices.Contains(names, "lo") {
		t.Errorf("devices %v, /proc/net/dev has %v", names, want)
	}
	if m.GetTotal().GetRxBytes() != sum {
		t.Errorf("total received %d, devices sum to %d", m.GetTotal().GetRxBytes(), sum)
	}
}

func TestDiskStats(t *testing.T) {
	data := string(needProc(t, "diskstats"))
	var names []string
	for line := range strings.Lines(data) {
		if f := strings.Fields(line); len(f) > 3 {
			names = append(names, f[2])
		}
	}
	c, _ := nodetest.OfficialClient(t, node.Config{})
	resp, err := c.MachineClient.DiskStats(testkit.Context(t), &emptypb.Empty{})
	if err != nil {
		t.Fatal(err)
	}
	m := resp.GetMessages()[0]
	var got []string
	var wholeReads, wholeSectors uint64
	for _, d := range m.GetDevices() {
		got = append(got, d.GetName())
		if _, err := os.Stat(filepath.Join("/sys/block", strings.ReplaceAll(d.GetName(), "/", "!"))); err == nil {
			wholeReads += d.GetReadCompleted()
			wholeSectors += d.GetWriteSectors()
		}
	}
	if !slices.Equal(got, names) {
		t.Errorf("devices %v, /proc/diskstats lists %v", got, names)
	}
	if m.GetTotal().GetReadCompleted() != wholeReads || m.GetTotal().GetWriteSectors() != wholeSectors {
		t.Errorf("total reads %d, sectors written %d; whole disks sum to %d, %d",
			m.GetTotal().GetReadCompleted(), m.GetTotal().GetWriteSectors(), wholeReads, wholeSectors)
	}
}

func TestMounts(t *testing.T) {
	unescape := strings.NewReplacer(`\040`, " ", `\011`, "\t", `\012`, "\n", `\134`, `\`)
	var points, sources []string
	for line := range strings.Lines(string(needProc(t, "self/mountinfo"))) {
		f := strings.Fields(line)
		sep := slices.Index(f, "-")
		points = append(points, unescape.Replace(f[4]))
		sources = append(sources, unescape.Replace(f[sep+2]))
	}
	c, _ := nodetest.OfficialClient(t, node.Config{})
	resp, err := c.Mounts(testkit.Context(t))
	if err != nil {
		t.Fatal(err)
	}
	var gotPoints, gotSources []string
	for _, m := range resp.GetMessages()[0].GetStats() {
		gotPoints = append(gotPoints, m.GetMountedOn())
		gotSources = append(gotSources, m.GetFilesystem())
		if m.GetMountedOn() == "/proc" && m.GetSize() != 0 {
			t.Errorf("/proc has size %d", m.GetSize())
		}
		if m.GetMountedOn() == "/" {
			var st syscall.Statfs_t
			if err := syscall.Statfs("/", &st); err != nil {
				t.Fatal(err)
			}
			if want := st.Blocks * uint64(st.Frsize); m.GetSize() != want || m.GetAvailable() > m.GetSize() {
				t.Errorf("/ size %d available %d; statfs says size %d", m.GetSize(), m.GetAvailable(), want)
			}
		}
	}
	if !slices.Equal(gotPoints, points) || !slices.Equal(gotSources, sources) {
		t.Errorf("mounts %v from %v; /proc/self/mountinfo has %v from %v", gotPoints, gotSources, points, sources)
	}
	if !slices.Contains(gotPoints, "/") {
		t.Error("no root mount")
	}
}

// findSocket returns the record with the given protocol and local port.
func findSocket(recs []*machine.ConnectRecord, proto string, localPort, remotePort int) *machine.ConnectRecord {
	for _, r := range recs {
		if r.GetL4Proto() == proto && int(r.GetLocalport()) == localPort && int(r.GetRemoteport()) == remotePort {
			return r
		}
	}
	return nil
}

func TestNetstat(t *testing.T) {
	needProc(t, "net/tcp")
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	port := lis.Addr().(*net.TCPAddr).Port
	client, err := net.Dial("tcp", lis.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	server, err := lis.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer server.Close()
	clientPort := client.LocalAddr().(*net.TCPAddr).Port
	udp, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer udp.Close()
	udpPort := udp.LocalAddr().(*net.UDPAddr).Port

	c, _ := nodetest.OfficialClient(t, node.Config{})
	netstat := func(t *testing.T, req *machine.NetstatRequest) []*machine.ConnectRecord {
		t.Helper()
		resp, err := c.Netstat(testkit.Context(t), req)
		if err != nil {
			t.Fatal(err)
		}
		return resp.GetMessages()[0].GetConnectrecord()
	}
	tcpOnly := &machine.NetstatRequest_L4Proto{Tcp: true}
	host := &machine.NetstatRequest_NetNS{Hostnetwork: true}

	t.Run("listening", func(t *testing.T) {
		recs := netstat(t, &machine.NetstatRequest{Filter: machine.NetstatRequest_LISTENING, L4Proto: tcpOnly, Netns: host})
		r := findSocket(recs, "tcp", port, 0)
		if r == nil || r.GetLocalip() != "127.0.0.1" || r.GetRemoteip() != "0.0.0.0" ||
			r.GetState() != machine.ConnectRecord_LISTEN || r.GetInode() == 0 || r.GetUid() != uint32(os.Getuid()) {
			t.Fatalf("listener on port %d: %v", port, r)
		}
		for _, r := range recs {
			if r.GetL4Proto() != "tcp" || r.GetRemoteport() != 0 {
				t.Errorf("LISTENING tcp returned %v", r)
			}
		}
	})
	t.Run("connected", func(t *testing.T) {
		recs := netstat(t, &machine.NetstatRequest{Filter: machine.NetstatRequest_CONNECTED, L4Proto: tcpOnly})
		out, in := findSocket(recs, "tcp", clientPort, port), findSocket(recs, "tcp", port, clientPort)
		if out == nil || in == nil || out.GetState() != machine.ConnectRecord_ESTABLISHED ||
			out.GetRemoteip() != "127.0.0.1" || in.GetState() != machine.ConnectRecord_ESTABLISHED {
			t.Fatalf("connection %d<->%d: %v, %v", clientPort, port, out, in)
		}
		if findSocket(recs, "tcp", port, 0) != nil {
			t.Error("CONNECTED includes the listener")
		}
	})
	t.Run("all", func(t *testing.T) {
		recs := netstat(t, &machine.NetstatRequest{Filter: machine.NetstatRequest_ALL, L4Proto: tcpOnly})
		if findSocket(recs, "tcp", port, 0) == nil || findSocket(recs, "tcp", clientPort, port) == nil {
			t.Fatal("ALL lacks the listener or the connection")
		}
	})
	t.Run("udp", func(t *testing.T) {
		recs := netstat(t, &machine.NetstatRequest{Filter: machine.NetstatRequest_LISTENING,
			L4Proto: &machine.NetstatRequest_L4Proto{Udp: true}})
		r := findSocket(recs, "udp", udpPort, 0)
		if r == nil || r.GetState() != machine.ConnectRecord_CLOSE || r.GetLocalip() != "127.0.0.1" {
			t.Fatalf("udp socket on port %d: %v", udpPort, r)
		}
		if slices.ContainsFunc(recs, func(r *machine.ConnectRecord) bool { return r.GetL4Proto() != "udp" }) {
			t.Error("a udp-only request returned other protocols")
		}
	})
	t.Run("default protocols and pid", func(t *testing.T) {
		recs := netstat(t, &machine.NetstatRequest{Filter: machine.NetstatRequest_LISTENING,
			Feature: &machine.NetstatRequest_Feature{Pid: true}})
		comm := strings.TrimSpace(string(needProc(t, "self/comm")))
		for _, r := range []*machine.ConnectRecord{findSocket(recs, "tcp", port, 0), findSocket(recs, "udp", udpPort, 0)} {
			if r == nil || r.GetProcess().GetPid() != uint32(os.Getpid()) || r.GetProcess().GetName() != comm {
				t.Errorf("want a socket of pid %d (%s), got %v", os.Getpid(), comm, r)
			}
		}
	})
	t.Run("ipv6", func(t *testing.T) {
		lis6, err := net.Listen("tcp6", "[::1]:0")
		if err != nil {
			t.Skipf("no IPv6 loopback: %v", err)
		}
		defer lis6.Close()
		port6 := lis6.Addr().(*net.TCPAddr).Port
		recs := netstat(t, &machine.NetstatRequest{Filter: machine.NetstatRequest_LISTENING,
			L4Proto: &machine.NetstatRequest_L4Proto{Tcp6: true}})
		if r := findSocket(recs, "tcp6", port6, 0); r == nil || r.GetLocalip() != "::1" || r.GetRemoteip() != "::" {
			t.Fatalf("tcp6 listener on port %d: %v", port6, r)
		}
		if findSocket(recs, "tcp", port, 0) != nil {
			t.Error("a tcp6-only request returned tcp sockets")
		}
	})
	t.Run("other namespaces", func(t *testing.T) {
		for _, ns := range []*machine.NetstatRequest_NetNS{{Allnetns: true, Hostnetwork: true}, {Netns: []string{"cni-1234"}}} {
			_, err := c.Netstat(testkit.Context(t), &machine.NetstatRequest{Netns: ns})
			nodetest.WantCode(t, err, codes.Unimplemented)
		}
	})
}
