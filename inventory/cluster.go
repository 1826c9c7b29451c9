package inventory

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"time"
)

// ClusterSource learns the nodes from the cluster itself: the members
// (cluster.Member resources) a Talos node knows from its discovery, read
// through the node agent's resource API by the Members function the
// gateway gives New.
type ClusterSource struct {
	// Labels are added to every node from this source, for groups such as
	// @from=cluster.
	Labels map[string]string `yaml:"labels"`
	// Through, when set, is the node whose members are watched (its
	// address or DNS name, dialled at remotePort with the forwarding
	// identity), for an apid that fronts a cluster it is not part of.
	// Empty: the local node.
	Through string `yaml:"through"`
}

// MaxMembers bounds the members the cluster source holds (as maxFileSize
// bounds a file): past it the source fails and keeps its last nodes, so a
// node that reports members without end cannot make apid hold them.
const MaxMembers = 10000

// publishEvery is how often at most the cluster source publishes a new
// inventory: each publication merges every source, so a node that
// republishes its members in a burst costs one merge, not one per member.
const publishEvery = 250 * time.Millisecond

// Members watches the cluster's members as src says (through the local
// node, or the one src.Through names): it calls set with every member once
// it has them all, and again after each change, until ctx ends or the
// watch fails (its error is the source's failure; it is called again after
// a backoff).
type Members func(ctx context.Context, src ClusterSource, set func([]Node)) error

// Option configures New.
type Option func(*Inventory)

// WithMembers gives the cluster source its watch.
func WithMembers(m Members) Option { return func(inv *Inventory) { inv.members = m } }

// errNoMembers is the cluster source's failure when nothing can watch the
// members.
var errNoMembers = errors.New("inventory.cluster: this apid has no way to read the cluster's members")

// watchMembers runs the cluster source: the watch, restarted with backoff
// (1 s to 30 s) whenever it fails, its nodes kept meanwhile. What the
// watch reports is published at most every publishEvery, in a
// deterministic order, so that two members claiming one name resolve the
// same way at every publication.
func (inv *Inventory) watchMembers(ctx context.Context, src ClusterSource) {
	defer inv.running.Done()
	const id = "cluster"
	latest := make(chan []Node, 1)
	inv.running.Add(1)
	go inv.publishMembers(ctx, id, latest)
	backoff := time.Second
	for ctx.Err() == nil {
		err := errNoMembers
		if inv.members != nil {
			err = inv.members(ctx, src, func(nodes []Node) {
				if len(nodes) > MaxMembers {
					inv.update(ctx, id, nil, fmt.Errorf("inventory.cluster: %d members, more than the %d it holds; keeping the last ones", len(nodes), MaxMembers))
					return
				}
				for i := range nodes {
					nodes[i].Labels = mergeLabels(nodes[i].Labels, src.Labels)
				}
				slices.SortFunc(nodes, func(a, b Node) int {
					return cmp.Or(strings.Compare(a.Name, b.Name), strings.Compare(a.Address, b.Address), cmp.Compare(a.Port, b.Port))
				})
				select { // replace what is not published yet
				case <-latest:
				default:
				}
				latest <- nodes
				backoff = time.Second
			})
		}
		if ctx.Err() != nil {
			return
		}
		if err == nil {
			err = errors.New("the members watch ended")
		}
		inv.update(ctx, id, nil, err)
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(backoff*2, 30*time.Second)
	}
}

// publishMembers publishes the newest members the watch reported, at most
// every publishEvery.
func (inv *Inventory) publishMembers(ctx context.Context, id string, latest <-chan []Node) {
	defer inv.running.Done()
	for {
		select {
		case <-ctx.Done():
			return
		case nodes := <-latest:
			inv.update(ctx, id, nodes, nil)
		}
		t := time.NewTimer(publishEvery)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
	}
}

func mergeLabels(own, extra map[string]string) map[string]string {
	if len(extra) == 0 {
		return own
	}
	out := maps.Clone(own)
	if out == nil {
		out = map[string]string{}
	}
	maps.Copy(out, extra)
	return out
}
