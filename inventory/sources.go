package inventory

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"
	"gopkg.in/yaml.v3"
)

// Config says where the nodes come from. Sources are merged in the order
// static, files, DNS, cluster; a name already taken by an earlier one is
// skipped.
type Config struct {
	// Nodes are listed in apid's own configuration (and reloaded with it).
	Nodes []Node `yaml:"nodes"`
	// Files are YAML files holding `nodes:` lists like Nodes, watched and
	// reloaded when they change.
	Files []string `yaml:"files"`
	// DNS are names whose SRV or A/AAAA records list nodes, refreshed on
	// their TTL.
	DNS []DNSSource `yaml:"dns"`
	// DNSServer is the server (host:port) asked for DNS sources. Default:
	// the first nameserver of /etc/resolv.conf.
	DNSServer string `yaml:"dnsServer"`
	// Cluster, when set, learns the nodes from the cluster's members,
	// through the local node agent's resource API (as Talos nodes know
	// them from their discovery): no list to write by hand.
	Cluster *ClusterSource `yaml:"cluster"`
	// ResolveUnknown lets a caller name a node that is neither in the
	// inventory nor an IP address, which apid then looks up in DNS and
	// dials. Off by default once any source is set: a name the inventory
	// does not know is that node's NOT_FOUND entry.
	ResolveUnknown bool `yaml:"resolveUnknown"`
}

// Configured reports whether any source is set.
func (c Config) Configured() bool {
	return len(c.Nodes) > 0 || len(c.Files) > 0 || len(c.DNS) > 0 || c.Cluster != nil
}

// Validate reports every problem of the sources as written. It does not
// read the files (CheckFiles does) or ask DNS: a file that is briefly
// invalid must not stop a reload of everything else.
func (c Config) Validate() error {
	var errs []error
	if _, err := NewSet(c.Nodes); err != nil {
		errs = append(errs, fmt.Errorf("inventory.nodes: %w", err))
	}
	seen := map[string]bool{}
	for _, f := range c.Files {
		switch {
		case f == "":
			errs = append(errs, errors.New("inventory.files: an empty path"))
		case seen["file:"+filepath.Clean(f)]:
			errs = append(errs, fmt.Errorf("inventory.files: %s is listed twice", f))
		}
		seen["file:"+filepath.Clean(f)] = true
	}
	for _, d := range c.DNS {
		if err := d.validate(); err != nil {
			errs = append(errs, fmt.Errorf("inventory.dns: %w", err))
		}
		if id := "dns:" + strings.ToLower(strings.TrimSuffix(d.Name, ".")); seen[id] {
			errs = append(errs, fmt.Errorf("inventory.dns: %s is listed twice", d.Name))
		} else {
			seen[id] = true
		}
	}
	switch {
	case c.DNSServer != "":
		if _, _, err := net.SplitHostPort(c.DNSServer); err != nil {
			errs = append(errs, fmt.Errorf("inventory.dnsServer %q: want host:port, such as 10.0.0.53:53", c.DNSServer))
		}
	case len(c.DNS) > 0:
		if _, err := defaultDNSServer(); err != nil {
			errs = append(errs, fmt.Errorf("inventory.dnsServer: none set and %w", err))
		}
	}
	if c.Cluster != nil && c.Cluster.Through != "" && !validHost(c.Cluster.Through) {
		errs = append(errs, fmt.Errorf("inventory.cluster.through %q: want a node's address or DNS name (dialled at remotePort), such as 10.0.0.2", c.Cluster.Through))
	}
	return errors.Join(errs...)
}

// CheckFiles reads every file source and reports those that cannot be
// read or do not validate: apid refuses to start on them (apid check
// reports them too); after the start, such a file only keeps its last
// good nodes.
func (c Config) CheckFiles() error {
	var errs []error
	for _, f := range c.Files {
		if _, err := readFile(f); err != nil {
			errs = append(errs, fmt.Errorf("inventory.files: %w", err))
		}
	}
	return errors.Join(errs...)
}

// fileDoc is the shape of an inventory file. Nodes is a pointer so that a
// file without the key (empty, or caught half-written) is an error rather
// than a list of no nodes; `nodes: []` says "none" on purpose.
type fileDoc struct {
	Nodes *[]Node `yaml:"nodes"`
}

// maxFileSize bounds an inventory file: a node is a few lines.
const maxFileSize = 16 << 20

// readFile parses an inventory file; any node that does not validate makes
// the whole file invalid, so a half-written edit changes nothing.
func readFile(path string) ([]Node, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	data, err := io.ReadAll(io.LimitReader(f, maxFileSize+1))
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if len(data) > maxFileSize {
		return nil, fmt.Errorf("%s: larger than %d MiB", path, maxFileSize>>20)
	}
	var doc fileDoc
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&doc); err != nil && err != io.EOF {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	if doc.Nodes == nil {
		return nil, fmt.Errorf("%s: no nodes key (write `nodes: []` for none)", path)
	}
	if _, err := NewSet(*doc.Nodes); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return *doc.Nodes, nil
}

// Event is reported for every change of a source: the source ("static",
// "file:PATH", "dns:NAME"), how many nodes it has now, and the error of a
// refresh that failed (the source then keeps its last nodes).
type Event struct {
	Source string
	Nodes  int
	Err    error
}

// Inventory is the live merge of the sources of a Config. It is safe for
// concurrent use; Set is lock-free.
type Inventory struct {
	log    *slog.Logger
	notify func(Event)
	cur    atomic.Pointer[Set]
	conf   atomic.Pointer[Config]

	confMu  sync.Mutex // one Configure (or Close) at a time
	closed  bool       // guarded by confMu
	mu      sync.Mutex
	parts   map[string][]Node // the last good nodes of each source
	order   []string          // sources in merge order
	stop    context.CancelFunc
	running sync.WaitGroup
	members Members // the cluster source's watch, if the gateway has one
}

// New starts an Inventory: files are read now (an unreadable one is an
// error), DNS names are asked now with a short wait and then refreshed in
// the background, and files are watched, until Close. notify, if not nil,
// hears about every change.
func New(cfg Config, log *slog.Logger, notify func(Event), opts ...Option) (*Inventory, error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if notify == nil {
		notify = func(Event) {}
	}
	if err := errors.Join(cfg.Validate(), cfg.CheckFiles()); err != nil {
		return nil, err
	}
	inv := &Inventory{log: log, notify: notify}
	for _, o := range opts {
		o(inv)
	}
	inv.cur.Store(&Set{})
	if err := inv.Configure(cfg); err != nil {
		return nil, err
	}
	return inv, nil
}

// Set is the inventory now.
func (inv *Inventory) Set() *Set { return inv.cur.Load() }

// ResolveUnknown reports whether names outside the inventory may be
// looked up in DNS: when the configuration says so, or when it sets no
// source at all (apid then dials what it is given, as without an
// inventory).
func (inv *Inventory) ResolveUnknown() bool {
	c := inv.conf.Load()
	return c.ResolveUnknown || !c.Configured()
}

// Configure replaces the sources with those of cfg (as on a reload).
// Watchers and refreshers restart; a file that cannot be read now keeps the
// nodes it had (none if it is new) and is reported, and DNS sources keep
// theirs until their first answer.
func (inv *Inventory) Configure(cfg Config) error {
	if err := cfg.Validate(); err != nil {
		return err
	}
	inv.confMu.Lock()
	defer inv.confMu.Unlock()
	if inv.closed {
		return errors.New("inventory is closed")
	}
	inv.mu.Lock()
	cur := inv.conf.Load()
	same := inv.stop != nil && cur != nil && reflect.DeepEqual(*cur, cfg)
	stop := inv.stop
	inv.mu.Unlock()
	if same {
		return nil
	}
	if stop != nil {
		stop()
		inv.running.Wait() // the old watchers take inv.mu to publish
	}
	server := cfg.DNSServer
	if server == "" && len(cfg.DNS) > 0 {
		server, _ = defaultDNSServer() // Validate checked it
	}
	ctx, cancel := context.WithCancel(context.Background())
	inv.mu.Lock()
	old := inv.parts
	inv.conf.Store(&cfg)
	inv.parts = map[string][]Node{"static": cfg.Nodes}
	inv.order = []string{"static"}
	var failed []Event
	read := map[string]file{} // what was read of each file, for its watch
	for _, f := range cfg.Files {
		id := "file:" + f
		info, _ := os.Stat(f) // the file read here, for the watch's in-place rule
		nodes, err := readFile(f)
		if err == nil {
			read[f] = file{info: info, nodes: len(nodes)}
		}
		if err != nil {
			nodes = old[id]
			failed = append(failed, Event{Source: id, Nodes: len(nodes), Err: err})
		}
		inv.parts[id] = nodes
		inv.order = append(inv.order, id)
	}
	for _, d := range cfg.DNS {
		id := "dns:" + d.Name
		inv.parts[id] = old[id] // kept until the first answer
		inv.order = append(inv.order, id)
	}
	if cfg.Cluster != nil {
		inv.parts["cluster"] = old["cluster"] // kept until the first answer
		inv.order = append(inv.order, "cluster")
	}
	inv.publishLocked()
	inv.stop = cancel
	inv.mu.Unlock()
	for _, e := range failed {
		inv.tell(e, false)
	}

	for _, f := range cfg.Files {
		// Watching starts before Configure returns, so no change made
		// after it is missed.
		w, err := fsnotify.NewWatcher()
		if err == nil {
			if err = w.Add(filepath.Dir(f)); err != nil {
				_ = w.Close()
			}
		}
		if err != nil {
			inv.log.Warn("inventory file is read once, not watched", "file", f, "err", err)
			continue
		}
		inv.running.Add(1)
		go inv.watchFile(ctx, f, w, read[f])
	}
	var first sync.WaitGroup
	for _, d := range cfg.DNS {
		r := &resolver{src: d, server: server}
		inv.running.Add(1)
		first.Add(1)
		go inv.refresh(ctx, r, first.Done)
	}
	if cfg.Cluster != nil {
		inv.running.Add(1)
		go inv.watchMembers(ctx, *cfg.Cluster)
	}
	// The first DNS answers usually come in milliseconds; serving without
	// them for a moment is better than not starting when DNS is down.
	waitTimeout(&first, 3*time.Second)
	return nil
}

func waitTimeout(wg *sync.WaitGroup, d time.Duration) {
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(d):
	}
}

// Close stops watching and refreshing, for good: a Configure running at
// the same time finishes first, and later ones fail.
func (inv *Inventory) Close() {
	inv.confMu.Lock()
	defer inv.confMu.Unlock()
	inv.closed = true
	inv.mu.Lock()
	stop := inv.stop
	inv.mu.Unlock()
	if stop != nil {
		stop()
	}
	inv.running.Wait()
}

// update records a source's new nodes (or its failure) and publishes.
func (inv *Inventory) update(ctx context.Context, id string, nodes []Node, err error) {
	inv.mu.Lock()
	if ctx.Err() != nil { // replaced by a newer configuration
		inv.mu.Unlock()
		return
	}
	changed := false
	if err == nil && !reflect.DeepEqual(inv.parts[id], nodes) {
		inv.parts[id] = nodes
		inv.publishLocked()
		changed = true
	}
	n := len(inv.parts[id])
	inv.mu.Unlock()
	inv.tell(Event{Source: id, Nodes: n, Err: err}, changed)
}

// tell logs and reports a source's failure, or its change.
func (inv *Inventory) tell(e Event, changed bool) {
	switch {
	case e.Err != nil:
		inv.log.Warn("inventory source failed; keeping its last nodes", "source", e.Source, "nodes", e.Nodes, "err", e.Err)
	case changed:
		inv.log.Info("inventory source changed", "source", e.Source, "nodes", e.Nodes, "total", inv.Set().Len())
	default:
		return
	}
	inv.notify(e)
}

// publishLocked merges the sources into a new Set.
func (inv *Inventory) publishLocked() {
	var all []Node
	for _, id := range inv.order {
		all = append(all, inv.parts[id]...)
	}
	s, err := NewSet(all)
	if err != nil {
		inv.log.Warn("inventory: nodes left out", "err", err)
	}
	inv.cur.Store(s)
}

// watchFile re-reads path whenever its directory changes. The directory
// is watched, not the file, so that editors that write a new file and
// rename it over the old one, and Kubernetes' ConfigMap symlink swaps,
// are seen. An unreadable or invalid version is logged and the last good
// one stays.
func (inv *Inventory) watchFile(ctx context.Context, path string, w *fsnotify.Watcher, last file) {
	defer inv.running.Done()
	defer w.Close()
	// Events come in bursts (write, chmod, rename); the file is read once
	// the burst has been quiet for a moment.
	const settle = 100 * time.Millisecond
	// One read at the start catches a change made between Configure's
	// read and the watch.
	timer := time.NewTimer(settle)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case _, ok := <-w.Events:
			if !ok {
				return
			}
			timer.Reset(settle)
		case err, ok := <-w.Errors:
			if !ok {
				return
			}
			inv.log.Warn("inventory file watch", "file", path, "err", err)
			timer.Reset(settle) // events may have been lost: read again
		case <-timer.C:
			var nodes []Node
			var err error
			last, nodes, err = readWatched(path, last)
			inv.update(ctx, "file:"+path, nodes, err)
		}
	}
}

// file is what a watch last read of an inventory file: which file it was
// and how many nodes it listed.
type file struct {
	info  os.FileInfo // nil: not read yet
	nodes int
}

// readWatched reads an inventory file the watch saw change. A file
// rewritten in place (the same file, not a new one renamed over it) that
// lists fewer nodes than before may be a writer caught half-way, or one
// that died: a cut at a line boundary is still valid YAML. Such a shrink
// is refused, and nodes are removed only by a file replaced whole.
func readWatched(path string, last file) (file, []Node, error) {
	info, err := os.Stat(path)
	if err != nil {
		return last, nil, err
	}
	inPlace := last.info != nil && os.SameFile(last.info, info)
	last.info = info // what is there now, read or not: a file renamed over it next is a new one
	nodes, err := readFile(path)
	if err != nil {
		return last, nil, err
	}
	if inPlace && len(nodes) < last.nodes {
		return last, nil, fmt.Errorf("%s went from %d nodes to %d, rewritten in place: a file rewritten in place may be cut short, so nodes are removed only when the file is replaced whole (write a new file, then rename it over this one)",
			path, last.nodes, len(nodes))
	}
	return file{info: info, nodes: len(nodes)}, nodes, nil
}

// refresh asks DNS for r's records, then again when their TTL runs out
// (at least a second apart; resolve caps the TTL), backing off on errors.
func (inv *Inventory) refresh(ctx context.Context, r *resolver, firstDone func()) {
	defer inv.running.Done()
	once := sync.OnceFunc(firstDone)
	defer once()
	backoff := time.Second
	for {
		qctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		nodes, ttl, err := r.resolve(qctx)
		cancel()
		if ctx.Err() != nil {
			return
		}
		inv.update(ctx, "dns:"+r.src.Name, nodes, err)
		once()
		wait := max(ttl, time.Second)
		if err != nil {
			wait, backoff = backoff, min(backoff*2, 30*time.Second)
		} else {
			backoff = time.Second
		}
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}
