package test

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// Memory tests run real apid and agent processes built without the race
// detector and measure what a client that never reads costs them.
//
//	go test ./test -run TestMemory -v
//
// prints the figures quoted in the README's security section.

const (
	// bigFile is the size of the file the streams read: larger than every
	// window and buffer together, so a hop that buffers a whole reply shows.
	bigFile = 11 << 19 // 5.5 MiB
	// hopBudget is what one stream may cost one hop: its HTTP/2 receive
	// window (256 KiB), the per-node buffer of a fan-out (64 KiB), the
	// send quota gRPC keeps per stream (64 KiB) and the messages being
	// relayed, with room for the garbage collector's slack. A hop that
	// held the whole 5.5 MiB reply would cost over five times as much.
	hopBudget = 1 << 20
)

// memCluster is a few nodes, each an `apid agent` and an `apid serve`
// process, with node 0 used as the gateway.
type memCluster struct {
	pki     *testPKI
	port    int
	ips     []string
	procs   []*process
	metrics []string
	file    string
	admin   tls.Certificate
}

func startMemCluster(t *testing.T, subnet, nodes int, extraConfig string) *memCluster {
	t.Helper()
	var ips []string
	for i := 1; i <= nodes; i++ {
		ips = append(ips, fmt.Sprintf("127.0.%d.%d", subnet, 10+i))
	}
	return startMemClusterOn(t, ips, extraConfig, nil)
}

// startMemClusterOn is startMemCluster on the addresses ips; atPort, if not
// nil, learns the port the nodes will listen on before they start.
func startMemClusterOn(t *testing.T, ips []string, extraConfig string, atPort func(port int)) *memCluster {
	t.Helper()
	bin := plainBin(t)
	dir := t.TempDir()
	p := newPKI(t, filepath.Join(dir, "pki"))
	c := &memCluster{pki: p, ips: ips}
	c.port = freePort(t, c.ips...)
	if atPort != nil {
		atPort(c.port)
	}
	mport := freePort(t, c.ips...)
	cmds := [][]string{{"client", "-name", "admin", "-roles", "os:admin", "-ca-dir", p.dir, "-out", p.dir},
		{"client", "-name", "reader", "-roles", "os:reader", "-ca-dir", p.dir, "-out", p.dir}}
	for i, ip := range c.ips {
		cmds = append(cmds, []string{"node", "-name", fmt.Sprintf("node-%d", i+1), "-ip", ip, "-ca-dir", p.dir, "-out", p.dir})
	}
	genAll(t, cmds)
	c.admin = p.load(t, "admin")

	files := filepath.Join(dir, "files")
	if err := os.Mkdir(files, 0o755); err != nil {
		t.Fatal(err)
	}
	c.file = filepath.Join(files, "big")
	data := make([]byte, bigFile)
	for i := range data {
		data[i] = byte('a' + i%26)
	}
	if err := os.WriteFile(c.file, data, 0o644); err != nil {
		t.Fatal(err)
	}
	for i, ip := range c.ips {
		sock := filepath.Join(dir, fmt.Sprintf("agent-%d.sock", i+1))
		startBin(t, bin, "example agent serving", "agent", "-listen", "unix://"+sock,
			"-hostname", fmt.Sprintf("node-%d", i+1), "-read-root", files)
		cfg := writeConfig(t, dir, fmt.Sprintf("node-%d.yaml", i+1), p.nodeConfig(fmt.Sprintf("node-%d", i+1))+extraConfig)
		maddr := net.JoinHostPort(ip, strconv.Itoa(mport))
		c.metrics = append(c.metrics, maddr)
		c.procs = append(c.procs, startBin(t, bin, "apid serving", "serve", "-config", cfg,
			"-listen", net.JoinHostPort(ip, strconv.Itoa(c.port)), "-self", ip,
			"-remote-port", strconv.Itoa(c.port), "-backend", "unix://"+sock, "-admin-listen", maddr, "-drain-delay", "0"))
	}
	return c
}

// dial connects to node i with cert and receive windows as small as HTTP/2
// allows, so what the client does not read stays with apid.
func (c *memCluster) dial(t *testing.T, i int, cert tls.Certificate) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(net.JoinHostPort(c.ips[i], strconv.Itoa(c.port)),
		grpc.WithTransportCredentials(credentials.NewTLS(clientTLS(c.pki.pool, &cert))),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// usage is one process's memory at one moment.
type usage struct{ rss, heap int64 }

func (u usage) String() string {
	return fmt.Sprintf("RSS %.1f MiB, heap in use %.1f MiB", mib(u.rss), mib(u.heap))
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// memory reads node i's apid RSS (from /proc) and Go heap in use (from its
// metrics).
func (c *memCluster) memory(t *testing.T, i int) usage {
	t.Helper()
	return usage{rss: procStatus(t, c.procs[i].cmd.Process.Pid, "VmRSS"), heap: int64(scrape(t, c.metrics[i], "go_memstats_heap_inuse_bytes"))}
}

// procStatus returns a "kB" field of /proc/PID/status in bytes.
func procStatus(t *testing.T, pid int, field string) int64 {
	t.Helper()
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok || name != field {
			continue
		}
		kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 10, 64)
		if err != nil {
			t.Fatalf("%s of %d: %v", field, pid, err)
		}
		return kb << 10
	}
	t.Fatalf("no %s in /proc/%d/status", field, pid)
	return 0
}

// scrape returns the value of a series (a metric's name, with its labels
// if it has any) served at addr.
func scrape(t *testing.T, addr, name string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), name+" "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			return f
		}
	}
	t.Fatalf("%s not served at %s", name, addr)
	return 0
}

// settled waits until node i's apid memory has stopped growing (less than
// 1 MiB more over a second), at most 60 s, and returns it.
func (c *memCluster) settled(t *testing.T, i int) usage {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	last := c.memory(t, i)
	for time.Now().Before(deadline) {
		time.Sleep(time.Second)
		now := c.memory(t, i)
		if now.rss-last.rss < 1<<20 && now.heap-last.heap < 1<<20 {
			return now
		}
		last = now
	}
	t.Logf("node %d memory still growing after 60 s", i)
	return last
}

// openUnread opens n Read streams of the big file with md on one
// connection to the gateway and leaves them unread. The streams end with
// the test.
func (c *memCluster) openUnread(t *testing.T, n int, md ...string) []machine.MachineService_ReadClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cc := c.dial(t, 0, c.admin)
	t.Cleanup(cancel)
	mc := machine.NewMachineServiceClient(cc)
	streams := make([]machine.MachineService_ReadClient, n)
	for i := range streams {
		s, err := mc.Read(metadata.AppendToOutgoingContext(ctx, md...), &machine.ReadRequest{Path: c.file})
		if err != nil {
			t.Fatal(err)
		}
		streams[i] = s
	}
	return streams
}

// delivering fails the test unless every stream's first message is file
// data: a stream that failed at once would hold nothing, and a memory
// figure measured over it would prove nothing.
func delivering(t *testing.T, streams []machine.MachineService_ReadClient) {
	t.Helper()
	for i, s := range streams {
		d, err := s.Recv()
		if err != nil || d.GetMetadata().GetError() != "" || len(d.GetBytes()) == 0 {
			t.Fatalf("stream %d of the measurement was not delivering the file: %v, error entry %q", i, err, d.GetMetadata().GetError())
		}
	}
}

func TestMemoryOfUnreadStreams(t *testing.T) {
	if testing.Short() {
		t.Skip("starts six processes and holds hundreds of streams")
	}
	const streams = 100
	for _, tc := range []struct {
		name     string
		subnet   int
		md       []string
		backends int64 // streams the gateway holds towards nodes per call
		node     bool  // node 1's apid serves part of each call
	}{
		{"fan-out to three nodes", 93, []string{"nodes", "127.0.93.11", "nodes", "127.0.93.12", "nodes", "127.0.93.13"}, 3, true},
		{"one-to-one", 94, []string{"node", "127.0.94.12"}, 1, true},
		{"local", 95, nil, 1, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := startMemCluster(t, tc.subnet, 3, "")
			gw0, node0 := c.settled(t, 0), c.settled(t, 1)
			unread := c.openUnread(t, streams, tc.md...)
			gw1 := c.settled(t, 0)
			node1 := c.settled(t, 1)
			delivering(t, unread)
			grow := func(who string, before, after usage, hops int64) {
				rss, heap := after.rss-before.rss, after.heap-before.heap
				t.Logf("%s: %d unread streams: RSS %+.1f MiB (%.2f MiB a stream), heap %+.1f MiB; before %v, after %v",
					who, streams, mib(rss), mib(rss)/streams, mib(heap), before, after)
				if budget := streams * hops * hopBudget; rss > budget || heap > budget {
					t.Errorf("%s grew by RSS %.1f MiB, heap %.1f MiB for %d streams: over the flow-control budget of %.1f MiB",
						who, mib(rss), mib(heap), streams, mib(budget))
				}
				if rss > 256<<20 {
					t.Errorf("%s grew by %.1f MiB, want under 256 MiB", who, mib(rss))
				}
			}
			grow("gateway", gw0, gw1, tc.backends)
			if tc.node {
				grow("node apid", node0, node1, 1)
			}
		})
	}
}

func TestMemoryOfLargeFanOutRequests(t *testing.T) {
	if testing.Short() {
		t.Skip("starts six processes and sends 300 MiB")
	}
	const (
		calls = 10
		size  = 30 << 20
	)
	c := startMemCluster(t, 96, 3, "")
	cc := c.dial(t, 0, c.admin)
	mc := machine.NewMachineServiceClient(cc)
	req := &emptypb.Empty{}
	req.ProtoReflect().SetUnknown(protowire.AppendBytes(protowire.AppendTag(nil, 1000, protowire.BytesType), make([]byte, size)))
	ctx := metadata.AppendToOutgoingContext(testkit.Context(t), "nodes", c.ips[0], "nodes", c.ips[1], "nodes", c.ips[2])
	if _, err := mc.Version(ctx, &emptypb.Empty{}); err != nil { // connections up before measuring
		t.Fatal(err)
	}
	pid := c.procs[0].cmd.Process.Pid
	before := c.settled(t, 0)
	// Reset the peak so VmHWM is this test's.
	if err := os.WriteFile(fmt.Sprintf("/proc/%d/clear_refs", pid), []byte("5"), 0); err != nil {
		t.Skipf("cannot reset the peak RSS: %v", err)
	}
	var wg sync.WaitGroup
	for range calls {
		wg.Go(func() {
			if _, err := mc.Version(ctx, req, grpc.MaxCallSendMsgSize(size+1024)); err != nil {
				t.Error(err)
			}
		})
	}
	wg.Wait()
	peak := procStatus(t, pid, "VmHWM") - before.rss
	t.Logf("gateway: %d concurrent fan-outs of a %d MiB request to 3 nodes: peak RSS %+.1f MiB (%.1f MiB a call, %.2f times the request)",
		calls, size>>20, mib(peak), mib(peak)/calls, float64(peak)/calls/size)
	// Held once, plus the buffers it arrived in while being read and the
	// garbage collector's slack; three copies, as before, would be over 3.
	if per := float64(peak) / calls / size; per > 2.5 {
		t.Errorf("a %d MiB fan-out request cost the gateway %.2f times its size at peak, want it held once (at most 2.5 with the collector's slack)",
			size>>20, per)
	}
}
