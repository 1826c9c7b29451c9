package disruption

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/proxy"
)

// Metadata keys of the escape hatch: an admin's call with
// apid-disruption: force and a reason is admitted at once (and still
// counted as a disruption for everyone else).
const (
	KeyDisruption = "apid-disruption"
	KeyReason     = "apid-disruption-reason"
	// Force is the one value of KeyDisruption.
	Force = "force"
)

// Dialer reaches a node as a call naming it would be routed, on behalf of
// the caller in ctx (the router); release is told how the call ended.
type Dialer func(ctx context.Context, node string) (context.Context, grpc.ClientConnInterface, func(error), error)

// Admission is what the budget asks of the limits: room for one more held
// call of an identity.
type Admission interface {
	AdmitHeld(id string, perIdentity int) (release func(), err error)
}

// Options are what the budget uses and does not own.
type Options struct {
	// Dial reaches the nodes, to see them down and back. Required.
	Dial Dialer
	// Inventory is the node list now: the groups, the control plane.
	Inventory func() *inventory.Set
	// Admission bounds held calls per identity; nil: unbounded.
	Admission Admission
	// Log receives the audit lines of holds, admissions and releases.
	Log *slog.Logger
	// Now is the clock (tests); nil: time.Now.
	Now func() time.Time
	// Gateway names this gateway in the records other gateways read
	// (disruption.etcd).
	Gateway string
}

// Budget is the disruption section: it holds calls that would take a node
// down until that node's groups have room, and the node down until it is
// seen back. Create it with New; Close it at the end.
type Budget struct {
	o       Options
	applied atomic.Pointer[Config]
	m       *metrics
	shared  *shared // nil: the budget is this gateway's own

	mu       sync.Mutex
	nodes    map[string]*nodeState // nodes with a slot or an observation
	remote   map[string][]record   // other gateways' disruptions, by node (disruption.etcd)
	queue    []*waiter             // held calls, in arrival order
	draining bool
	seq      uint64

	wake chan struct{} // the watcher has something new to look at
	stop chan struct{}
	done chan struct{}
}

// nodeState is what the budget knows of one node.
type nodeState struct {
	name  string
	slots []*slot     // admitted calls whose node is not back yet
	seen  observation // the last probe's
}

// slot is one admitted disruption of a node.
type slot struct {
	id      uint64
	method  string
	caller  string
	reason  string // a forced call's
	forced  bool
	since   time.Time
	effect  effect
	boot    uint64 // the node's boot time when admitted; 0: unknown (it was down)
	ended   time.Time
	counted bool // in the metrics' active gauge
	// failed: the call failed in a way that leaves open whether the node
	// acted; the slot ends when the node has kept running, ready, on the
	// same boot for ambiguousGrace after it.
	failed bool
	// What probes saw after the call ended, for a reboot whose node's
	// boot was unknown when admitted: down at some point, and its boot
	// time when first seen up.
	sawDown  bool
	postBoot uint64
	key      string // its record in etcd, if shared
	listed   bool   // its node was in the inventory when admitted
	wasUp    bool   // its node answered when admitted
}

// what describes the slot for a person: "rebooting since 12:03:01, asked by CN=ops".
func (s *slot) what() string {
	verb := map[string]string{mReboot: "rebooting", mShutdown: "shut down", mReset: "being reset", mUpgrade: "upgrading", mRollback: "rolling back",
		mApply: "applying a configuration", mEtcdLeave: "leaving etcd", mEtcdRemove: "losing its etcd member",
		mServiceStop: "stopping etcd", mServiceRestart: "restarting etcd"}[s.method]
	out := fmt.Sprintf("%s since %s, asked by %s", verb, s.since.UTC().Format(time.TimeOnly), s.caller)
	if s.forced {
		out += " (forced: " + s.reason + ")"
	}
	return out
}

// waiter is one held call.
type waiter struct {
	seq     uint64
	node    string
	self    bool
	method  string
	caller  string
	effect  effect
	since   time.Time
	why     string        // what holds it now
	granted chan struct{} // closed when admitted (slot set) or refused (err set)
	// With a shared budget, dispatch marks a call that fits as a
	// candidate and signals maybe; the call's own goroutine then asks etcd.
	candidate bool
	maybe     chan struct{}
	slot      *slot
	err       error
}

// New returns the budget for cfg (already validated) and starts watching.
// It fails only when the etcd client cannot be made (its files).
func New(cfg Config, o Options) (*Budget, error) {
	if o.Log == nil {
		o.Log = slog.New(slog.DiscardHandler)
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Inventory == nil {
		o.Inventory = func() *inventory.Set { return nil }
	}
	b := &Budget{o: o, nodes: map[string]*nodeState{}, wake: make(chan struct{}, 1), stop: make(chan struct{}), done: make(chan struct{})}
	if cfg.Etcd.Configured() {
		if o.Gateway == "" {
			return nil, errors.New("disruption.etcd: the gateway needs a name for its records")
		}
		var err error
		if b.shared, err = newShared(cfg.Etcd, o.Gateway); err != nil {
			return nil, err
		}
	}
	b.m = newMetrics(b)
	b.applied.Store(&cfg)
	go b.watch()
	return b, nil
}

// Shared reports whether the budget is shared with the cluster's other
// gateways through etcd; false: it is this gateway's alone.
func (b *Budget) Shared() bool { return b.shared != nil }

// Apply makes cfg the budget from now on; held calls are judged by it at
// once.
func (b *Budget) Apply(cfg Config) error {
	b.applied.Store(&cfg)
	b.mu.Lock()
	b.dispatch()
	b.mu.Unlock()
	b.poke()
	return nil
}

// Applied returns the configuration in force.
func (b *Budget) Applied() Config { return *b.applied.Load() }

// Loosens lists the keys of next that let more down, or hold longer.
func (b *Budget) Loosens(next Config) []string { return Loosens(b.Applied(), next) }

// Close stops watching; held calls are refused as at a drain.
func (b *Budget) Close() error {
	b.Drain()
	select {
	case <-b.stop:
	default:
		close(b.stop)
	}
	<-b.done
	if b.shared != nil {
		b.shared.close()
	}
	return nil
}

// Drain refuses every held call, and every call that would be held from
// now on, with a status telling the caller to retry through another
// gateway: a held call's client connection ends with this gateway.
func (b *Budget) Drain() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.draining = true
	for _, w := range b.queue {
		b.refuse(w, errDraining)
	}
	b.queue = nil
}

var errDraining = status.Error(codes.Unavailable,
	"held by the disruption budget and never sent: this gateway is shutting down; retry through another gateway")

// Disruptive reports whether calls of fullMethod may take their node down
// (the router holds only those).
func (b *Budget) Disruptive(fullMethod string) bool { return Disruptive(fullMethod) }

// Forwarded vets a call another apid forwarded: it is never held here (the
// gateway its caller reached held it), and never forced from there.
func (b *Budget) Forwarded(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if len(md[KeyDisruption]) > 0 {
		return errForcedForwarded
	}
	return nil
}

// errForcedForwarded refuses the escape hatch on a forwarded call.
var errForcedForwarded = status.Errorf(codes.PermissionDenied, "%s is honoured only from the caller itself, never from a forwarded (proxyfrom) call", KeyDisruption)

// Hold waits until the call of fullMethod with request may go to node (self:
// the node this gateway runs on), and returns what to tell the budget when
// the call has ended. The caller is in ctx.
func (b *Budget) Hold(ctx context.Context, fullMethod, node string, self bool, request []byte) (func(proxy.Outcome), error) {
	cfg := b.Applied()
	caller, _ := auth.CallerFrom(ctx)
	force, reason, err := forced(ctx, caller)
	if err != nil {
		return nil, err
	}
	e := classify(fullMethod, request)
	if e == none {
		return nil, nil
	}
	if !cfg.Enabled && !force {
		return nil, nil
	}
	if fullMethod == mEtcdRemove {
		if node = b.memberNode(ctx, node, request); node == "" {
			return nil, nil // a member of no node the inventory lists: removing it is recovery
		}
	}
	who := caller.Subject
	if who == "" {
		who = "an unnamed caller"
	}
	now := b.o.Now()
	w := &waiter{node: node, self: self, method: fullMethod, caller: who, effect: e, since: now,
		granted: make(chan struct{}), maybe: make(chan struct{}, 1)}

	// Bounded per identity: counted before it may be held, so that a call
	// admitted while being counted is never refused after.
	if b.o.Admission != nil {
		release, err := b.o.Admission.AdmitHeld(who, cfg.MaxHeldPerIdentity)
		if err != nil {
			return nil, err
		}
		defer release()
	}

	// Fresh eyes on the nodes this call is judged against, and on the
	// other gateways' disruptions, before judging.
	b.refreshRemote(ctx)
	b.observe(ctx, b.relevant(cfg, node))

	b.mu.Lock()
	if b.draining {
		b.mu.Unlock()
		return nil, errDraining
	}
	b.seq++
	w.seq = b.seq
	if force {
		s := b.admit(w)
		s.forced, s.reason = true, reason
		b.mu.Unlock()
		b.m.decided("forced")
		b.o.Log.Warn("disruption forced", "node", node, "method", fullMethod, "caller", who, "reason", reason)
		if b.shared != nil {
			// Counted for every gateway, whatever they would decide.
			b.recordForced(ctx, s, node)
		}
		return b.ender(s, node), nil
	}
	b.queue = append(b.queue, w)
	b.dispatch()
	if w.candidate {
		b.mu.Unlock()
		if b.claim(ctx, w) {
			b.m.decided("admitted")
			b.o.Log.Info("disruption admitted", "node", node, "method", fullMethod, "caller", who, "shared", true)
			return b.ender(w.slot, node), nil
		}
		b.mu.Lock()
	}
	if w.slot != nil {
		b.mu.Unlock()
		b.m.decided("admitted")
		b.o.Log.Info("disruption admitted", "node", node, "method", fullMethod, "caller", who)
		return b.ender(w.slot, node), nil
	}
	why := w.why
	b.mu.Unlock()

	// Held: bounded by maxWait and by the caller's deadline (less a margin,
	// so that the status saying what held the call reaches the caller
	// before its own deadline does).
	b.m.decided("held")
	b.o.Log.Info("disruption held", "node", node, "method", fullMethod, "caller", who, "held_by", why)
	b.poke()
	wait := cfg.MaxWait
	if dl, ok := ctx.Deadline(); ok {
		left := time.Until(dl)
		wait = min(wait, left-min(max(left/20, 10*time.Millisecond), 500*time.Millisecond))
	}
	timer := time.NewTimer(max(wait, 0))
	defer timer.Stop()
wait:
	for {
		select {
		case <-w.granted:
			break wait
		case <-w.maybe:
			if b.claim(ctx, w) {
				break wait
			}
		case <-timer.C:
			break wait
		case <-ctx.Done():
			break wait
		}
	}
	b.mu.Lock()
	s, err, why := w.slot, w.err, w.why
	if s == nil && err == nil {
		b.leaveLocked(w)
	}
	b.mu.Unlock()
	waited := b.o.Now().Sub(now)
	switch {
	case s != nil:
		b.m.waited(waited)
		b.m.decided("admitted")
		b.o.Log.Info("disruption admitted", "node", node, "method", fullMethod, "caller", who, "waited", waited.Round(time.Millisecond).String())
		return b.ender(s, node), nil
	case err != nil:
		return nil, err
	case ctx.Err() != nil:
		b.m.decided("canceled")
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	b.m.decided("expired")
	b.o.Log.Warn("disruption gave up", "node", node, "method", fullMethod, "caller", who, "waited", waited.Round(time.Millisecond).String(), "held_by", why)
	return nil, status.Errorf(codes.DeadlineExceeded, "held for %s and never sent: %s", waited.Round(time.Second), why)
}

// forced reads the escape hatch: only os:admin may force, with a reason.
func forced(ctx context.Context, caller auth.Caller) (bool, string, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md[KeyDisruption]
	if len(v) == 0 {
		return false, "", nil
	}
	if len(v) > 1 || v[0] != Force {
		return false, "", status.Errorf(codes.InvalidArgument, "%s: the one value is %q", KeyDisruption, Force)
	}
	if caller.Forwarded {
		return false, "", errForcedForwarded
	}
	if !slices.Contains(caller.Roles, "os:admin") {
		return false, "", status.Errorf(codes.PermissionDenied, "%s: force needs the os:admin role", KeyDisruption)
	}
	reason := strings.TrimSpace(strings.Join(md[KeyReason], " "))
	if reason == "" {
		return false, "", status.Errorf(codes.InvalidArgument, "%s: force needs a reason in %s, for the audit log", KeyDisruption, KeyReason)
	}
	return true, reason, nil
}

// leaveLocked takes w out of the queue (b.mu held).
func (b *Budget) leaveLocked(w *waiter) {
	if i := slices.Index(b.queue, w); i >= 0 {
		b.queue = slices.Delete(b.queue, i, i+1)
		b.dispatch() // a call behind it may go now
	}
}

// refuse ends w's wait with err (b.mu held).
func (b *Budget) refuse(w *waiter, err error) {
	if w.slot == nil && w.err == nil {
		w.err = err
		close(w.granted)
	}
}

// admit gives w a slot on its node (b.mu held).
func (b *Budget) admit(w *waiter) *slot {
	n := b.node(w.node)
	s := &slot{id: w.seq, method: w.method, caller: w.caller, since: b.o.Now(), effect: w.effect, boot: n.seen.boot}
	_, s.listed = b.o.Inventory().Lookup(w.node)
	s.wasUp = n.seen.up
	if !n.seen.up {
		s.boot = 0
	}
	n.slots = append(n.slots, s)
	w.slot = s
	b.m.active.Add(1)
	s.counted = true
	if w.granted != nil {
		select {
		case <-w.granted:
		default:
			close(w.granted)
		}
	}
	return s
}

// node returns the state of node, made on first use (b.mu held).
func (b *Budget) node(name string) *nodeState {
	n := b.nodes[name]
	if n == nil {
		n = &nodeState{name: name}
		b.nodes[name] = n
	}
	return n
}

// ender returns what the proxy calls when the call to node has ended.
func (b *Budget) ender(s *slot, node string) func(proxy.Outcome) {
	return func(out proxy.Outcome) {
		b.mu.Lock()
		defer b.mu.Unlock()
		s.ended = b.o.Now()
		code, reply := out.Code, out.Reply
		switch {
		case !out.Sent:
			b.release(node, s, "the call was never sent")
			return
		case code != codes.OK && ambiguous(code) && s.wasUp:
			s.failed = true // the node may have acted: watched a while
		case code != codes.OK && !ambiguous(code):
			// The node refused the call: nothing happened to it.
			b.release(node, s, "the call failed: "+code.String())
			return
		case code != codes.OK && !s.wasUp:
			// A node seen down cannot have been taken down by a call that
			// failed: it stays unavailable while it is seen down.
			b.release(node, s, "the call to a node seen down failed: "+code.String())
			return
		case code == codes.OK && s.effect == maybeReboots && !rebootedPerReply(reply):
			s.effect = degrades // back once its gates pass, no new boot needed
		case code == codes.OK && s.effect == maybeReboots:
			s.effect = reboots
		}
		b.poke()
	}
}

// ambiguous codes leave open whether the node acted before the call failed.
func ambiguous(c codes.Code) bool {
	switch c {
	case codes.Unavailable, codes.DeadlineExceeded, codes.Canceled, codes.Unknown, codes.Internal, codes.Aborted:
		return true
	}
	return false
}

// release ends slot s of node (b.mu held) and lets held calls go.
func (b *Budget) release(node string, s *slot, why string) {
	n := b.nodes[node]
	if n == nil {
		return
	}
	i := slices.Index(n.slots, s)
	if i < 0 {
		return
	}
	n.slots = slices.Delete(n.slots, i, i+1)
	if s.counted {
		b.m.active.Add(-1)
	}
	if s.key != "" {
		go func() {
			if err := b.shared.drop(s.key); err != nil {
				b.o.Log.Warn("disruption record not deleted from etcd: it expires with this gateway's lease", "key", s.key, "error", err)
			}
		}()
	}
	b.syncShared()
	b.o.Log.Info("disruption released", "node", node, "method", s.method, "caller", s.caller,
		"after", b.o.Now().Sub(s.since).Round(time.Millisecond).String(), "why", why)
	b.dispatch()
}

func (b *Budget) poke() {
	select {
	case b.wake <- struct{}{}:
	default:
	}
}
