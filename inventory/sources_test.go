package inventory

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/miekg/dns"
	"go.uber.org/goleak"

	"github.com/apid/apid/internal/testkit"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func write(t *testing.T, path, body string) {
	t.Helper()
	// Written beside and renamed over, as editors and config tools do.
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func TestFileSourceIsWatched(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "nodes.yaml")
	write(t, path, "nodes:\n- {name: cp-1, address: 127.0.0.11, role: controlplane}\n")
	var mu sync.Mutex
	var events []Event
	inv, err := New(Config{Nodes: []Node{{Name: "static-1", Address: "127.0.0.99"}}, Files: []string{path}}, nil,
		func(e Event) { mu.Lock(); events = append(events, e); mu.Unlock() })
	if err != nil {
		t.Fatal(err)
	}
	defer inv.Close()
	if got := names(inv.Set().Nodes()); got != "cp-1,static-1" {
		t.Fatalf("nodes %q", got)
	}

	write(t, path, "nodes:\n- {name: cp-1, address: 127.0.0.11, role: controlplane}\n- {name: w-1, address: 127.0.0.21}\n")
	requireEventually(t, "w-1 from the edited file", func() bool { _, ok := inv.Set().Lookup("w-1"); return ok })

	// A broken edit changes nothing and is reported.
	write(t, path, "nodes:\n- {name: w-2, role: boss}\n")
	requireEventually(t, "the error of the broken file", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(events) > 0 && events[len(events)-1].Err != nil && strings.Contains(events[len(events)-1].Err.Error(), "boss")
	})
	if got := names(inv.Set().Nodes()); got != "cp-1,static-1,w-1" {
		t.Fatalf("after a broken edit: %q", got)
	}

	// A name already taken by the static source stays the static one's.
	write(t, path, "nodes:\n- {name: static-1, address: 127.0.0.50}\n")
	requireEventually(t, "cp-1 gone", func() bool { _, ok := inv.Set().Lookup("cp-1"); return !ok })
	if n, _ := inv.Set().Lookup("static-1"); n.Address != "127.0.0.99" {
		t.Errorf("static-1 at %s", n.Address)
	}

	// Reconfigured (a reload) without the file: its nodes go.
	if err := inv.Configure(Config{Nodes: []Node{{Name: "static-2", Address: "127.0.0.98"}}}); err != nil {
		t.Fatal(err)
	}
	if got := names(inv.Set().Nodes()); got != "static-2" {
		t.Fatalf("after reload: %q", got)
	}
}

func TestBadSources(t *testing.T) {
	dir := t.TempDir()
	bad := filepath.Join(dir, "bad.yaml")
	write(t, bad, "nodes:\n- {name: a, colour: blue}\n")
	empty := filepath.Join(dir, "empty.yaml")
	write(t, empty, "")
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Files: []string{filepath.Join(dir, "missing.yaml")}}, "no such file"},
		{Config{Files: []string{bad}}, "colour"},
		{Config{Files: []string{empty}}, "no nodes key"},
		{Config{Files: []string{bad, bad}}, "listed twice"},
		{Config{DNS: []DNSSource{{Name: "not a name"}}}, "not a DNS name"},
		{Config{DNS: []DNSSource{{Name: "10.0.0.1"}}}, "is an address"},
		{Config{DNS: []DNSSource{{Name: "x.example.org", Type: "MX"}}}, `type "MX"`},
		{Config{DNS: []DNSSource{{Name: "x.example.org"}, {Name: "X.example.org."}}}, "listed twice"},
		{Config{DNSServer: "127.0.0.53", DNS: []DNSSource{{Name: "x.example.org"}}}, "want host:port"},
	} {
		if _, err := New(tc.cfg, nil, nil); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.cfg, err, tc.want)
		}
	}
}

// TestReloadKeepsAFileThatBrokeMeanwhile: a reload is not refused for a
// file that is invalid at that moment (that would also hold back the rest
// of apid's configuration); the file keeps its last good nodes.
func TestReloadKeepsAFileThatBrokeMeanwhile(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "nodes.yaml")
	write(t, path, "nodes:\n- {name: a}\n")
	var mu sync.Mutex
	var errs []error
	inv, err := New(Config{Files: []string{path}}, nil, func(e Event) {
		mu.Lock()
		defer mu.Unlock()
		if e.Err != nil {
			errs = append(errs, e.Err)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte("nodes: [{name: b, role: boss}]\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := inv.Configure(Config{Files: []string{path}, Nodes: []Node{{Name: "static"}}}); err != nil {
		t.Fatalf("reload refused: %v", err)
	}
	if got := names(inv.Set().Nodes()); got != "a,static" {
		t.Errorf("after the reload: %q, want a,static", got)
	}
	mu.Lock()
	if len(errs) == 0 || !strings.Contains(errs[0].Error(), "boss") {
		t.Errorf("reported: %v", errs)
	}
	mu.Unlock()
	inv.Close()
	if err := inv.Configure(Config{}); err == nil {
		t.Error("Configure after Close accepted")
	}
}

// zone is a tiny authoritative DNS server on loopback whose records the
// test changes.
type zone struct {
	mu      sync.Mutex
	records map[uint16][]dns.RR
	asked   int
}

func (z *zone) set(qtype uint16, rrs ...string) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.records[qtype] = nil
	for _, s := range rrs {
		rr, err := dns.NewRR(s)
		if err != nil {
			panic(err)
		}
		z.records[qtype] = append(z.records[qtype], rr)
	}
}

func (z *zone) ServeDNS(w dns.ResponseWriter, r *dns.Msg) {
	z.mu.Lock()
	defer z.mu.Unlock()
	z.asked++
	m := new(dns.Msg)
	m.SetReply(r)
	m.Authoritative = true
	q := r.Question[0]
	for _, rr := range z.records[q.Qtype] {
		if strings.EqualFold(rr.Header().Name, q.Name) {
			m.Answer = append(m.Answer, rr)
		}
	}
	if q.Qtype == dns.TypeSRV {
		m.Extra = append(m.Extra, z.records[dns.TypeA]...)
	}
	_ = w.WriteMsg(m)
}

func startDNS(t *testing.T) (*zone, string) {
	t.Helper()
	z, addr, _ := startDNSServer(t)
	return z, addr
}

// startDNSServer is startDNS that also returns a function stopping the
// server early.
func startDNSServer(t *testing.T) (*zone, string, func()) {
	t.Helper()
	z := &zone{records: map[uint16][]dns.RR{}}
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	started := make(chan struct{})
	srv := &dns.Server{PacketConn: pc, Handler: z, NotifyStartedFunc: func() { close(started) }}
	go func() { _ = srv.ActivateAndServe() }()
	<-started
	var once sync.Once
	stop := func() { once.Do(func() { _ = srv.Shutdown() }) }
	t.Cleanup(stop)
	return z, pc.LocalAddr().String(), stop
}

func TestDNSSourceFollowsTheRecords(t *testing.T) {
	z, server := startDNS(t)
	z.set(dns.TypeA, "nodes.apid.test. 1 IN A 127.0.0.31", "nodes.apid.test. 1 IN A 127.0.0.32")
	z.set(dns.TypeAAAA, "nodes.apid.test. 1 IN AAAA ::1")
	z.set(dns.TypeSRV, "_apid._tcp.apid.test. 60 IN SRV 0 0 50123 cp-1.apid.test.")
	z.mu.Lock()
	z.records[dns.TypeA] = append(z.records[dns.TypeA], mustRR("cp-1.apid.test. 60 IN A 127.0.0.41"))
	z.mu.Unlock()

	inv, err := New(Config{DNSServer: server, DNS: []DNSSource{
		{Name: "nodes.apid.test", Labels: map[string]string{"pool": "dns"}},
		{Name: "_apid._tcp.apid.test", Role: "controlplane"},
	}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer inv.Close()
	s := inv.Set()
	if got := names(s.Nodes()); got != "127.0.0.31,127.0.0.32,::1,cp-1.apid.test" {
		t.Fatalf("nodes %q", got)
	}
	cp, _ := s.Lookup("cp-1.apid.test")
	if cp.Address != "127.0.0.41" || cp.Port != 50123 || cp.Identity != "cp-1.apid.test" || cp.Role != "controlplane" {
		t.Errorf("SRV node %+v", cp)
	}
	if a, _ := s.Lookup("127.0.0.31"); a.Identity != "127.0.0.31" || a.Labels["pool"] != "dns" {
		t.Errorf("A node %+v", a)
	}
	if g, _ := s.Expand("@pool=dns"); names(g) != "127.0.0.31,127.0.0.32,::1" {
		t.Errorf("@pool=dns = %q", names(g))
	}

	// The A records have a TTL of 1 s: a change shows within a few.
	z.set(dns.TypeA, "nodes.apid.test. 1 IN A 127.0.0.33", "cp-1.apid.test. 60 IN A 127.0.0.41")
	requireEventually(t, "127.0.0.33 from DNS", func() bool { _, ok := inv.Set().Lookup("127.0.0.33"); return ok })
	if _, ok := inv.Set().Lookup("127.0.0.31"); ok {
		t.Error("127.0.0.31 still listed")
	}
}

func TestDNSFailureKeepsTheLastNodes(t *testing.T) {
	z, server, stop := startDNSServer(t)
	z.set(dns.TypeA, "n.apid.test. 1 IN A 127.0.0.51")
	var mu sync.Mutex
	var failed int
	inv, err := New(Config{DNSServer: server, DNS: []DNSSource{{Name: "n.apid.test"}}}, nil, func(e Event) {
		if e.Err != nil {
			mu.Lock()
			failed++
			mu.Unlock()
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer inv.Close()
	requireEventually(t, "the first answer", func() bool { return inv.Set().Len() == 1 })

	// The server goes away: refreshes fail, are reported, and the node
	// stays.
	stop()
	requireEventually(t, "two reported failures", func() bool { mu.Lock(); defer mu.Unlock(); return failed >= 2 })
	if n, ok := inv.Set().Lookup("127.0.0.51"); !ok || n.Name != "127.0.0.51" {
		t.Fatalf("the node went with the server: %v", names(inv.Set().Nodes()))
	}
}

func TestDNSEmptyAnswerEmptiesTheSource(t *testing.T) {
	z, server := startDNS(t)
	z.set(dns.TypeA, "n.apid.test. 1 IN A 127.0.0.51")
	inv, err := New(Config{DNSServer: server, DNS: []DNSSource{{Name: "n.apid.test"}}}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer inv.Close()
	requireEventually(t, "the first answer", func() bool { return inv.Set().Len() == 1 })
	z.mu.Lock()
	z.records = map[uint16][]dns.RR{} // NOERROR, nothing: the name lists no node now
	z.mu.Unlock()
	requireEventually(t, "the empty answer", func() bool { return inv.Set().Len() == 0 })
}

func mustRR(s string) dns.RR {
	rr, err := dns.NewRR(s)
	if err != nil {
		panic(err)
	}
	return rr
}

// requireEventually fails t unless cond holds within 15 s.
func requireEventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	if !testkit.Eventually(15*time.Second, cond) {
		t.Fatalf("timed out waiting for %s", what)
	}
}

// TestFileShrunkInPlaceKeepsItsNodes: an inventory file rewritten in place
// with fewer nodes (a writer that died after its first lines: still valid
// YAML) keeps its nodes and is reported; the same file replaced whole
// (written beside, renamed over) removes them. Growing in place is fine.
func TestFileShrunkInPlaceKeepsItsNodes(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "nodes.yaml")
	var full strings.Builder
	full.WriteString("nodes:\n")
	for i := 1; i <= 5; i++ {
		full.WriteString("- {name: node-" + string(rune('0'+i)) + ", address: 127.0.70." + string(rune('0'+i)) + "}\n")
	}
	write(t, path, full.String())
	events := make(chan Event, 16)
	inv, err := New(Config{Files: []string{path}}, nil, func(e Event) { events <- e })
	if err != nil {
		t.Fatal(err)
	}
	defer inv.Close()
	if n := inv.Set().Len(); n != 5 {
		t.Fatalf("%d nodes", n)
	}
	cut := strings.Join(strings.SplitAfter(full.String(), "\n")[:3], "") // nodes: and two nodes
	if err := os.WriteFile(path, []byte(cut), 0o644); err != nil {       // in place: same inode
		t.Fatal(err)
	}
	// The write may be read as an empty file first (its truncation), which
	// is refused too; then the cut file.
	timeout := time.After(10 * time.Second)
	for refused := false; !refused; {
		select {
		case e := <-events:
			if e.Err == nil {
				t.Fatalf("in-place shrink accepted: %+v", e)
			}
			refused = strings.Contains(e.Err.Error(), "went from 5 nodes to 2, rewritten in place")
		case <-timeout:
			t.Fatal("no event for the in-place shrink")
		}
	}
	if n := inv.Set().Len(); n != 5 {
		t.Fatalf("after the in-place shrink: %d nodes, want 5", n)
	}
	if _, ok := inv.Set().Lookup("node-4"); !ok {
		t.Fatal("node-4 went with the cut file")
	}
	write(t, path, cut) // replaced whole
	requireEventually(t, "the renamed file's two nodes", func() bool { return inv.Set().Len() == 2 })
	grown := cut + "- {name: node-9, address: 127.0.70.9}\n"
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(grown); err != nil {
		t.Fatal(err)
	}
	f.Close()
	requireEventually(t, "growth in place", func() bool { return inv.Set().Len() == 3 })
}
