package test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
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
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// TestIdleConnectionsAndSlowHandshakes holds 5,000 idle mutual-TLS
// connections to one gateway (a plain build) and measures its RSS; then a
// connection that never sends a ClientHello must be closed within
// handshakeTimeout.
func TestIdleConnectionsAndSlowHandshakes(t *testing.T) {
	if testing.Short() {
		t.Skip("5,000 TLS handshakes")
	}
	const conns = 5000
	const ip = "127.0.71.1"
	adminAddr := net.JoinHostPort(ip, strconv.Itoa(freePort(t, ip)))
	p, addr, gw := soloGateway(t, ip, fmt.Sprintf(`adminListen: %q
handshakeTimeout: 1s
limits:
  connections: 10000
  connectionsPerIdentity: 10000
  handshakes: 10000
  handshakesPerSource: 10000
  connectionsPerSourcePerSecond: 100000
`, adminAddr))
	pid := gw.cmd.Process.Pid
	before := procStatus(t, pid, "VmRSS")

	admin := p.load(t, "admin")
	tlsCfg := &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{admin}, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13}
	open := make([]net.Conn, 0, conns)
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, 32)
	var failed int
	for range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 10 * time.Second}, "tcp", addr, tlsCfg)
			mu.Lock()
			defer mu.Unlock()
			if err != nil {
				failed++
				return
			}
			// The HTTP/2 preface makes it a gRPC connection, idle from here.
			_, _ = c.Write([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"))
			open = append(open, c)
		}()
	}
	wg.Wait()
	if failed > 0 {
		t.Fatalf("%d of %d connections failed", failed, conns)
	}
	time.Sleep(time.Second) // let the server finish setting up the last transports
	after := procStatus(t, pid, "VmRSS")
	grew := float64(after-before) / (1 << 20)
	t.Logf("heap in use %.1f MiB, goroutines %.0f", scrape(t, adminAddr, "go_memstats_heap_inuse_bytes")/(1<<20), scrape(t, adminAddr, "go_goroutines"))
	t.Logf("%d idle mutual-TLS HTTP/2 connections: gateway RSS %.1f MiB -> %.1f MiB (+%.1f MiB, %.1f KiB each)",
		conns, float64(before)/(1<<20), float64(after)/(1<<20), grew, float64(after-before)/1024/conns)
	// Each idle connection cost about 57-63 KiB (three grpc-go goroutines,
	// TLS record buffers, a 32 KiB HTTP/2 read buffer on top of the TLS
	// connection's own); without that redundant read buffer it costs
	// about 40 KiB. This holds the gain, with
	// room for noise.
	if per := float64(after-before) / 1024 / conns; per > 50 {
		t.Errorf("%.1f KiB of gateway RSS per idle connection, want under 50", per)
	}

	// A connection that never starts its handshake is closed in time.
	raw, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	start := time.Now()
	_ = raw.SetReadDeadline(time.Now().Add(20 * time.Second))
	_, err = raw.Read(make([]byte, 1))
	closed := time.Since(start)
	if err == nil || os.IsTimeout(err) {
		t.Fatalf("a silent connection was not closed within 20 s: %v", err)
	}
	t.Logf("a connection that never sends a ClientHello is closed after %s (handshakeTimeout 1s)", closed.Round(time.Millisecond))
	if closed > 3*time.Second {
		t.Errorf("closed after %s, want about handshakeTimeout (1 s)", closed)
	}
}

// rapidReset opens one mutual-TLS HTTP/2 connection and sends n HEADERS
// (and, with data, a request DATA frame) each followed at once by
// RST_STREAM, as fast as it can. It returns after the last frame or when
// the server closes the connection, and reports how many pairs it sent and
// whether the server closed it.
func rapidReset(t *testing.T, addr string, cfg *tls.Config, n int, data bool) (sent int, closed bool) {
	t.Helper()
	conn, err := tls.Dial("tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.Write([]byte(http2.ClientPreface)); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(conn, conn)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	gone := make(chan struct{})
	go func() { // read (and drop) whatever the server sends, until it closes
		defer close(gone)
		rf := http2.NewFramer(io.Discard, conn)
		for {
			if _, err := rf.ReadFrame(); err != nil {
				return
			}
		}
	}()
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "https"}, {":path", "/machine.MachineService/Version"},
		{":authority", addr}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	block := hb.Bytes()
	empty := []byte{0, 0, 0, 0, 0} // one gRPC message of 0 bytes (Empty)
	for i := range n {
		id := uint32(2*i + 1)
		if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: block, EndHeaders: true}); err != nil {
			break
		}
		if data {
			if err := fr.WriteData(id, true, empty); err != nil {
				break
			}
		}
		if err := fr.WriteRSTStream(id, http2.ErrCodeCancel); err != nil {
			break
		}
		sent++
	}
	select {
	case <-gone:
		return sent, true
	case <-time.After(3 * time.Second):
		return sent, false
	}
}

// TestRapidReset: 10,000 HEADERS + RST_STREAM pairs on one connection with
// a valid client certificate, then the same with a request DATA frame
// before each reset (so that calls start and reach the agent). The gateway
// keeps its handlers bounded and its memory flat, and closes the
// connection once the client has reset 500 calls within 10 s, so few
// calls reach the node.
func TestRapidReset(t *testing.T) {
	if testing.Short() {
		t.Skip("20,000 streams")
	}
	dir := t.TempDir()
	p := newPKI(t, filepath.Join(dir, "pki"))
	const ip = "127.0.72.1"
	addr := net.JoinHostPort(ip, strconv.Itoa(freePort(t, ip)))
	adminAddr := net.JoinHostPort(ip, strconv.Itoa(freePort(t, ip)))
	genAll(t, [][]string{
		{"node", "-name", "node-1", "-ip", ip, "-ca-dir", p.dir, "-out", p.dir},
		{"client", "-name", "admin", "-roles", "os:admin", "-ca-dir", p.dir, "-out", p.dir},
	})
	sock := filepath.Join(dir, "agent.sock")
	bin := plainBin(t)
	agent := startBin(t, bin, "example agent serving", "agent", "-listen", "unix://"+sock, "-log-level", "debug")
	cfg := writeConfig(t, dir, "apid.yaml", p.nodeConfig("node-1")+fmt.Sprintf("listen: %q\nbackend: %q\nadminListen: %q\ndrainDelay: 0s\nlogLevel: warn\nmaxConcurrentStreams: 100\n",
		addr, "unix://"+sock, adminAddr))
	gw := startBin(t, bin, "", "serve", "-config", cfg)
	if !testkit.Eventually(20*time.Second, func() bool { return readyz(adminAddr) == 200 }) {
		t.Fatal("gateway not ready")
	}
	admin := p.load(t, "admin")
	tlsCfg := &tls.Config{RootCAs: p.pool, Certificates: []tls.Certificate{admin}, NextProtos: []string{"h2"}, MinVersion: tls.VersionTLS13}
	// The agent's log counts the calls that reach it: one real call first,
	// to see that it does.
	if _, err := machine.NewMachineServiceClient(dialTLS(t, p, addr, admin)).Version(testkit.Context(t), &emptypb.Empty{}); err != nil {
		t.Fatal(err)
	}
	if !testkit.Eventually(5*time.Second, func() bool { return strings.Count(agent.log(), "method=Version") == 1 }) {
		t.Fatalf("the agent's log does not count calls:\n%s", agent.log())
	}
	before := procStatus(t, gw.cmd.Process.Pid, "VmRSS")
	for _, data := range []bool{false, true} {
		callsBefore := strings.Count(agent.log(), "method=Version")
		start := time.Now()
		sent, closed := rapidReset(t, addr, tlsCfg, 10000, data)
		took := time.Since(start)
		time.Sleep(500 * time.Millisecond) // let the last calls reach the agent
		reached := strings.Count(agent.log(), "method=Version") - callsBefore
		inFlight := scrape(t, adminAddr, "apid_calls_in_flight")
		t.Logf("rapid reset (request DATA before each reset: %v): %d HEADERS+RST pairs sent in %s, connection closed by apid: %v; calls that reached the agent: %d; calls in flight after: %.0f",
			data, sent, took.Round(time.Millisecond), closed, reached, inFlight)
		if !closed {
			t.Errorf("apid kept a connection that reset %d calls open", sent)
		}
		if data && reached > 1000 {
			t.Errorf("%d reset calls reached the agent, want the connection closed long before", reached)
		}
	}
	after := procStatus(t, gw.cmd.Process.Pid, "VmRSS")
	t.Logf("gateway RSS %.1f MiB -> %.1f MiB; refusals counted: %.0f", float64(before)/(1<<20), float64(after)/(1<<20),
		scrapeLabelled(t, adminAddr, `apid_limit_refusals_total{limit="rapidResets"}`))
	if after-before > 64<<20 {
		t.Errorf("RSS grew %.1f MiB, want under 64 MiB", float64(after-before)/(1<<20))
	}
}

// scrapeLabelled reads one series (name with its labels) from addr's
// /metrics.
func scrapeLabelled(t *testing.T, addr, series string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + addr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, series+" "); ok {
			f, _ := strconv.ParseFloat(v, 64)
			return f
		}
	}
	t.Fatalf("no %s in /metrics", series)
	return 0
}

// TestHandshakeFloodCannotCrowdOutClients is the first attack of the
// fairness issue: sockets that never finish their TLS handshake, from one
// source, opened faster than the handshake timeout closes them. Before,
// they filled limits.connections and every valid client was refused.
// Now unfinished handshakes have their own budget (the oldest go first)
// and one source its own share: while the flood is held, every call of a
// client from another source succeeds within 2 s.
func TestHandshakeFloodCannotCrowdOutClients(t *testing.T) {
	const ip, attacker = "127.0.72.1", "127.0.72.66"
	// Small budgets, so that a bounded flood (400 sockets) exceeds them all.
	p, addr, _ := soloGateway(t, ip, `adminListen: ""
handshakeTimeout: 10s
limits:
  connections: 100
  handshakes: 64
  handshakesPerSource: 16
  connectionsPerSourcePerSecond: 1000
`)

	// The flood: 400 connections from the attacker's address that send
	// nothing, held until the test ends.
	var flood []net.Conn
	defer func() {
		for _, c := range flood {
			c.Close()
		}
	}()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(attacker)}, Timeout: 2 * time.Second}
	for range 400 {
		if c, err := d.Dial("tcp", addr); err == nil {
			flood = append(flood, c)
		}
	}

	admin := machine.NewMachineServiceClient(dialTLS(t, p, addr, p.load(t, "admin")))
	for i := range 20 {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		_, err := admin.Version(ctx, &emptypb.Empty{})
		cancel()
		if err != nil {
			t.Fatalf("call %d while the flood is held: %v", i+1, err)
		}
		// Keep the flood coming while the client calls.
		for range 10 {
			if c, err := d.Dial("tcp", addr); err == nil {
				flood = append(flood, c)
			}
		}
	}
}

// soloGateway runs one apid serve (a plain build) on ip with its own PKI
// (node-1 and an admin client) and an example agent, its configuration
// the node's key material plus extra, and waits until it listens.
func soloGateway(t *testing.T, ip, extra string) (*testPKI, string, *process) {
	t.Helper()
	dir := t.TempDir()
	p := newPKI(t, filepath.Join(dir, "pki"))
	addr := net.JoinHostPort(ip, strconv.Itoa(freePort(t, ip)))
	genAll(t, [][]string{
		{"node", "-name", "node-1", "-ip", ip, "-ca-dir", p.dir, "-out", p.dir},
		{"client", "-name", "admin", "-roles", "os:admin", "-ca-dir", p.dir, "-out", p.dir},
	})
	sock := filepath.Join(dir, "agent.sock")
	bin := plainBin(t)
	startBin(t, bin, "example agent serving", "agent", "-listen", "unix://"+sock)
	cfg := writeConfig(t, dir, "apid.yaml", p.nodeConfig("node-1")+fmt.Sprintf("listen: %q\nbackend: %q\ndrainDelay: 0s\nlogLevel: warn\n", addr, "unix://"+sock)+extra)
	gw := startBin(t, bin, "", "serve", "-config", cfg)
	if !testkit.Eventually(20*time.Second, func() bool { return listening(addr) }) {
		t.Fatalf("gateway not listening:\n%s", gw.log())
	}
	return p, addr, gw
}
