package test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// The fault harness gives every member (the client, the gateway, each
// node) a network namespace of its own, joined to the others by a veth
// pair on a bridge in a hub namespace. Addresses come from 198.18.0.0/24
// (the benchmarking range); no namespace has a route beyond that link. The
// test's own client sockets are created inside the client's namespace; every
// apid and agent runs inside its node's.

// netnsHarness is one such network.
type netnsHarness struct {
	t      *testing.T
	prefix string // of every namespace and interface name
	hub    string
	bin    string
	dir    string
	pki    *testPKI
}

// netnsMember is a namespace on the bridge.
type netnsMember struct {
	ns   string
	ip   string
	peer string // its veth end in the hub, for partitions
}

func run(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

// newNetns builds the hub, or skips the test saying why it cannot.
func newNetns(t *testing.T) *netnsHarness {
	t.Helper()
	why := ""
	if os.Geteuid() != 0 {
		why = "the namespace fault tests need root"
	} else if _, err := exec.LookPath("ip"); err != nil {
		why = "the namespace fault tests need iproute2's ip"
	}
	// The prefix ends in a letter, so that one run's cleanup (by prefix)
	// never matches another's: ap12x is not a prefix of ap123x.
	h := &netnsHarness{t: t, prefix: fmt.Sprintf("ap%dx", os.Getpid()%100000), bin: plainBin(t), dir: t.TempDir()}
	h.hub = h.prefix + "hub"
	if why == "" {
		if out, err := exec.Command("ip", "netns", "add", h.hub).CombinedOutput(); err != nil {
			why = fmt.Sprintf("cannot create a network namespace: %v %s", err, out)
		}
	}
	if why != "" {
		if os.Getenv("APID_REQUIRE_NETNS") != "" {
			t.Fatalf("%s (APID_REQUIRE_NETNS is set)", why)
		}
		t.Skip(why)
	}
	t.Cleanup(func() {
		out, _ := exec.Command("ip", "netns", "list").Output()
		for _, line := range strings.Split(string(out), "\n") {
			if name, _, _ := strings.Cut(line, " "); strings.HasPrefix(name, h.prefix) {
				_ = exec.Command("ip", "netns", "del", name).Run()
			}
		}
	})
	run(t, "ip", "-n", h.hub, "link", "add", "br0", "type", "bridge")
	run(t, "ip", "-n", h.hub, "link", "set", "br0", "up")
	h.pki = newPKI(t, filepath.Join(h.dir, "pki"))
	return h
}

// member adds namespace name with address 198.18.0.<host> on the bridge.
func (h *netnsHarness) member(name string, host int) *netnsMember {
	t := h.t
	t.Helper()
	m := &netnsMember{ns: h.prefix + name, ip: fmt.Sprintf("198.18.0.%d", host), peer: fmt.Sprintf("%sh%d", h.prefix, host)}
	run(t, "ip", "netns", "add", m.ns)
	local := fmt.Sprintf("%sm%d", h.prefix, host)
	run(t, "ip", "link", "add", local, "type", "veth", "peer", "name", m.peer)
	run(t, "ip", "link", "set", local, "netns", m.ns, "name", "eth0")
	run(t, "ip", "link", "set", m.peer, "netns", h.hub)
	run(t, "ip", "-n", h.hub, "link", "set", m.peer, "master", "br0", "up")
	run(t, "ip", "-n", m.ns, "addr", "add", m.ip+"/24", "dev", "eth0")
	run(t, "ip", "-n", m.ns, "link", "set", "eth0", "up")
	run(t, "ip", "-n", m.ns, "link", "set", "lo", "up")
	return m
}

// partition cuts m off the bridge (its hub end goes down: no FIN, no RST,
// nothing reaches either side), or heals it.
func (h *netnsHarness) partition(m *netnsMember, cut bool) {
	state := "up"
	if cut {
		state = "down"
	}
	run(h.t, "ip", "-n", h.hub, "link", "set", m.peer, state)
}

// start runs apid (the plain build) with args inside m's namespace.
func (h *netnsHarness) start(m *netnsMember, ready string, args ...string) *process {
	h.t.Helper()
	return startCmd(h.t, exec.Command("ip", append([]string{"netns", "exec", m.ns, h.bin}, args...)...), ready)
}

// node starts an example agent reading files under root and an apid in
// front of it in m's namespace.
func (h *netnsHarness) node(m *netnsMember, name, root, extraConfig string) (agent, apid *process) {
	h.t.Helper()
	sock := filepath.Join(h.dir, name+".sock")
	agent = h.start(m, "example agent serving", "agent", "-listen", "unix://"+sock, "-hostname", name, "-read-root", root)
	apid = h.serve(m, name, sock, extraConfig)
	return agent, apid
}

// serve starts m's apid (again, after a kill).
func (h *netnsHarness) serve(m *netnsMember, name, sock, extraConfig string) *process {
	h.t.Helper()
	admin := "" // the gateway's admin endpoint shows its view of the nodes
	if name == "gateway" {
		admin = net.JoinHostPort(m.ip, "50001")
	}
	cfg := writeConfig(h.t, h.dir, name+".yaml", h.pki.nodeConfig(name)+fmt.Sprintf("listen: %q\nbackend: %q\nadminListen: %q\nadminPublic: true\ndrainDelay: 0s\nshutdownTimeout: 2s\nlogLevel: warn\n%s",
		net.JoinHostPort(m.ip, "50000"), "unix://"+sock, admin, extraConfig))
	return h.start(m, "", "serve", "-config", cfg, "-self", m.ip)
}

// dialer creates its sockets inside namespace ns: on a thread of its own
// that enters ns and is never given back to the scheduler.
func dialer(ns string) func(context.Context, string) (net.Conn, error) {
	return func(ctx context.Context, addr string) (net.Conn, error) {
		type result struct {
			c   net.Conn
			err error
		}
		ch := make(chan result, 1)
		go func() {
			runtime.LockOSThread() // not unlocked: the thread ends with this goroutine
			f, err := os.Open("/run/netns/" + ns)
			if err == nil {
				err = unix.Setns(int(f.Fd()), unix.CLONE_NEWNET)
				f.Close()
			}
			if err != nil {
				ch <- result{nil, err}
				return
			}
			var d net.Dialer
			c, err := d.DialContext(ctx, "tcp", addr)
			ch <- result{c, err}
		}()
		r := <-ch
		return r.c, r.err
	}
}

// client connects to addr from inside namespace ns as os:admin.
func (h *netnsHarness) client(ns, addr string) machine.MachineServiceClient {
	h.t.Helper()
	admin := h.pki.load(h.t, "admin")
	cc, err := grpc.NewClient(addr, grpc.WithContextDialer(dialer(ns)), grpc.WithTransportCredentials(credentials.NewTLS(
		&tls.Config{RootCAs: h.pki.pool, Certificates: []tls.Certificate{admin}, MinVersion: tls.VersionTLS13})))
	if err != nil {
		h.t.Fatal(err)
	}
	h.t.Cleanup(func() { cc.Close() })
	return machine.NewMachineServiceClient(cc)
}

// faultCluster is a client, a gateway and five nodes, each in its own
// namespace.
type faultCluster struct {
	h       *netnsHarness
	client  *netnsMember
	gateway *netnsMember
	nodes   []*netnsMember
	agents  []*process
	apids   []*process
	file    string // served by every node's Read
	mc      machine.MachineServiceClient
	gwAgent *process
	root    string
}

const faultNodes = 5

func startFaultCluster(t *testing.T, extraConfig string) *faultCluster {
	h := newNetns(t)
	c := &faultCluster{h: h, client: h.member("cli", 2), gateway: h.member("gw", 3)}
	cmds := [][]string{
		{"client", "-name", "admin", "-roles", "os:admin", "-ca-dir", h.pki.dir, "-out", h.pki.dir},
		{"node", "-name", "gateway", "-ip", c.gateway.ip, "-ca-dir", h.pki.dir, "-out", h.pki.dir},
	}
	for i := range faultNodes {
		m := h.member(fmt.Sprintf("n%d", i+1), 11+i)
		c.nodes = append(c.nodes, m)
		cmds = append(cmds, []string{"node", "-name", fmt.Sprintf("node-%d", i+1), "-ip", m.ip, "-ca-dir", h.pki.dir, "-out", h.pki.dir})
	}
	genAll(t, cmds)
	root := filepath.Join(h.dir, "files")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	c.file = filepath.Join(root, "data")
	data := make([]byte, 4<<20)
	for i := range data {
		data[i] = byte(i*7 + i/4096)
	}
	if err := os.WriteFile(c.file, data, 0o644); err != nil {
		t.Fatal(err)
	}
	for i, m := range c.nodes {
		a, p := h.node(m, fmt.Sprintf("node-%d", i+1), root, extraConfig)
		c.agents, c.apids = append(c.agents, a), append(c.apids, p)
	}
	c.root = root
	c.gwAgent, _ = h.node(c.gateway, "gateway", root, extraConfig)
	c.mc = h.client(c.client.ns, net.JoinHostPort(c.gateway.ip, "50000"))
	// Every node answers through the gateway before any fault.
	if !testkit.Eventually(30*time.Second, func() bool {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		resp, err := c.mc.Version(c.nodesCtx(ctx), &emptypb.Empty{})
		return err == nil && entryErrors(resp) == 0
	}) {
		t.Fatal("the namespace cluster did not come up within 30 s")
	}
	return c
}

// adminClient reaches the gateway's admin endpoint from inside the client's
// namespace, one connection a request (kept-alive connections would count
// among the gateway's goroutines).
func (c *faultCluster) adminClient() http.Client {
	return http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true,
		DialContext: func(ctx context.Context, _, addr string) (net.Conn, error) { return dialer(c.client.ns)(ctx, addr) }}}
}

// nodeConnection is the gateway's connection state to node, from its
// /nodes page (read from inside the client's namespace).
func (c *faultCluster) nodeConnection(t *testing.T, node string) string {
	t.Helper()
	hc := c.adminClient()
	resp, err := hc.Get("http://" + net.JoinHostPort(c.gateway.ip, "50001") + "/nodes?format=json")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var page struct {
		Nodes []struct{ Node, Connection string }
	}
	if err := json.NewDecoder(resp.Body).Decode(&page); err != nil {
		t.Fatal(err)
	}
	for _, n := range page.Nodes {
		if n.Node == node {
			return n.Connection
		}
	}
	return "none"
}

func (c *faultCluster) ips() []string {
	var out []string
	for _, m := range c.nodes {
		out = append(out, m.ip)
	}
	return out
}

func (c *faultCluster) nodesCtx(ctx context.Context) context.Context {
	return metadata.AppendToOutgoingContext(ctx, "nodes", strings.Join(c.ips(), ","))
}

func entryErrors(resp *machine.VersionResponse) int {
	n := 0
	for _, m := range resp.GetMessages() {
		if m.Metadata.GetError() != "" {
			n++
		}
	}
	return n
}

// timedFanOut makes one Version fan-out and returns its time and the
// failed entries.
func (c *faultCluster) timedFanOut(t *testing.T) (time.Duration, []*common.Metadata) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = c.nodesCtx(ctx)
	start := time.Now()
	resp, err := c.mc.Version(ctx, &emptypb.Empty{})
	d := time.Since(start)
	if err != nil || len(resp.Messages) != faultNodes {
		t.Fatalf("fan-out: %v, %v", resp, err)
	}
	var failed []*common.Metadata
	for _, m := range resp.Messages {
		if m.Metadata.GetError() != "" {
			failed = append(failed, m.Metadata)
		}
	}
	return d, failed
}

func medianDuration(ds []time.Duration) time.Duration {
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[len(s)/2]
}

// TestNetnsPartitionEjectsAndRecovers: a fan-out to five nodes, one of them
// partitioned (no FIN, no RST). The first fan-outs cost the per-node
// deadline; once the node is ejected a fan-out costs what a healthy one
// does; after the partition heals the node is back within the ejection
// cap and one call.
func TestNetnsPartitionEjectsAndRecovers(t *testing.T) {
	// The node deadline is the gateway's own (a deadline the client sets
	// says nothing about the node and ejects nobody).
	c := startFaultCluster(t, "nodeTimeout: 1s\nejection:\n  consecutiveFailures: 3\n  baseTime: 2s\n  maxTime: 4s\n  maxPercent: 50\n")
	time.Sleep(6 * time.Second) // the start-up fan-outs' workers go idle and exit
	base := c.goroutines(t)
	var healthy []time.Duration
	for range 20 {
		d, failed := c.timedFanOut(t)
		if len(failed) != 0 {
			t.Fatalf("healthy fan-out had failures: %v", failed)
		}
		healthy = append(healthy, d)
	}
	cut := c.nodes[2]
	c.h.partition(cut, true)
	var first []time.Duration
	for range 3 {
		d, failed := c.timedFanOut(t)
		if len(failed) != 1 || failed[0].Hostname != cut.ip {
			t.Fatalf("fan-out with %s partitioned: failed %v", cut.ip, failed)
		}
		first = append(first, d)
	}
	var ejected []time.Duration
	for range 20 {
		d, failed := c.timedFanOut(t)
		// Skipped as ejected, or, when a probe is let through, its deadline.
		if len(failed) != 1 || !strings.Contains(failed[0].Error, "ejected") && failed[0].GetStatus().GetCode() != int32(codes.DeadlineExceeded) {
			t.Fatalf("fan-out after ejection: failed %v", failed)
		}
		if strings.Contains(failed[0].Error, "ejected") {
			ejected = append(ejected, d)
		}
	}
	if len(ejected) < 10 {
		t.Fatalf("only %d of 20 fan-outs skipped the ejected node", len(ejected))
	}
	c.h.partition(cut, false)
	healed := time.Now()
	var back time.Duration
	if !testkit.Eventually(30*time.Second, func() bool {
		_, failed := c.timedFanOut(t)
		back = time.Since(healed)
		return len(failed) == 0
	}) {
		t.Fatal("the healed node did not come back within 30 s")
	}
	h, e := medianDuration(healthy), medianDuration(ejected)
	t.Logf("fan-out to %d nodes: healthy median %s; partitioned, first 3 fan-outs %v (per-node deadline 1 s); once ejected, median %s (%+.1f ms); healed node answering again after %s (ejection cap 4 s)",
		faultNodes, h.Round(10*time.Microsecond), first, e.Round(10*time.Microsecond), float64(e-h)/1e6, back.Round(time.Millisecond))
	if e > h+5*time.Millisecond {
		t.Errorf("an ejected node costs %s more than a healthy fan-out, want at most 5 ms", e-h)
	}
	// A first probe may still meet the healed link's TCP retransmission
	// backoff and fail: allow two ejection periods at the cap.
	if back > 2*4400*time.Millisecond+2*time.Second {
		t.Errorf("recovery took %s, want at most two 4 s ejections (plus jitter) and one call", back)
	}
	c.settled(t, base)
}

// readAll reads a Read stream to its end: the bytes of each node, in order,
// and the error entries.
func readAll(s machine.MachineService_ReadClient) (map[string][]byte, map[string]string, error) {
	data, errs := map[string][]byte{}, map[string]string{}
	for {
		m, err := s.Recv()
		if errors.Is(err, io.EOF) {
			return data, errs, nil
		}
		if err != nil {
			return data, errs, err
		}
		host := m.Metadata.GetHostname()
		if e := m.Metadata.GetError(); e != "" {
			errs[host] = e
			continue
		}
		data[host] = append(data[host], m.Bytes...)
	}
}

// TestNetnsNodeKilledMidStream: a streamed fan-out of a 4 MiB file from
// five nodes; one node's apid is killed (SIGKILL) once the stream runs.
// That node's error entry arrives; every other node's bytes arrive once,
// in order, equal to what the node gives when asked alone. The node,
// restarted, answers again within the reconnect backoff cap.
func TestNetnsNodeKilledMidStream(t *testing.T) {
	// Ejection off: the restart below measures reconnection, not ejection.
	c := startFaultCluster(t, "ejection:\n  consecutiveFailures: 0\n")
	time.Sleep(6 * time.Second) // the start-up fan-outs' workers go idle and exit
	base := c.goroutines(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	want, err := os.ReadFile(c.file)
	if err != nil {
		t.Fatal(err)
	}
	victim := 1
	s, err := c.mc.Read(c.nodesCtx(ctx), &machine.ReadRequest{Path: c.file})
	if err != nil {
		t.Fatal(err)
	}
	first, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	_ = c.apids[victim].cmd.Process.Kill()
	data, errs, err := readAll(s)
	if err != nil {
		t.Fatalf("the stream failed instead of carrying the dead node's error: %v", err)
	}
	if h := first.Metadata.GetHostname(); first.Metadata.GetError() == "" {
		data[h] = append(append([]byte(nil), first.Bytes...), data[h]...)
	}
	vip := c.nodes[victim].ip
	if errs[vip] == "" && bytes.Equal(data[vip], want) {
		t.Log("the killed node's stream had already ended before the kill")
	} else if errs[vip] == "" {
		t.Fatalf("no error entry for the killed node %s; errors %v", vip, errs)
	}
	for i, m := range c.nodes {
		if i == victim {
			continue
		}
		if errs[m.ip] != "" || !bytes.Equal(data[m.ip], want) {
			t.Errorf("node %s: %d bytes (want %d, equal to the file), error %q", m.ip, len(data[m.ip]), len(want), errs[m.ip])
		}
	}
	t.Logf("killed %s mid-stream: its entry %q; the other %d nodes delivered %d bytes each, byte for byte",
		vip, errs[vip], faultNodes-1, len(want))

	// Restart it: calls to it succeed again within the 15 s backoff cap.
	<-c.apids[victim].exited
	restarted := time.Now()
	c.apids[victim] = c.h.serve(c.nodes[victim], fmt.Sprintf("node-%d", victim+1), filepath.Join(c.h.dir, fmt.Sprintf("node-%d.sock", victim+1)), "")
	var back time.Duration
	if !testkit.Eventually(40*time.Second, func() bool {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.mc.Version(metadata.AppendToOutgoingContext(cctx, "node", vip), &emptypb.Empty{})
		back = time.Since(restarted)
		if err != nil {
			time.Sleep(250 * time.Millisecond)
		}
		return err == nil
	}) {
		t.Fatal("the restarted node did not answer within 40 s")
	}
	t.Logf("restarted node answering again after %s", back.Round(time.Millisecond))
	// The cap is 15 s; gRPC's backoff adds up to 20 % jitter.
	if back > 20*time.Second {
		t.Errorf("restarted node back after %s, want within the 15 s backoff cap (plus jitter)", back)
	}
	c.settled(t, base)
}

// TestNetnsPeerVanishesUnderStream: a node's link goes down (no FIN, no
// RST) while a one-to-one stream to it runs through the gateway and while
// another node's pooled connection is idle. With tcpUserTimeout 5s the
// gateway notices on the running stream, which ends with that node's
// error, and on the idle connection, which the next call dials afresh.
func TestNetnsPeerVanishesUnderStream(t *testing.T) {
	c := startFaultCluster(t, "tcpUserTimeout: 5s\n")
	time.Sleep(6 * time.Second) // the start-up fan-outs' workers go idle and exit
	base := c.goroutines(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	streamed, idle := c.nodes[0], c.nodes[4]
	s, err := c.mc.Logs(metadata.AppendToOutgoingContext(ctx, "node", streamed.ip), &machine.LogsRequest{Id: "agent", Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Header(); err != nil {
		t.Fatal(err)
	}
	c.h.partition(streamed, true)
	c.h.partition(idle, true)
	cut := time.Now()
	// Keep the stream's connection busy: the gateway writes to the node
	// (keepalive pings), which the dead link never acknowledges.
	for err == nil {
		_, err = s.Recv()
	}
	detected := time.Since(cut)
	if status.Code(err) != codes.Unavailable && status.Code(err) != codes.Internal {
		t.Fatalf("stream to the vanished node ended with %v, want UNAVAILABLE", err)
	}
	t.Logf("stream to a node gone without FIN ended after %s with: %v", detected.Round(time.Millisecond), err)
	if detected > 5*time.Second+10*time.Second+5*time.Second {
		t.Errorf("detected after %s, want within tcpUserTimeout (5 s) + 10 s", detected)
	}
	// The idle node's pooled connection was found dead too: the gateway's
	// /nodes no longer calls it READY.
	var state string
	if !testkit.Eventually(20*time.Second, func() bool {
		state = c.nodeConnection(t, idle.ip)
		return state != "READY"
	}) {
		t.Fatalf("the idle connection to a vanished node still READY %s after the cut", time.Since(cut).Round(time.Second))
	}
	t.Logf("idle pooled connection to a node gone without FIN: %s after %s", state, time.Since(cut).Round(time.Second))
	// The idle node heals; the next call to it works on a fresh connection.
	c.h.partition(idle, false)
	if !testkit.Eventually(30*time.Second, func() bool {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.mc.Version(metadata.AppendToOutgoingContext(cctx, "node", idle.ip), &emptypb.Empty{})
		return err == nil
	}) {
		t.Fatal("the healed idle node did not answer within 30 s")
	}
	// Heal the streamed node too; once it answers, nothing is left over.
	c.h.partition(streamed, false)
	if !testkit.Eventually(30*time.Second, func() bool {
		cctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_, err := c.mc.Version(metadata.AppendToOutgoingContext(cctx, "node", streamed.ip), &emptypb.Empty{})
		return err == nil
	}) {
		t.Fatal("the healed streamed node did not answer within 30 s")
	}
	c.settled(t, base)
}

// TestNetnsLocalAgentRestart: the gateway's own agent is down for 30 s
// while calls keep arriving, then comes back: local calls succeed again
// within the 15 s reconnect backoff cap (gRPC's default backoff grows to
// 2 minutes; the connection to the local agent is capped like the others).
func TestNetnsLocalAgentRestart(t *testing.T) {
	if testing.Short() {
		t.Skip("30 s of agent downtime")
	}
	c := startFaultCluster(t, "")
	local := func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		_, err := c.mc.Version(ctx, &emptypb.Empty{})
		return err
	}
	if err := local(); err != nil {
		t.Fatal(err)
	}
	c.gwAgent.stop(t)
	down := time.Now()
	failed := 0
	for time.Since(down) < 30*time.Second {
		if local() != nil {
			failed++
		}
		time.Sleep(time.Second)
	}
	if failed == 0 {
		t.Fatal("local calls succeeded with the agent down")
	}
	sock := filepath.Join(c.h.dir, "gateway.sock")
	_ = os.Remove(sock)
	c.gwAgent = c.h.start(c.gateway, "example agent serving", "agent", "-listen", "unix://"+sock, "-hostname", "gateway", "-read-root", c.root)
	restarted := time.Now()
	var back time.Duration
	if !testkit.Eventually(60*time.Second, func() bool {
		back = time.Since(restarted)
		return local() == nil
	}) {
		t.Fatal("local calls did not succeed within 60 s of the agent's restart")
	}
	t.Logf("local agent down 30 s (%d calls failed meanwhile), restarted: local calls succeed again after %s", failed, back.Round(time.Millisecond))
	// The cap is 15 s; gRPC's backoff adds up to 20 % jitter.
	if back > 20*time.Second {
		t.Errorf("local calls back after %s, want within the 15 s backoff cap (plus jitter)", back)
	}
}

// TestNetnsStoppedNode: a node's apid is stopped (SIGSTOP: its kernel
// still acknowledges TCP, the process answers nothing) under a one-to-one
// unary call without a deadline and under a stream. With TCP alive, only
// gRPC keepalive can tell: the test reports what each waits for.
func TestNetnsStoppedNode(t *testing.T) {
	if testing.Short() {
		t.Skip("waits for keepalive")
	}
	c := startFaultCluster(t, "")
	stopped := c.nodes[3]
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	s, err := c.mc.Logs(metadata.AppendToOutgoingContext(ctx, "node", stopped.ip), &machine.LogsRequest{Id: "agent", Follow: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s.Header(); err != nil {
		t.Fatal(err)
	}
	p := c.apids[3]
	_ = p.cmd.Process.Signal(syscall.SIGSTOP)
	t.Cleanup(func() { _ = p.cmd.Process.Signal(syscall.SIGCONT) })
	start := time.Now()
	unary := make(chan time.Duration, 1)
	go func() {
		_, err := c.mc.Version(metadata.AppendToOutgoingContext(ctx, "node", stopped.ip), &emptypb.Empty{})
		t.Logf("unary to the stopped node: %v", err)
		unary <- time.Since(start)
	}()
	for err == nil {
		_, err = s.Recv()
	}
	streamEnded := time.Since(start)
	var unaryEnded time.Duration
	select {
	case unaryEnded = <-unary:
	case <-ctx.Done():
		t.Fatal("the unary call to the stopped node never ended")
	}
	t.Logf("node stopped (SIGSTOP): its stream ended after %s (%v); a unary call without deadline after %s",
		streamEnded.Round(time.Millisecond), status.Code(err), unaryEnded.Round(time.Millisecond))
	if streamEnded > 30*time.Second || unaryEnded > 30*time.Second {
		t.Errorf("a stopped node held calls for %s and %s, want within gRPC keepalive (15 s + 5 s) and a margin", streamEnded, unaryEnded)
	}
}

// goroutines is the gateway's goroutine count, from its /metrics.
func (c *faultCluster) goroutines(t *testing.T) float64 {
	t.Helper()
	hc := c.adminClient()
	resp, err := hc.Get("http://" + net.JoinHostPort(c.gateway.ip, "50001") + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "go_goroutines "); ok {
			var f float64
			fmt.Sscan(v, &f)
			return f
		}
	}
	t.Fatal("no go_goroutines")
	return 0
}

// settled waits until the gateway's goroutines are back to at most base
// (plus slack for a connection being redialled), as fan-out workers exit
// after 5 s idle.
func (c *faultCluster) settled(t *testing.T, base float64) {
	t.Helper()
	var now float64
	if !testkit.Eventually(30*time.Second, func() bool {
		now = c.goroutines(t)
		return now <= base+4
	}) {
		t.Errorf("gateway goroutines %.0f after the scenario, %.0f before: something was left behind", now, base)
	}
}

// TestNetnsFlappingAndOneWay: a node's link flaps (down and up every
// 300 ms for 6 s) while fan-outs run, then its replies are dropped one way
// only (a blackhole route in the node's namespace towards the gateway).
// Every fan-out returns in time with the healthy nodes' replies whole, the
// node is back once the faults end, and the gateway is left with the
// goroutines it had.
func TestNetnsFlappingAndOneWay(t *testing.T) {
	c := startFaultCluster(t, "nodeTimeout: 1s\nejection:\n  consecutiveFailures: 3\n  baseTime: 1s\n  maxTime: 2s\n  maxPercent: 50\n")
	time.Sleep(6 * time.Second) // the start-up fan-outs' workers go idle and exit
	base := c.goroutines(t)
	node := c.nodes[1]
	check := func(what string) {
		d, failed := c.timedFanOut(t)
		for _, f := range failed {
			if f.Hostname != node.ip {
				t.Fatalf("%s: healthy node %s failed: %v", what, f.Hostname, f.Error)
			}
		}
		if d > 3*time.Second {
			t.Fatalf("%s: a fan-out took %s", what, d)
		}
	}
	flapping := make(chan struct{})
	go func() {
		defer close(flapping)
		for i := 0; i < 20; i++ {
			c.h.partition(node, i%2 == 0)
			time.Sleep(300 * time.Millisecond)
		}
		c.h.partition(node, false)
	}()
	fanOuts := 0
	for done := false; !done; fanOuts++ {
		select {
		case <-flapping:
			done = true
		default:
		}
		check("flapping")
	}
	run(t, "ip", "-n", node.ns, "route", "add", "blackhole", c.gateway.ip+"/32")
	for range 10 {
		check("one-way")
	}
	run(t, "ip", "-n", node.ns, "route", "del", "blackhole", c.gateway.ip+"/32")
	var back time.Duration
	healed := time.Now()
	if !testkit.Eventually(30*time.Second, func() bool {
		_, failed := c.timedFanOut(t)
		back = time.Since(healed)
		return len(failed) == 0
	}) {
		t.Fatal("the node did not come back within 30 s of the faults ending")
	}
	t.Logf("%d fan-outs while the link flapped and 10 with replies dropped one way, each in time with the healthy nodes whole; the node answers again %s after the faults end",
		fanOuts, back.Round(time.Millisecond))
	c.settled(t, base)
}
