package disruption

import (
	"context"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/auth"
)

// observation is what one probe of a node saw.
type observation struct {
	at    time.Time // when the probe started; zero: never probed
	up    bool      // it answered
	boot  uint64    // its boot time (SystemStat), when up
	ready bool      // its services healthy and, on the control plane, its etcd member
	why   string    // why not ready, for a person
	// streak counts the probes in a row, this one included, that found
	// the node down or not ready.
	streak int
}

// probeTimeout bounds one probe of one node.
const probeTimeout = 3 * time.Second

// prober is the identity the budget reads nodes with: a reader, as
// talosctl health and talosctl etcd status read them.
var prober = auth.Caller{Subject: "apid (disruption budget)", CommonName: "apid", Roles: []string{"os:reader"}}

// probe reads node's boot and readiness through the nodes' own API.
func (b *Budget) probe(ctx context.Context, node string, controlPlane bool) observation {
	obs := observation{at: b.o.Now()}
	ctx, cancel := context.WithTimeout(auth.NewContext(ctx, prober), probeTimeout)
	defer cancel()
	callCtx, cc, release, err := b.o.Dial(ctx, node)
	if err != nil {
		obs.why = "down since " + obs.at.UTC().Format(time.TimeOnly) + " (" + describe(err) + ")"
		return obs
	}
	err = func() error {
		client := machine.NewMachineServiceClient(cc)
		st, err := client.SystemStat(callCtx, &emptypb.Empty{})
		if err != nil {
			return err
		}
		obs.up = true
		if m := st.GetMessages(); len(m) > 0 {
			obs.boot = m[0].GetBootTime()
		}
		list, err := client.ServiceList(callCtx, &emptypb.Empty{})
		if err != nil {
			obs.why = "not ready (services: " + describe(err) + ")"
			return nil
		}
		if why := servicesNotReady(list); why != "" {
			obs.why = "not ready (" + why + ")"
			return nil
		}
		if controlPlane {
			es, err := client.EtcdStatus(callCtx, &emptypb.Empty{})
			if err != nil {
				obs.why = "not ready (etcd: " + describe(err) + ")"
				return nil
			}
			if why := etcdNotReady(es); why != "" {
				obs.why = "not ready (etcd: " + why + ")"
				return nil
			}
		}
		obs.ready = true
		return nil
	}()
	if release != nil {
		release(err)
	}
	if err != nil {
		obs.up = false
		obs.why = "down since " + obs.at.UTC().Format(time.TimeOnly) + " (" + describe(err) + ")"
	}
	return obs
}

// servicesNotReady says which services are not running and healthy, as
// talosctl health's "all services healthy" reads them; "" when all are.
func servicesNotReady(resp *machine.ServiceListResponse) string {
	var bad []string
	running := 0
	for _, m := range resp.GetMessages() {
		for _, s := range m.GetServices() {
			h := s.GetHealth()
			switch {
			case s.GetState() != "Running":
				bad = append(bad, s.GetId()+" "+s.GetState())
			case !h.GetUnknown() && !h.GetHealthy():
				bad = append(bad, s.GetId()+" unhealthy")
			default:
				running++
			}
		}
	}
	switch {
	case len(bad) > 0:
		sort.Strings(bad)
		return "services: " + strings.Join(bad[:min(len(bad), 4)], ", ")
	case running == 0:
		return "no service running"
	}
	return ""
}

// etcdNotReady says why the node's etcd member is not a healthy voting
// member of a cluster with a leader; "" when it is.
func etcdNotReady(resp *machine.EtcdStatusResponse) string {
	if len(resp.GetMessages()) == 0 {
		return "no member status"
	}
	// One message: the node's own member.
	st := resp.GetMessages()[0].GetMemberStatus()
	switch {
	case st == nil:
		return "no member status"
	case len(st.GetErrors()) > 0:
		return strings.Join(st.GetErrors(), "; ")
	case st.GetIsLearner():
		return "a learner, not a voting member"
	case st.GetLeader() == 0:
		return "no leader: the cluster has no quorum"
	}
	return ""
}

// describe is an error's message for a person (a status's, without the
// rpc error prefix).
func describe(err error) string {
	if st, ok := status.FromError(err); ok {
		return st.Code().String() + ": " + st.Message()
	}
	return err.Error()
}

// relevant lists the nodes a call to node is judged against: its groups'
// members and, for a control-plane node, the control plane.
func (b *Budget) relevant(cfg Config, node string) []string {
	v := b.view(cfg)
	out := []string{node}
	for _, m := range v.members {
		if slices.Contains(m, node) {
			out = append(out, m...)
		}
	}
	if slices.Contains(v.cp, node) {
		out = append(out, v.cp...)
	}
	slices.Sort(out)
	return slices.Compact(out)
}

// observe probes the nodes whose last observation is older than the probe
// interval, in parallel, and records what it saw.
func (b *Budget) observe(ctx context.Context, nodes []string) {
	cfg := b.Applied()
	v := b.view(cfg)
	now := b.o.Now()
	b.mu.Lock()
	var stale []string
	for _, n := range nodes {
		if st := b.nodes[n]; st == nil || now.Sub(st.seen.at) >= cfg.ProbeInterval {
			stale = append(stale, n)
		}
	}
	b.mu.Unlock()
	if len(stale) == 0 {
		b.mu.Lock()
		b.settle(v) // time alone may have changed what may go
		b.mu.Unlock()
		return
	}
	seen := make([]observation, len(stale))
	var wg sync.WaitGroup
	for i, n := range stale {
		wg.Go(func() { seen[i] = b.probe(ctx, n, slices.Contains(v.cp, n)) })
	}
	wg.Wait()
	b.mu.Lock()
	for i, n := range stale {
		if ctx.Err() != nil {
			break // the caller gave up: what it saw says nothing
		}
		st := b.node(n)
		if seen[i].at.After(st.seen.at) {
			if !seen[i].ready {
				seen[i].streak = 1
				if !st.seen.at.IsZero() && !st.seen.ready {
					seen[i].streak = st.seen.streak + 1
				}
			}
			st.seen = seen[i]
		}
	}
	b.settle(v)
	b.mu.Unlock()
}

// settle releases the slots whose nodes are back, forgets nodes that have
// nothing to say, and lets held calls go (b.mu held).
func (b *Budget) settle(v view) {
	for name, n := range b.nodes {
		for _, s := range slices.Clone(n.slots) {
			if !s.ended.IsZero() && n.seen.at.After(s.ended) {
				if !n.seen.up {
					s.sawDown = true
				} else if s.postBoot == 0 {
					s.postBoot = n.seen.boot
				}
			}
			if why := back(s, n.seen); why != "" {
				b.release(name, s, why)
			} else if _, listed := v.inv.Lookup(name); !listed && v.inv.Len() > 0 && s.listed {
				b.release(name, s, "it left the inventory")
			}
		}
	}
	b.dispatch()
}

// back says why s is over, seen what the node shows now; "" while it is
// not: the call has ended, a probe begun after it found the node answering
// and ready, and, for a reboot, on a new boot.
func back(s *slot, seen observation) string {
	newBoot := fmt.Sprintf("back: a new boot (boot time %d), services healthy", seen.boot)
	switch {
	case s.ended.IsZero() || !seen.at.After(s.ended) || !seen.up || !seen.ready:
		return ""
	case s.failed && s.boot != 0 && seen.boot != s.boot:
		return newBoot
	case s.failed && seen.at.Sub(s.ended) >= ambiguousGrace:
		return fmt.Sprintf("the call failed and the node kept running, ready, on the same boot for %s", ambiguousGrace)
	case s.failed:
		return ""
	case s.effect == reboots && s.boot != 0 && seen.boot == s.boot:
		return "" // not rebooted yet
	case s.effect == reboots && s.boot == 0 && !s.sawDown && (s.postBoot == 0 || seen.boot == s.postBoot):
		// Its boot was unknown when admitted: seen down since, or on a
		// boot newer than the first seen after the call.
		return ""
	case s.effect == reboots:
		return newBoot
	}
	return "back: services healthy"
}

// ambiguousGrace is how long a node whose disruptive call failed without
// saying whether it acted must keep running on the same boot for the
// call's slot to end.
const ambiguousGrace = 30 * time.Second

// watch probes, every probe interval, the nodes with a disruption not over
// and those held calls are judged against, until Close.
func (b *Budget) watch() {
	defer close(b.done)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { <-b.stop; cancel() }()
	for {
		interval := b.Applied().ProbeInterval
		t := time.NewTimer(interval)
		select {
		case <-b.stop:
			t.Stop()
			return
		case <-b.wake:
			// Something changed: look again soon, not at once, so that a
			// call just ended is probed after its node acted.
			t.Stop()
			select {
			case <-time.After(min(interval, 250*time.Millisecond)):
			case <-b.stop:
				return
			}
		case <-t.C:
		}
		cfg := b.Applied()
		b.mu.Lock()
		var nodes []string
		for name, n := range b.nodes {
			if len(n.slots) > 0 {
				nodes = append(nodes, name)
			}
		}
		for _, w := range b.queue {
			nodes = append(nodes, w.node)
		}
		b.mu.Unlock()
		if len(nodes) > 0 {
			b.refreshRemote(ctx)
		}
		var all []string
		for _, n := range nodes {
			all = append(all, b.relevant(cfg, n)...)
		}
		slices.Sort(all)
		b.observe(ctx, slices.Compact(all))
	}
}

// memberNode finds the node of the etcd member an EtcdRemoveMemberByID
// call removes, asking node (where the call goes) for the member list; on
// any failure, the call counts against node itself.
func (b *Budget) memberNode(ctx context.Context, node string, request []byte) string {
	id, ok := removedMember(request)
	if !ok {
		return node
	}
	ctx, cancel := context.WithTimeout(auth.NewContext(ctx, prober), probeTimeout)
	defer cancel()
	callCtx, cc, release, err := b.o.Dial(ctx, node)
	if err != nil {
		return node
	}
	resp, err := machine.NewMachineServiceClient(cc).EtcdMemberList(callCtx, &machine.EtcdMemberListRequest{})
	if release != nil {
		release(err)
	}
	if err != nil {
		return node
	}
	for _, m := range resp.GetMessages() {
		for _, mem := range m.GetMembers() {
			if mem.GetId() != id {
				continue
			}
			if n, ok := b.o.Inventory().Lookup(mem.GetHostname()); ok {
				return n.Name
			}
			return "" // its node is gone from the inventory: the member of a dead node
		}
	}
	return node
}
