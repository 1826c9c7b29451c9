package monitoring

import (
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/prometheus/procfs"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
)

func TestParseDiskstats(t *testing.T) {
	data := []byte(`   8       0 sda 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17
   8       1 sda1 100 0 0 0 200 0 0 0 0 0 0 0 0 0 0 0 0
 104       0 cciss/c0d0 1000 0 0 0 2000 0 0 0 0 0 0
 104       1 cciss/c0d0p1 10000 0 0 0 0 0 0 0 0 0 0
`)
	devs, err := parseDiskstats(data)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range devs {
		names = append(names, d.GetName())
	}
	if !slices.Equal(names, []string{"sda", "sda1", "cciss/c0d0", "cciss/c0d0p1"}) {
		t.Fatalf("names = %q", names)
	}
	sda := devs[0]
	if sda.GetReadCompleted() != 1 || sda.GetWriteSectors() != 7 || sda.GetIoTimeWeightedMs() != 11 ||
		sda.GetDiscardCompleted() != 12 || sda.GetDiscardTimeMs() != 15 {
		t.Errorf("sda = %v", sda)
	}
	if devs[2].GetDiscardCompleted() != 0 || devs[2].GetWriteCompleted() != 2000 {
		t.Errorf("pre-4.18 line = %v", devs[2])
	}

	sys := t.TempDir()
	for _, d := range []string{"sda", "cciss!c0d0"} {
		if err := os.Mkdir(filepath.Join(sys, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if total := diskTotal(devs, wholeDisks(sys)); total.GetReadCompleted() != 1001 || total.GetWriteCompleted() != 2005 {
		t.Errorf("total over whole disks = %v, want partitions left out", total)
	}
	if total := diskTotal(devs, wholeDisks(filepath.Join(sys, "missing"))); total.GetReadCompleted() != 11101 {
		t.Errorf("total without /sys/block = %v, want every line", total)
	}

	for _, bad := range []string{"8 0 sda 1 2 3\n", "8 0 sda 1 2 3 4 5 6 7 8 9 10 x\n"} {
		if _, err := parseDiskstats([]byte(bad)); err == nil {
			t.Errorf("parseDiskstats(%q) succeeded", bad)
		}
	}
}

func TestParseMountinfo(t *testing.T) {
	data := []byte(`22 27 0:21 / /proc rw,relatime shared:5 - proc proc rw
96 27 0:40 / /mnt/with\040space rw,relatime shared:50 master:3 - tmpfs my\134dev rw
97 27 0:41 / /mnt/tab\011and\012newline rw - tmpfs none rw
`)
	got, err := parseMountinfo(data)
	if err != nil {
		t.Fatal(err)
	}
	want := []*machine.MountStat{
		{Filesystem: "proc", MountedOn: "/proc"},
		{Filesystem: `my\dev`, MountedOn: "/mnt/with space"},
		{Filesystem: "none", MountedOn: "/mnt/tab\tand\nnewline"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %v", got)
	}
	for i := range want {
		if got[i].GetFilesystem() != want[i].GetFilesystem() || got[i].GetMountedOn() != want[i].GetMountedOn() {
			t.Errorf("mount %d = %v, want %v", i, got[i], want[i])
		}
	}
	if _, err := parseMountinfo([]byte("22 27 0:21 / /proc rw proc proc rw\n")); err == nil {
		t.Error("a line without the separator was accepted")
	}
	for in, want := range map[string]string{`a\040b`: "a b", `\`: `\`, `a\04`: `a\04`, `\999`: `\999`, `\400`: `\400`} {
		if got := unescapeMountField(in); got != want {
			t.Errorf("unescapeMountField(%q) = %q, want %q", in, got, want)
		}
	}
}

func TestParseSockTable(t *testing.T) {
	if binary.NativeEndian.Uint16([]byte{1, 0}) != 1 {
		t.Skip("the fixture was captured on a little-endian machine")
	}
	tcp := []byte(`  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000003 00:00000000 00000000  1000        0 54321 1 0000000000000000 100 0 0 10 0
   1: 0100007F:A0B2 0100007F:1F90 01 0000000A:00000000 02:000005DC 00000002  1000        0 54322 3 ffff8881 20 4 30 10 -1
`)
	recs, err := parseSockTable(tcp, "tcp", false)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 2 {
		t.Fatalf("records = %v", recs)
	}
	l, c := recs[0], recs[1]
	if l.GetLocalip() != "127.0.0.1" || l.GetLocalport() != 8080 || l.GetRemoteip() != "0.0.0.0" || l.GetRemoteport() != 0 ||
		l.GetState() != machine.ConnectRecord_LISTEN || l.GetRxqueue() != 3 || l.GetUid() != 1000 || l.GetInode() != 54321 ||
		l.GetRef() != 1 || l.GetL4Proto() != "tcp" || l.GetProcess() == nil || hasRemote(l) {
		t.Errorf("listener = %v", l)
	}
	if c.GetLocalport() != 41138 || c.GetRemoteport() != 8080 || c.GetState() != machine.ConnectRecord_ESTABLISHED ||
		c.GetTxqueue() != 10 || c.GetTr() != machine.ConnectRecord_KEEPALIVE || c.GetTimerwhen() != 1500 ||
		c.GetRetrnsmt() != 2 || c.GetRef() != 3 || c.GetPointer() != 0xffff8881 || !hasRemote(c) {
		t.Errorf("connection = %v", c)
	}

	udp6 := []byte(`  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  123: 00000000000000000000000001000000:0035 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000   101        0 777 2 0000000000000000 0
  124: 0000000000000000FFFF00000100007F:0035 B80D0120000000000000000001000000:01BB 01 00000000:00000000 00:00000000 00000000   101        0 778 2 0000000000000000 0
`)
	recs, err = parseSockTable(udp6, "udp6", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(recs) != 2 || recs[0].GetLocalip() != "::1" || recs[0].GetLocalport() != 53 || recs[0].GetRemoteip() != "::" ||
		recs[0].GetState() != machine.ConnectRecord_CLOSE || recs[1].GetLocalip() != "::ffff:127.0.0.1" ||
		recs[1].GetRemoteip() != "2001:db8::1" || recs[1].GetRemoteport() != 443 {
		t.Errorf("udp6 records = %v", recs)
	}

	for _, bad := range []string{
		"0: 0100007F:1F90 00000000:0000 0A\n",
		"0: 0100007F1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n",
		"0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 x\n",
		"0: 0100007F:1F90 00000000:0000 0A 0000000000000000 00:00000000 00000000 0 0 1\n",
	} {
		if _, err := parseSockTable([]byte("header\n"+bad), "tcp", false); err == nil {
			t.Errorf("parseSockTable accepted %q", bad)
		}
	}
}

// TestReadProcessGone checks that a process that has exited is skipped.
func TestReadProcessGone(t *testing.T) {
	pfs, err := procfs.NewFS(procPath)
	if err != nil {
		t.Skipf("no procfs: %v", err)
	}
	cmd := exec.Command("true")
	if err := cmd.Run(); err != nil {
		t.Skipf("cannot run true: %v", err)
	}
	p, err := pfs.Proc(cmd.Process.Pid)
	if err == nil {
		// A new process may have taken the pid meanwhile, but not as "true".
		if info, ok := readProcess(p); ok && info.GetCommand() == "true" {
			t.Errorf("reaped process %d described: %v", cmd.Process.Pid, info)
		}
	}
	self, err := pfs.Self()
	if err != nil {
		t.Fatal(err)
	}
	if info, ok := readProcess(self); !ok || info.GetPid() != int32(os.Getpid()) {
		t.Errorf("own process: %v, %v", info, ok)
	}
}
