package test

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/client"
	clientconfig "github.com/siderolabs/talos/pkg/machinery/client/config"

	"github.com/apid/apid/internal/testkit"
)

// apidBin is the apid binary built once for all tests, with the race
// detector unless APID_E2E_NORACE is set.
var apidBin string

// buildDir holds the binaries the tests build.
var buildDir string

var (
	plainOnce sync.Once
	plainPath string
	plainErr  error
)

// plainBin returns an apid built without the race detector, for tests that
// measure memory: the detector's shadow memory would swamp what they
// measure. It is built on first use.
func plainBin(t *testing.T) string {
	t.Helper()
	plainOnce.Do(func() {
		plainPath = filepath.Join(buildDir, "apid-plain")
		out, err := exec.Command("go", "build", "-o", plainPath, "../cmd/apid").CombinedOutput()
		if err != nil {
			plainErr = fmt.Errorf("build apid without -race: %v\n%s", err, out)
		}
	})
	if plainErr != nil {
		t.Fatal(plainErr)
	}
	return plainPath
}

func TestMain(m *testing.M) {
	if os.Getenv(h2specEnv) != "" {
		runH2specChild() // exits
	}
	flag.Parse()
	if testing.Short() {
		// Every test here starts real processes: -short (make
		// test-short) runs none of them and builds nothing.
		fmt.Println("test: end-to-end tests skipped in -short mode")
		os.Exit(0)
	}
	dir, err := os.MkdirTemp("", "apid-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	apidBin = filepath.Join(dir, "apid")
	build := exec.Command("go", "build", "-race", "-o", apidBin, "../cmd/apid")
	if os.Getenv("APID_E2E_NORACE") != "" {
		build = exec.Command("go", "build", "-o", apidBin, "../cmd/apid")
	}
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "build apid:", err)
		os.Exit(1)
	}
	buildDir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// process is an apid process the test started; it is stopped (SIGTERM,
// then SIGKILL) when the test ends.
type process struct {
	cmd    *exec.Cmd
	mu     sync.Mutex
	output strings.Builder
	exited chan struct{}
}

// start runs apid with args and returns once a line of its output
// (standard output or error) contains ready; it fails the test after 60 s
// or if apid exits first.
func start(t *testing.T, ready string, args ...string) *process {
	t.Helper()
	return startBin(t, apidBin, ready, args...)
}

// startBin is start with another build of apid (see plainBin).
func startBin(t *testing.T, bin, ready string, args ...string) *process {
	t.Helper()
	return startCmd(t, exec.Command(bin, args...), ready)
}

// startIn is start in working directory dir.
func startIn(t *testing.T, dir, ready string, args ...string) *process {
	t.Helper()
	cmd := exec.Command(apidBin, args...)
	cmd.Dir = dir
	return startCmd(t, cmd, ready)
}

func startCmd(t *testing.T, cmd *exec.Cmd, ready string) *process {
	t.Helper()
	args := cmd.Args[1:]
	p := &process{cmd: cmd, exited: make(chan struct{})}
	stdout, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	p.cmd.Stdout, p.cmd.Stderr = w, w
	err = p.cmd.Start()
	w.Close() // the child holds its own copy; EOF comes when it exits
	if err != nil {
		t.Fatal(err)
	}
	seen := make(chan struct{})
	if ready == "" { // the caller waits in its own way
		close(seen)
		ready = "\x00never"
	}
	go func() {
		sc := bufio.NewScanner(stdout)
		once := sync.Once{}
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.output.WriteString(line + "\n")
			p.mu.Unlock()
			if strings.Contains(line, ready) {
				once.Do(func() { close(seen) })
			}
		}
		_, _ = io.Copy(io.Discard, stdout)
		stdout.Close()
	}()
	go func() {
		_ = p.cmd.Wait()
		close(p.exited)
	}()
	t.Cleanup(func() { p.stop(t) })
	select {
	case <-seen:
	case <-p.exited:
		t.Fatalf("apid %v exited before it was ready:\n%s", args, p.log())
	case <-time.After(60 * time.Second):
		t.Fatalf("apid %v not ready after 60 s:\n%s", args, p.log())
	}
	return p
}

func (p *process) log() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.output.String()
}

// stop ends the process gracefully and fails the test if it does not exit
// in time or exits with an error.
func (p *process) stop(t *testing.T) {
	select {
	case <-p.exited:
		return
	default:
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
		if !p.cmd.ProcessState.Success() {
			t.Errorf("apid exited with %v:\n%s", p.cmd.ProcessState, p.log())
		}
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
		t.Errorf("apid did not stop within 15 s of SIGTERM:\n%s", p.log())
	}
	if t.Failed() {
		t.Logf("apid output:\n%s", p.log())
	}
}

// listening reports whether something accepts TCP connections on addr.
func listening(addr string) bool {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err == nil {
		c.Close()
	}
	return err == nil
}

// freePort returns a TCP port free on every address in ips.
func freePort(t *testing.T, ips ...string) int {
	t.Helper()
	for try := 0; try < 50; try++ {
		port := 20000 + rand.IntN(30000)
		ok := true
		var open []net.Listener
		for _, ip := range ips {
			l, err := net.Listen("tcp", net.JoinHostPort(ip, fmt.Sprint(port)))
			if err != nil {
				ok = false
				break
			}
			open = append(open, l)
		}
		for _, l := range open {
			l.Close()
		}
		if ok {
			return port
		}
	}
	t.Fatal("no free port")
	return 0
}

// cluster is a running `apid demo`.
type cluster struct {
	dir   string
	port  int
	nodes []string // node IPs
	proc  *process
}

// disruptions reads apid_disruptions{state} from node-1's apid (its admin
// endpoint is on the next port up); -1 when it cannot.
func (c *cluster) disruptions(state string) int {
	return int(testkit.Metric(net.JoinHostPort(c.nodes[0], strconv.Itoa(c.port+1)), `apid_disruptions{state="`+state+`"}`))
}

// startDemo runs `apid demo` with n nodes on 127.0.<subnet>.11 and up.
func startDemo(t *testing.T, subnet, n int) *cluster {
	t.Helper()
	c := &cluster{dir: t.TempDir()}
	for i := 1; i <= n; i++ {
		c.nodes = append(c.nodes, fmt.Sprintf("127.0.%d.%d", subnet, 10+i))
	}
	c.port = freePort(t, c.nodes...)
	c.proc = start(t, "nodes up", "demo", "-dir", c.dir, "-nodes", fmt.Sprint(n),
		"-first-ip", c.nodes[0], "-port", fmt.Sprint(c.port), "-log-level", "info")
	return c
}

// endpoint is node i's apid address (i from 0).
func (c *cluster) endpoint(i int) string { return net.JoinHostPort(c.nodes[i], fmt.Sprint(c.port)) }

// client returns an official Talos client that uses the demo's talosconfig
// with endpoint as its only endpoint.
func (c *cluster) client(t *testing.T, endpoint string) *client.Client {
	t.Helper()
	cfg, err := clientconfig.Open(filepath.Join(c.dir, "talosconfig"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Contexts[cfg.Context].Endpoints = []string{endpoint}
	cl, err := client.New(context.Background(), client.WithConfig(cfg))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// waitOutput waits until the process has printed text at least n times in
// all, for events a process reports only in its log (a reload that failed,
// for example). It reports whether that happened within timeout.
func (p *process) waitOutput(text string, n int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for {
		if strings.Count(p.log(), text) >= n {
			return true
		}
		select {
		case <-p.exited:
			return strings.Count(p.log(), text) >= n
		default:
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
}
