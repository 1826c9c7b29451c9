package cluster_test

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/client"

	"github.com/apid/apid/internal/gateway"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/pki"
)

// gatewayConfigEnv names the configuration a helper gateway process
// serves (TestGatewayProcess).
const gatewayConfigEnv = "APID_TEST_GATEWAY_CONFIG"

// TestGatewayProcess is not a test: it is the gateway process
// TestSharedBudgetOutlivesAKilledGateway starts, from this test binary,
// and kills. It serves until killed.
func TestGatewayProcess(t *testing.T) {
	path := os.Getenv(gatewayConfigEnv)
	if path == "" {
		t.Skip("a helper process of TestSharedBudgetOutlivesAKilledGateway")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	cfg := gateway.Default()
	if err := gateway.Decode(data, &cfg); err != nil {
		t.Fatal(err)
	}
	g, err := gateway.New(cfg, gateway.NewLogger(os.Stderr, new(slog.LevelVar), "json"))
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		t.Fatal(err)
	}
	fmt.Fprintln(os.Stderr, "helper gateway serving")
	_ = g.Serve(context.Background(), lis)
}

// TestSharedBudgetOutlivesAKilledGateway: a gateway that admitted a reboot
// dies (SIGKILL: its lease in etcd is not revoked, it expires); another
// gateway's caller who wants a second control-plane node down waits, past
// the lease's expiry, until the rebooted node is seen back.
func TestSharedBudgetOutlivesAKilledGateway(t *testing.T) {
	// Three control-plane nodes whose reboots keep them down 8 s, longer
	// than the 5 s lease.
	c := startCluster(t, "127.0.96.11", 3, 8*time.Second)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()

	// The extra gateway: its own address and certificates from the demo's
	// CA, the demo's inventory, and the budget shared through its etcd.
	const gwIP = "127.0.96.50"
	dir := t.TempDir()
	ca, err := pki.ReadCA(filepath.Join(c.dir, "ca.crt"), filepath.Join(c.dir, "ca.key"))
	if err != nil {
		t.Fatal(err)
	}
	files, err := (pki.Dir{Path: dir}).WriteNode(ca, "gw", []string{"gw"}, []net.IP{net.ParseIP(gwIP)}, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	etcdPKI := filepath.Join(c.dir, "etcd-pki")
	port := c.port
	cfg := fmt.Sprintf(`listen: %q
adminListen: ""
backend: %q
ca: %q
cert: %q
key: %q
clientCert: %q
clientKey: %q
remotePort: %d
nodeNetworks: [127.0.0.0/8]
drainDelay: 0s
logLevel: info
inventory:
  nodes:
    - {name: node-1, address: 127.0.96.11, role: controlplane}
    - {name: node-2, address: 127.0.96.12, role: controlplane}
    - {name: node-3, address: 127.0.96.13, role: controlplane}
disruption:
  etcd:
    endpoints: [https://127.0.96.11:2379, https://127.0.96.12:2379, https://127.0.96.13:2379]
    ca: %q
    cert: %q
    key: %q
    leaseTTL: 5s
`, net.JoinHostPort(gwIP, strconv.Itoa(port)), "unix://"+filepath.Join(c.dir, "node-1.sock"),
		filepath.Join(c.dir, "ca.crt"), files.Cert, files.Key, files.ClientCert, files.ClientKey, port,
		filepath.Join(etcdPKI, "ca.crt"), filepath.Join(etcdPKI, "apid-etcd.crt"), filepath.Join(etcdPKI, "apid-etcd.key"))
	cfgPath := filepath.Join(dir, "gw.yaml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	var out testkit.Buffer
	helper := exec.Command(os.Args[0], "-test.run=^TestGatewayProcess$", "-test.v")
	helper.Env = append(os.Environ(), gatewayConfigEnv+"="+cfgPath)
	helper.Stdout, helper.Stderr = &out, &out
	if err := helper.Start(); err != nil {
		t.Fatal(err)
	}
	killed := false
	t.Cleanup(func() {
		if !killed {
			_ = helper.Process.Kill()
		}
		_ = helper.Wait()
	})
	if !testkit.Eventually(30*time.Second, func() bool { return strings.Contains(out.String(), "helper gateway serving") }) {
		t.Fatalf("the helper gateway did not start:\n%s", out.String())
	}

	// Through the helper: node-3 reboots, its record under the helper's
	// lease.
	through := c.clientThrough(net.JoinHostPort(gwIP, strconv.Itoa(port)))
	if err := through.Reboot(client.WithNode(ctx, "node-3")); err != nil {
		t.Fatalf("reboot through the helper: %v\n%s", err, out.String())
	}
	if !testkit.Eventually(10*time.Second, func() bool {
		d := c.downtimes(time.Time{})
		return len(d) == 1 && d[0].node == "node-3"
	}) {
		t.Fatalf("node-3 did not go down: %v", c.downtimes(time.Time{}))
	}
	// The helper dies without a word: its lease outlives it by up to 5 s.
	if err := helper.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	killed = true
	kill := time.Now()

	// Through node-1's apid: node-2 must wait for node-3 to be back.
	if err := c.admin.Reboot(client.WithNode(ctx, "node-2")); err != nil {
		t.Fatal(err)
	}
	admitted := time.Now()
	var back time.Time
	for _, d := range c.downtimes(time.Time{}) {
		if d.node == "node-3" {
			back = d.up
		}
	}
	switch {
	case back.IsZero() || admitted.Before(back):
		t.Errorf("node-2's reboot was admitted at %s, before node-3 was back (%s)", admitted.Format(time.StampMilli), back.Format(time.StampMilli))
	case admitted.Sub(kill) < 5*time.Second:
		t.Errorf("node-2's reboot was admitted %s after the helper died: the test wants the lease to have expired by then", admitted.Sub(kill))
	}
	t.Logf("helper killed; its lease expired within 5 s; node-3 back %s after the kill; node-2 admitted %s after the kill",
		back.Sub(kill).Round(time.Millisecond), admitted.Sub(kill).Round(time.Millisecond))
}
