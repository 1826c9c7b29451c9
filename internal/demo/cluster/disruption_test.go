package cluster_test

import (
	"bufio"
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/internal/demo/cluster"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/pki"
)

// rollingCluster is a demo cluster of three control-plane nodes and two
// workers in this process, whose simulated reboots keep a node's API and
// etcd member down for a second, and the admin's official client, through
// node-1's apid.
type rollingCluster struct {
	t       testing.TB
	dir     string
	ip      string // node-1's
	port    int
	log     *testkit.Buffer // every node's log, one JSON object a line
	cancel  context.CancelFunc
	ran     chan error
	admin   *client.Client
	stopped bool
}

func startRollingCluster(t *testing.T, first string) *rollingCluster {
	return startCluster(t, first, 5, time.Second)
}

// startCluster starts a demo of n nodes whose reboots keep a node down
// for downtime.
func startCluster(t testing.TB, first string, n int, downtime time.Duration) *rollingCluster {
	l, err := net.Listen("tcp", first+":0")
	if err != nil {
		t.Skipf("no %s here: %v", first, err)
	}
	port := l.Addr().(*net.TCPAddr).Port
	l.Close()
	c := &rollingCluster{t: t, dir: t.TempDir(), ip: first, port: port, log: &testkit.Buffer{}, ran: make(chan error, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	c.cancel = cancel
	var out testkit.Buffer
	go func() {
		c.ran <- cluster.Run(ctx, cluster.Options{Dir: c.dir, Nodes: n, Port: port, FirstIP: netip.MustParseAddr(first),
			Downtime: downtime, LogLevel: "warn", LogFormat: "text",
			Log: slog.New(slog.NewJSONHandler(c.log, &slog.HandlerOptions{Level: slog.LevelInfo}))}, &out)
	}()
	t.Cleanup(c.stop)
	if !testkit.Eventually(2*time.Minute, func() bool { return strings.Contains(out.String(), fmt.Sprintf("%d nodes up", n)) }) {
		c.stop()
		t.Fatalf("not up:\n%s", out.String())
	}
	cfg, err := clientconfig.Open(filepath.Join(c.dir, "talosconfig"))
	if err != nil {
		t.Fatal(err)
	}
	if c.admin, err = client.New(ctx, client.WithConfig(cfg), client.WithEndpoints(c.endpoint())); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.admin.Close() })
	return c
}

func (c *rollingCluster) endpoint() string { return net.JoinHostPort(c.ip, strconv.Itoa(c.port)) }

// stop ends the cluster (its apids drain) and waits for it.
func (c *rollingCluster) stop() {
	if c.stopped {
		return
	}
	c.stopped = true
	c.cancel()
	select {
	case err := <-c.ran:
		if err != nil {
			c.t.Errorf("cluster: %v", err)
		}
	case <-time.After(time.Minute):
		c.t.Error("the cluster did not stop within a minute")
	}
}

// clientThrough returns the admin's official client through the apid at
// endpoint.
func (c *rollingCluster) clientThrough(endpoint string) *client.Client {
	cfg, err := clientconfig.Open(filepath.Join(c.dir, "talosconfig"))
	if err != nil {
		c.t.Fatal(err)
	}
	cl, err := client.New(context.Background(), client.WithConfig(cfg), client.WithEndpoints(endpoint))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { cl.Close() })
	return cl
}

// clientWith returns the official client of a certificate the demo's CA
// issues for roles, through node-1's apid.
func (c *rollingCluster) clientWith(roles ...string) *client.Client {
	ca, err := pki.ReadCA(filepath.Join(c.dir, "ca.crt"), filepath.Join(c.dir, "ca.key"))
	if err != nil {
		c.t.Fatal(err)
	}
	crt, key, err := ca.IssueClient("test-"+strings.Join(roles, "-"), roles, time.Hour, pki.KeyECDSA)
	if err != nil {
		c.t.Fatal(err)
	}
	cl, err := client.New(context.Background(), client.WithEndpoints(c.endpoint()), client.WithConfig(&clientconfig.Config{
		Context: "t", Contexts: map[string]*clientconfig.Context{"t": {Endpoints: []string{c.endpoint()}, CA: b64(ca.CertPEM), Crt: b64(crt), Key: b64(key)}},
	}))
	if err != nil {
		c.t.Fatal(err)
	}
	c.t.Cleanup(func() { cl.Close() })
	return cl
}

// downtime is one node's simulated time down, as the node itself logged it.
type downtime struct {
	node     string
	down, up time.Time
}

// downtimes reads, from the nodes' own logs, when each went down and came
// back since since.
func (c *rollingCluster) downtimes(since time.Time) []downtime {
	var out []downtime
	open := map[string]int{}
	sc := bufio.NewScanner(strings.NewReader(c.log.String()))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		var line struct {
			Time time.Time `json:"time"`
			Msg  string    `json:"msg"`
			Node string    `json:"node"`
		}
		if json.Unmarshal(sc.Bytes(), &line) != nil || line.Time.Before(since) {
			continue
		}
		switch {
		case strings.Contains(line.Msg, "the simulated node is down"):
			open[line.Node] = len(out)
			out = append(out, downtime{node: line.Node, down: line.Time})
		case strings.Contains(line.Msg, "the simulated node is up again"):
			if i, ok := open[line.Node]; ok {
				out[i].up = line.Time
				delete(open, line.Node)
			}
		}
	}
	return out
}

// checkOneAtATime fails the test if two nodes of group were down at once
// (etcd's three members never lost two), and returns the order they went
// down in.
func checkOneAtATime(t *testing.T, spans []downtime, group []string) []string {
	t.Helper()
	var in []downtime
	for _, s := range spans {
		if slices.Contains(group, s.node) {
			in = append(in, s)
		}
	}
	sort.Slice(in, func(i, j int) bool { return in[i].down.Before(in[j].down) })
	var order []string
	for i, s := range in {
		order = append(order, s.node)
		if s.up.IsZero() {
			t.Errorf("%s went down at %s and never came back", s.node, s.down.Format(time.StampMilli))
		}
		if i > 0 && s.down.Before(in[i-1].up) {
			t.Errorf("%s went down at %s while %s was down (back at %s)", s.node, s.down.Format(time.StampMilli),
				in[i-1].node, in[i-1].up.Format(time.StampMilli))
		}
	}
	return order
}

var (
	controlPlane = []string{"node-1", "node-2", "node-3"}
	workers      = []string{"node-4", "node-5"}
)

// bootIDOf reads node's boot ID through the gateway, as talosctl does.
func bootIDOf(ctx context.Context, cl *client.Client, node string) (string, error) {
	ctx, cancel := context.WithTimeout(client.WithNode(ctx, node), 5*time.Second)
	defer cancel()
	r, err := cl.Read(ctx, "/proc/sys/kernel/random/boot_id")
	if err != nil {
		return "", err
	}
	defer r.Close()
	b, err := io.ReadAll(r)
	return strings.TrimSpace(string(b)), err
}

// rebootLikeTalosctl is talosctl reboot's sequence for one node (v1.13
// with --wait, and every v1.14 command): subscribe to the node's events,
// read its boot ID, reboot it, and wait until it answers with a new boot ID.
func rebootLikeTalosctl(ctx context.Context, cl *client.Client, node string) error {
	events := make(chan client.EventResult)
	watchCtx, stopWatching := context.WithCancel(client.WithNode(ctx, node))
	defer stopWatching()
	if err := cl.EventsWatchV2(watchCtx, events, client.WithTailEvents(0)); err != nil {
		return fmt.Errorf("%s: events: %w", node, err)
	}
	go func() {
		for { // the tracker reads them; the boot ID decides here
			select {
			case <-events:
			case <-watchCtx.Done():
				return
			}
		}
	}()
	before, err := bootIDOf(ctx, cl, node)
	if err != nil {
		return fmt.Errorf("%s: boot ID: %w", node, err)
	}
	if err := cl.Reboot(client.WithNode(ctx, node)); err != nil {
		return fmt.Errorf("%s: reboot: %w", node, err)
	}
	for {
		if after, err := bootIDOf(ctx, cl, node); err == nil && after != before {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: no new boot: %w", node, ctx.Err())
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// TestRollingByDefault: through one gateway, every way talosctl reboots
// several nodes at once is turned into one node of a group at a time, the
// gateway's own node last, without any caller failing; a call held too
// long says what held it; the escape hatch is the admin's, from the caller
// itself, with a reason; calls that take nothing down never wait; a
// draining gateway refuses what it holds, saying to retry elsewhere.
func TestRollingByDefault(t *testing.T) {
	c := startRollingCluster(t, "127.0.97.11")
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	defer cancel()

	t.Run("per node, at once (talosctl v1.13 --wait, v1.14)", func(t *testing.T) {
		since := time.Now()
		var wg sync.WaitGroup
		errs := make([]error, len(controlPlane))
		for i, n := range controlPlane {
			wg.Go(func() { errs[i] = rebootLikeTalosctl(ctx, c.admin, n) })
		}
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
		order := checkOneAtATime(t, c.downtimes(since), controlPlane)
		if len(order) != 3 || order[2] != "node-1" {
			t.Errorf("control plane went down in the order %v: want all three, node-1 (the gateway's own) last", order)
		}
		t.Logf("three control-plane nodes rebooted one at a time in %s", time.Since(since).Round(time.Millisecond))
	})

	t.Run("one fan-out (talosctl --wait=false)", func(t *testing.T) {
		c.settle()
		since := time.Now()
		resp, err := c.admin.MachineClient.Reboot(metadata.AppendToOutgoingContext(ctx, "nodes", "@controlplane"), &machine.RebootRequest{})
		if err != nil {
			t.Fatal(err)
		}
		var hosts []string
		for _, m := range resp.GetMessages() {
			if m.GetMetadata().GetError() != "" {
				t.Errorf("%s: %s", m.GetMetadata().GetHostname(), m.GetMetadata().GetError())
			}
			hosts = append(hosts, m.GetMetadata().GetHostname())
		}
		slices.Sort(hosts)
		if !slices.Equal(hosts, controlPlane) {
			t.Errorf("merged reply from %v", hosts)
		}
		// The reply came once every node's turn had come: wait for the
		// last one to be back before reading the logs.
		testkit.Eventually(30*time.Second, func() bool {
			d := c.downtimes(since)
			return len(d) == 3 && !d[2].up.IsZero()
		})
		if order := checkOneAtATime(t, c.downtimes(since), controlPlane); len(order) != 3 {
			t.Errorf("went down: %v, want the three control-plane nodes", order)
		}
	})

	t.Run("workers", func(t *testing.T) {
		c.settle()
		since := time.Now()
		resp, err := c.admin.MachineClient.Reboot(metadata.AppendToOutgoingContext(ctx, "nodes", "node-4,node-5"), &machine.RebootRequest{})
		if err != nil || len(resp.GetMessages()) != 2 {
			t.Fatalf("%v, %v", resp, err)
		}
		testkit.Eventually(30*time.Second, func() bool {
			d := c.downtimes(since)
			return len(d) == 2 && !d[1].up.IsZero()
		})
		if order := checkOneAtATime(t, c.downtimes(since), workers); len(order) != 2 {
			t.Errorf("went down: %v, want both workers", order)
		}
	})

	t.Run("two gateways, two callers at once", func(t *testing.T) {
		// Through node-1's apid one caller reboots node-2; through
		// node-2's, another reboots node-3: one budget, shared through
		// etcd, takes them down one after the other.
		c.settle()
		other := c.clientThrough(net.JoinHostPort("127.0.97.12", strconv.Itoa(c.port)))
		since := time.Now()
		var wg sync.WaitGroup
		errs := make([]error, 2)
		wg.Go(func() { errs[0] = rebootLikeTalosctl(ctx, c.admin, "node-2") })
		wg.Go(func() { errs[1] = rebootLikeTalosctl(ctx, other, "node-3") })
		wg.Wait()
		for _, err := range errs {
			if err != nil {
				t.Error(err)
			}
		}
		if order := checkOneAtATime(t, c.downtimes(since), controlPlane); len(order) != 2 {
			t.Errorf("went down: %v, want node-2 and node-3", order)
		}
	})

	t.Run("held, forced, never waiting", func(t *testing.T) {
		c.settle()
		// node-2 goes down; node-3 must wait for it to be back.
		if err := c.admin.Reboot(client.WithNode(ctx, "node-2")); err != nil {
			t.Fatal(err)
		}
		short, cancelShort := context.WithTimeout(ctx, 2500*time.Millisecond)
		err := c.admin.Reboot(client.WithNode(short, "node-3"))
		cancelShort()
		st := status.Convert(err)
		if st.Code() != codes.DeadlineExceeded || !strings.Contains(st.Message(), "node-2 is rebooting since") ||
			!strings.Contains(st.Message(), "maxUnavailable controlplane: 1") || !strings.Contains(st.Message(), "asked by") {
			t.Errorf("a call held past its deadline: %v, want DeadlineExceeded naming node-2's reboot and the budget", err)
		}

		// The node page shows the disruption not over.
		var page struct {
			Nodes []struct {
				Node       string
				Disruption *struct {
					Active []struct{ Method, Caller string }
				}
			}
		}
		body := c.nodesPage()
		if err := json.Unmarshal([]byte(body), &page); err != nil {
			t.Fatalf("/nodes: %v\n%s", err, body)
		}
		shown := false
		for _, n := range page.Nodes {
			if n.Node == "node-2" && n.Disruption != nil && len(n.Disruption.Active) > 0 {
				shown = n.Disruption.Active[0].Method == "/machine.MachineService/Reboot" && strings.Contains(n.Disruption.Active[0].Caller, "admin")
			}
		}
		if !shown {
			t.Errorf("/nodes does not show node-2's reboot:\n%s", body)
		}

		// Calls that take nothing down pass at once.
		start := time.Now()
		if _, err := c.admin.Version(client.WithNode(ctx, "node-3")); err != nil {
			t.Error(err)
		}
		if d := time.Since(start); d > time.Second {
			t.Errorf("Version waited %s behind a held reboot", d)
		}

		// The escape hatch: an operator may not; an admin must say why;
		// through a forwarding hop, never.
		operator := c.clientWith(certs.RoleOperator)
		force := metadata.AppendToOutgoingContext(client.WithNode(ctx, "node-3"), "apid-disruption", "force")
		if err := operator.Reboot(force); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "os:admin") {
			t.Errorf("an operator's force: %v", err)
		}
		if err := c.admin.Reboot(force); status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "apid-disruption-reason") {
			t.Errorf("a force without a reason: %v", err)
		}
		forwarder := c.clientWith(certs.RoleImpersonator)
		hop := metadata.AppendToOutgoingContext(force, "proxyfrom", "127.0.0.1", "talos-role", certs.RoleAdmin, "apid-disruption-reason", "test")
		if err := forwarder.Reboot(hop); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "forwarded") {
			t.Errorf("a force arriving forwarded: %v", err)
		}
		start = time.Now()
		if err := c.admin.Reboot(metadata.AppendToOutgoingContext(force, "apid-disruption-reason", "test: node-3 is wedged")); err != nil {
			t.Errorf("an admin's force with a reason: %v", err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("a forced reboot waited %s", d)
		}
	})

	t.Run("drain refuses what is held", func(t *testing.T) {
		c.settle()
		// Three control-plane reboots at once: one goes, two are held
		// (a turn lasts seconds); then the cluster stops.
		var wg sync.WaitGroup
		errs := make([]error, len(controlPlane))
		for i, n := range controlPlane {
			wg.Go(func() { errs[i] = c.admin.Reboot(client.WithNode(ctx, n)) })
		}
		if !testkit.Eventually(10*time.Second, func() bool { return c.heldNow() >= 2 }) {
			t.Errorf("%d calls held, want 2", c.heldNow())
		}
		c.stop()
		wg.Wait()
		refused := 0
		for _, err := range errs {
			switch {
			case err == nil:
			case status.Code(err) == codes.Unavailable && strings.Contains(err.Error(), "retry through another gateway"):
				refused++
			case status.Code(err) == codes.Unavailable && !strings.Contains(err.Error(), "held"):
				// Admitted as the gateway stopped, and cut by the stop
				// (the connection closed under it): not a held call.
				t.Logf("a call admitted as the cluster stopped: %v", err)
			default:
				t.Errorf("a held call at drain: %v", err)
			}
		}
		if refused == 0 {
			t.Error("no held call was refused with the retry message when the gateway drained")
		}
	})
}

// nodesPage reads node-1's /nodes as JSON.
func (c *rollingCluster) nodesPage() string {
	resp, err := http.Get(fmt.Sprintf("http://%s/nodes?format=json", net.JoinHostPort(c.ip, strconv.Itoa(c.port+1))))
	if err != nil {
		return err.Error()
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return string(body)
}

// heldNow reads apid_disruptions{state="held"} from node-1's admin endpoint.
func (c *rollingCluster) heldNow() int { return c.disruptions("held") }

// settle waits until node-1's apid counts no disruption held or active:
// every node it took down is back.
func (c *rollingCluster) settle() {
	c.t.Helper()
	if !testkit.Eventually(30*time.Second, func() bool { return c.disruptions("held") == 0 && c.disruptions("active") == 0 }) {
		c.t.Fatalf("disruptions still held or active after 30s: %d, %d", c.disruptions("held"), c.disruptions("active"))
	}
}

// disruptions reads apid_disruptions{state=...} from node-1's admin
// endpoint; -1 when it cannot.
func (c *rollingCluster) disruptions(state string) int {
	return int(testkit.Metric(net.JoinHostPort(c.ip, strconv.Itoa(c.port+1)), `apid_disruptions{state="`+state+`"}`))
}

func b64(pem []byte) string { return base64.StdEncoding.EncodeToString(pem) }

// BenchmarkRollingReboot: the 3 + 2 demo with its default downtime (2 s),
// talosctl's per-node sequence through node-1's apid, each figure timed
// until node-1's apid counts no disruption held or active (every node back
// and ready): the five nodes rebooted one after another (seq-s), and all
// five asked at once, the budget ordering them (at-once-s).
func BenchmarkRollingReboot(b *testing.B) {
	c := startCluster(b, "127.0.89.11", 5, 2*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	all := []string{"node-2", "node-3", "node-4", "node-5", "node-1"}
	var seq, atOnce time.Duration
	for b.Loop() {
		for _, n := range all {
			c.settle()
			start := time.Now()
			if err := rebootLikeTalosctl(ctx, c.admin, n); err != nil {
				b.Fatal(err)
			}
			c.settle()
			seq += time.Since(start)
		}
		start := time.Now()
		var wg sync.WaitGroup
		for _, n := range all {
			wg.Go(func() {
				if err := rebootLikeTalosctl(ctx, c.admin, n); err != nil {
					b.Error(err)
				}
			})
		}
		wg.Wait()
		c.settle()
		atOnce += time.Since(start)
	}
	b.ReportMetric(seq.Seconds()/float64(b.N), "seq-s")
	b.ReportMetric(atOnce.Seconds()/float64(b.N), "at-once-s")
	b.ReportMetric(0, "ns/op")
}
