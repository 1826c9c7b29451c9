package test

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"

	"github.com/apid/apid/internal/testkit"
)

// demoIPs are the addresses the demo uses by default.
var demoIPs = []string{"127.0.0.11", "127.0.0.12", "127.0.0.13"}

// skipIfDemoRunning skips when the demo's default addresses are taken (a
// developer's own demo is running): the defaults are what is under test.
func skipIfDemoRunning(t *testing.T) {
	t.Helper()
	for _, ip := range demoIPs {
		for _, port := range []string{"50000", "50001"} {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, port))
			if err != nil {
				t.Skipf("the demo's default address %s:%s is taken on this machine: %v", ip, port, err)
			}
			l.Close()
		}
	}
}

// checkDemo calls the demo that wrote wd/apid-demo with the talosconfig it
// wrote, fanned out to its three nodes, and checks each node's readiness
// on its admin endpoint.
func checkDemo(t *testing.T, wd string) {
	t.Helper()
	cfg, err := clientconfig.Open(filepath.Join(wd, "apid-demo", "talosconfig"))
	if err != nil {
		t.Fatal(err)
	}
	cl, err := client.New(testkit.Context(t), client.WithConfig(cfg))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	resp, err := cl.Version(client.WithNodes(testkit.Context(t), demoIPs...))
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.Messages) != 3 {
		t.Fatalf("fan-out through the README's demo gave %d replies, want 3", len(resp.Messages))
	}
	for _, ip := range demoIPs {
		admin := net.JoinHostPort(ip, "50001")
		if !testkit.Eventually(10*time.Second, func() bool { return readyz(admin) == 200 }) {
			t.Fatalf("demo node %s: /readyz not 200", admin)
		}
	}
}

// TestReadmeDemoCommand runs the demo with its default flags (127.0.0.11-13,
// port 50000, ./apid-demo) from a fresh working directory: a test that
// always passed -dir /abs/path once hid a demo that failed for every new
// user.
func TestReadmeDemoCommand(t *testing.T) {
	skipIfDemoRunning(t)
	wd := t.TempDir()
	startIn(t, wd, "nodes up", "demo")
	checkDemo(t, wd)
}

// TestReadmeCommandsInAFreshCheckout runs the demo command exactly as the
// README's first screen writes it, then `make demo`, each in a fresh copy of
// the repository's tracked files, as a new user would after cloning.
func TestReadmeCommandsInAFreshCheckout(t *testing.T) {
	if testing.Short() {
		t.Skip("builds apid twice with go run")
	}
	skipIfDemoRunning(t)
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	first := regexp.MustCompile("(?s)```sh\n(.*?)```").FindSubmatch(readme)
	if first == nil {
		t.Fatal("README.md has no sh block")
	}
	var demo string
	for _, line := range strings.Split(string(first[1]), "\n") {
		if cmd, _, _ := strings.Cut(line, "#"); strings.Contains(cmd, " demo") {
			demo = strings.TrimSpace(cmd)
			break
		}
	}
	if demo == "" {
		t.Fatalf("no demo command in the README's first block:\n%s", first[1])
	}
	for _, command := range []string{demo, "make demo"} {
		t.Run(strings.ReplaceAll(command, " ", "_"), func(t *testing.T) {
			wd := checkout(t)
			cmd := exec.Command("sh", "-c", command)
			cmd.Dir = wd
			// go run and make start children: signal them as a group.
			cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			p := startCmd(t, cmd, "nodes up")
			t.Cleanup(func() {
				_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
				<-p.exited
				// The demo itself may outlive the shell by a moment.
				if !testkit.Eventually(15*time.Second, func() bool { return !listening(net.JoinHostPort(demoIPs[0], "50000")) }) {
					t.Errorf("%q still serving 15 s after SIGTERM", command)
				}
			})
			checkDemo(t, wd)
		})
	}
}

// checkout copies the repository's files (tracked, and new ones not
// ignored) into a new directory.
func checkout(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("git", "-C", "..", "ls-files", "-z", "--cached", "--others", "--exclude-standard").Output()
	if err != nil {
		t.Skipf("not a git checkout: %v", err)
	}
	wd := t.TempDir()
	for _, f := range strings.Split(strings.TrimRight(string(out), "\x00"), "\x00") {
		data, err := os.ReadFile(filepath.Join("..", f))
		if os.IsNotExist(err) {
			continue // deleted in the working tree, not yet committed
		}
		if err != nil {
			t.Fatal(err)
		}
		dst := filepath.Join(wd, f)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(dst, data, 0o644); err != nil {
			t.Fatal(fmt.Errorf("copy %s: %w", f, err))
		}
	}
	return wd
}

// TestDemoAuditLineAndNodes: a fan-out through the demo (with its audit
// lines shown as JSON) gives one audit line with every documented key, and
// the demo's /nodes lists its nodes.
func TestDemoAuditLineAndNodes(t *testing.T) {
	c := &cluster{dir: t.TempDir()}
	for i := 1; i <= 3; i++ {
		c.nodes = append(c.nodes, fmt.Sprintf("127.0.67.%d", 10+i))
	}
	c.port = freePort(t, c.nodes...)
	c.proc = start(t, "nodes up", "demo", "-dir", c.dir, "-first-ip", c.nodes[0], "-port", fmt.Sprint(c.port),
		"-log-level", "info", "-log-format", "json")
	cl := c.client(t, c.endpoint(0))
	if _, err := cl.Version(client.WithNodes(testkit.Context(t), c.nodes...)); err != nil {
		t.Fatal(err)
	}
	var line map[string]any
	if !testkit.Eventually(10*time.Second, func() bool {
		for _, l := range strings.Split(c.proc.log(), "\n") {
			var m map[string]any
			if json.Unmarshal([]byte(l), &m) == nil && m["msg"] == "call" && m["mode"] == "fan-out" {
				line = m
				return true
			}
		}
		return false
	}) {
		t.Fatalf("no JSON audit line of the fan-out:\n%s", c.proc.log())
	}
	for _, k := range []string{"method", "mode", "nodes", "peer", "roles", "remote", "code", "duration_ms", "bytes_in", "bytes_out"} {
		if _, ok := line[k]; !ok {
			t.Errorf("audit line lacks %q: %v", k, line)
		}
	}
	raw, _ := json.Marshal(line)
	t.Logf("audit line: %s", raw)

	admin := net.JoinHostPort(c.nodes[0], fmt.Sprint(c.port+1))
	resp, err := http.Get("http://" + admin + "/nodes")
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	// The demo's inventory names its nodes: the calls made by address
	// are counted under those names, listed with their addresses.
	for i, n := range c.nodes {
		row := regexp.MustCompile(fmt.Sprintf(`(?m)^node-%d +(controlplane) +%s +(local|READY) +0 +1 +0 `, i+1, regexp.QuoteMeta(n)))
		if !row.Match(page) {
			t.Errorf("/nodes has no row for node-%d at %s with one call:\n%s", i+1, n, page)
		}
	}
	t.Logf("/nodes:\n%s", page)
}
