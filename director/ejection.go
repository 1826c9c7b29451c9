package director

import (
	"fmt"
	"math/rand/v2"
	"sync"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Ejection is one ejected node, as the status page and metrics show it.
type Ejection struct {
	Node      string
	Since     time.Time
	Until     time.Time
	Failures  int
	Ejections int // in a row, including this one
	LastError string
}

// ejector remembers the nodes that failed recently. Only nodes with
// failures are kept, and a success forgets the node, so the table is as
// large as the set of failing nodes (bounded by the pool: a node must be
// dialled to fail).
type ejector struct {
	mu     sync.Mutex
	cfg    EjectionConfig
	nodes  map[string]*failing
	now    func() time.Time
	notify func(e Ejection, ejected bool)
}

type failing struct {
	failures  int
	ejections int
	since     time.Time
	until     time.Time // zero: not ejected
	probing   bool      // the call trying the node again is running
	probed    time.Time // when it started
	last      time.Time // the last failure
	lastError string
	dest      Dest // where the failures happened
}

// maxFailing bounds the nodes with failures the ejector remembers: a
// caller naming made-up nodes must not grow it. Over it, the entries not
// ejected whose last failure is oldest go first.
const maxFailing = 4096

func newEjector(notify func(Ejection, bool)) *ejector {
	if notify == nil {
		notify = func(Ejection, bool) {}
	}
	return &ejector{nodes: map[string]*failing{}, now: time.Now, notify: notify}
}

func (e *ejector) setConfig(cfg EjectionConfig) {
	e.mu.Lock()
	e.cfg = cfg
	if cfg.ConsecutiveFailures <= 0 {
		clear(e.nodes) // off: nobody stays ejected
	}
	e.mu.Unlock()
}

// currentLocked is d.Node's record, after forgetting one made at another
// destination than d (the inventory moved the node, or changed the
// identity it must prove): its failures say nothing about the new one.
// A forgotten ejection is returned, to be announced as over once e.mu is
// released.
func (e *ejector) currentLocked(d Dest) (f *failing, forgotten *Ejection) {
	f = e.nodes[d.Node]
	if f == nil || f.dest == d {
		return f, nil
	}
	delete(e.nodes, d.Node)
	if !f.until.IsZero() {
		v := f.view(d.Node)
		forgotten = &v
	}
	return nil, forgotten
}

// announce tells notify that a forgotten ejection is over.
func (e *ejector) announce(forgotten *Ejection) {
	if forgotten != nil {
		e.notify(*forgotten, false)
	}
}

// peek reports whether d's node is ejected, without letting a probe
// through.
func (e *ejector) peek(d Dest) bool {
	e.mu.Lock()
	f, forgotten := e.currentLocked(d)
	ejected := f != nil && !f.until.IsZero()
	e.mu.Unlock()
	e.announce(forgotten)
	return ejected
}

// ejected reports whether d's node is out of calls now. When its time is
// up, the first caller to ask is let through as the probe.
func (e *ejector) ejected(d Dest) (Ejection, bool) {
	e.mu.Lock()
	f, forgotten := e.currentLocked(d)
	view, out := e.refuseLocked(f, d.Node)
	e.mu.Unlock()
	e.announce(forgotten)
	return view, out
}

func (e *ejector) refuseLocked(f *failing, node string) (Ejection, bool) {
	if f == nil || f.until.IsZero() {
		return Ejection{}, false
	}
	now := e.now()
	// A probe that runs long (a stream that follows logs) gives way to
	// another call after BaseTime, so it cannot keep the node out.
	if !now.Before(f.until) && (!f.probing || now.Sub(f.probed) > e.cfg.BaseTime) {
		f.probing, f.probed = true, now
		return Ejection{}, false
	}
	return f.view(node), true
}

// report records the outcome of a call that reached (or tried to reach)
// node.
func (e *ejector) report(d Dest, code codes.Code, msg string) {
	node := d.Node
	e.mu.Lock()
	cfg := e.cfg
	f, forgotten := e.currentLocked(d)
	defer e.announce(forgotten) // after the unlocks below
	switch code {
	case codes.Unavailable, codes.DeadlineExceeded:
	case codes.Canceled:
		// The caller went away: nothing learnt about the node.
		if f != nil {
			f.probing = false // let the next call probe
		}
		e.mu.Unlock()
		return
	default:
		// The node answered (even with an error of its own): it is up.
		delete(e.nodes, node)
		e.mu.Unlock()
		if f != nil && !f.until.IsZero() {
			e.notify(f.view(node), false)
		}
		return
	}
	if cfg.ConsecutiveFailures <= 0 {
		if f != nil {
			delete(e.nodes, node)
		}
		e.mu.Unlock()
		return
	}
	now := e.now()
	if f == nil {
		e.makeRoom(now)
		f = &failing{}
		e.nodes[node] = f
	}
	f.dest = d
	f.failures++
	f.last = now
	f.lastError = fmt.Sprintf("%s: %s", code, msg)
	eject := (f.until.IsZero() && f.failures >= cfg.ConsecutiveFailures) || f.probing
	if eject {
		if f.until.IsZero() {
			f.since = now
		}
		f.ejections++
		d := cfg.BaseTime << min(f.ejections-1, 20)
		if d > cfg.MaxTime || d <= 0 {
			d = cfg.MaxTime
		}
		d += time.Duration(rand.Int64N(int64(d)/10 + 1))
		f.until, f.probing = now.Add(d), false
	}
	view := f.view(node)
	e.mu.Unlock()
	if eject {
		e.notify(view, true)
	}
}

// makeRoom forgets, when the table is full, nodes that failed long ago and
// are not ejected, oldest first.
func (e *ejector) makeRoom(now time.Time) {
	if len(e.nodes) < maxFailing {
		return
	}
	for n, f := range e.nodes {
		if f.until.IsZero() && now.Sub(f.last) > e.cfg.MaxTime {
			delete(e.nodes, n)
		}
	}
	for len(e.nodes) >= maxFailing {
		var oldest string
		var at time.Time
		for n, f := range e.nodes {
			if f.until.IsZero() && (oldest == "" || f.last.Before(at)) {
				oldest, at = n, f.last
			}
		}
		if oldest == "" {
			return // all ejected: they leave as they are probed
		}
		delete(e.nodes, oldest)
	}
}

func (f *failing) view(node string) Ejection {
	return Ejection{Node: node, Since: f.since, Until: f.until, Failures: f.failures, Ejections: f.ejections, LastError: f.lastError}
}

// snapshot lists the nodes ejected now: those whose ejection runs or whose
// probe does. A node whose time is up and that nobody calls any more
// (decommissioned, a typo) is not listed, and is forgotten after MaxTime.
func (e *ejector) snapshot() []Ejection {
	e.mu.Lock()
	defer e.mu.Unlock()
	now := e.now()
	var out []Ejection
	for n, f := range e.nodes {
		switch {
		case f.until.IsZero():
		case now.Before(f.until) || f.probing:
			out = append(out, f.view(n))
		case now.Sub(f.until) > e.cfg.MaxTime:
			delete(e.nodes, n)
		}
	}
	return out
}

// refusal is the status of a call to an ejected node.
func refusal(e Ejection, now time.Time) error {
	return status.Errorf(codes.Unavailable, "node %s is ejected since %s after %d failures in a row (last: %s); it is tried again in %s",
		e.Node, e.Since.UTC().Format(time.RFC3339), e.Failures, e.LastError, e.Until.Sub(now).Round(time.Millisecond))
}
