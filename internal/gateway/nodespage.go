package gateway

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/apid/apid/director"
	"github.com/apid/apid/disruption"
)

// nodesPage is what /nodes answers: at most limit nodes, from the first
// whose name sorts after the request's after; Next is the after of the
// following page, empty on the last.
type nodesPage struct {
	Time  time.Time    `json:"time"`
	Total int          `json:"total"`
	Nodes []NodeStatus `json:"nodes"`
	Next  string       `json:"next,omitempty"`
}

// Page sizes of /nodes: a page is built and written whole, so its size,
// not the inventory's, bounds what one request holds.
const (
	defaultNodesPage = 500
	maxNodesPage     = 1000
)

// noCalls is the Calls of every node apid has not called: shared, and
// never written.
var noCalls = map[string]uint64{}

// nodeStatuses merges the node table with the inventory and the pool:
// every node the inventory lists, apid has a connection for, or has
// called recently.
func (g *Gateway) nodeStatuses() []NodeStatus {
	nodes := g.nodes.snapshot()
	byName := make(map[string]int, len(nodes))
	for i, n := range nodes {
		byName[n.Node] = i
		nodes[i].Connection = "none"
	}
	for _, n := range g.inv.Set().Nodes() {
		key := director.Canonical(n.Name)
		i, ok := byName[key]
		if !ok {
			nodes = append(nodes, NodeStatus{Node: key, Connection: "none", Calls: noCalls})
			i = len(nodes) - 1
			byName[key] = i
		}
		nodes[i].Inventory = &NodeInventory{Address: n.Address, Identity: n.Identity, Role: n.Role, Labels: n.Labels}
		if g.isSelf(n.Name) || g.isSelf(n.Address) {
			nodes[i].Connection = "local"
		}
	}
	for _, name := range g.Config().Routing.SelfNames {
		if i, ok := byName[director.Canonical(name)]; ok {
			nodes[i].Connection = "local"
		}
	}
	for _, e := range g.routing.Ejections() {
		i, ok := byName[e.Node]
		if !ok {
			nodes = append(nodes, NodeStatus{Node: e.Node, Connection: "none", Calls: map[string]uint64{}})
			i = len(nodes) - 1
			byName[e.Node] = i
		}
		nodes[i].Ejected = &NodeEjection{Since: e.Since, Until: e.Until, Failures: e.Failures, LastError: e.LastError}
	}
	for node, v := range g.budget.Snapshot() {
		i, ok := byName[node]
		if !ok {
			nodes = append(nodes, NodeStatus{Node: node, Connection: "none", Calls: noCalls})
			i = len(nodes) - 1
			byName[node] = i
		}
		nodes[i].Disruption = &v
	}
	for _, e := range g.pool.Snapshot() {
		i, ok := byName[e.Node]
		if !ok {
			nodes = append(nodes, NodeStatus{Node: e.Node, Calls: map[string]uint64{}, LastUsed: e.LastUsed})
			i = len(nodes) - 1
			byName[e.Node] = i
		}
		nodes[i].Connection = e.State
	}
	slices.SortFunc(nodes, func(a, b NodeStatus) int { return strings.Compare(a.Node, b.Node) })
	return nodes
}

// isSelf reports whether name is one of this node's selfNames.
func (g *Gateway) isSelf(name string) bool {
	return slices.ContainsFunc(g.Config().Routing.SelfNames, func(s string) bool { return director.Canonical(s) == director.Canonical(name) })
}

// serveNodes lists the nodes as JSON (?format=json, or a client that
// accepts only JSON) or as a table for a terminal.
func (g *Gateway) serveNodes(w http.ResponseWriter, r *http.Request) {
	q := r.URL.Query()
	limit := defaultNodesPage
	if v := q.Get("limit"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > maxNodesPage {
			http.Error(w, fmt.Sprintf("limit %q: want 1 to %d", v, maxNodesPage), http.StatusBadRequest)
			return
		}
		limit = n
	}
	g.nodesBuild.Lock()
	all := g.nodeStatuses()
	start, _ := slices.BinarySearchFunc(all, q.Get("after"), func(n NodeStatus, after string) int {
		if n.Node <= after {
			return -1
		}
		return 1
	})
	end := min(start+limit, len(all))
	// A clone, so that only the page stays reachable while a slow client
	// reads it.
	page := nodesPage{Time: time.Now().UTC(), Total: len(all), Nodes: slices.Clone(all[start:end])}
	if end < len(all) {
		page.Next = all[end-1].Node
	}
	all = nil
	g.nodesBuild.Unlock()
	if r.URL.Query().Get("format") == "json" || r.Header.Get("Accept") == "application/json" {
		w.Header().Set("Content-Type", "application/json")
		_ = page.writeJSON(w)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tROLE\tADDRESS\tCONNECTION\tIN FLIGHT\tCALLS\tERRORS\tP50 ms\tP90 ms\tP99 ms\tEJECTED\tDISRUPTION\tLAST ERROR")
	for _, n := range page.Nodes {
		var calls, errs uint64
		for code, v := range n.Calls {
			calls += v
			if code != "OK" && code != "Canceled" {
				errs += v
			}
		}
		p50, p90, p99 := "-", "-", "-"
		if p := n.LatencyMs; p != nil {
			p50, p90, p99 = fmt.Sprintf("%.2f", p.P50), fmt.Sprintf("%.2f", p.P90), fmt.Sprintf("%.2f", p.P99)
		}
		last := "-"
		if e := n.LastError; e != nil {
			msg := e.Message
			if msg == "" {
				msg = e.Code
			}
			last = fmt.Sprintf("%s ago: %s", time.Since(e.At).Round(time.Second), msg)
		}
		ejected := "-"
		if e := n.Ejected; e != nil {
			ejected = fmt.Sprintf("until %s", e.Until.UTC().Format("15:04:05"))
			if last == "-" {
				last = e.LastError
			}
		}
		role, address := "-", "-"
		if n.Inventory != nil {
			role, address = n.Inventory.Role, n.Inventory.Address
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%d\t%d\t%d\t%s\t%s\t%s\t%s\t%s\t%s\n", n.Node, role, address, n.Connection, n.InFlight, calls, errs, p50, p90, p99, ejected, disruptionText(n.Disruption), last)
	}
	if page.Next != "" {
		fmt.Fprintf(tw, "… %d of %d nodes shown: next page ?after=%s\n", len(page.Nodes), page.Total, url.QueryEscape(page.Next))
	}
	_ = tw.Flush()
}

// writeJSON writes the page as indented JSON a node at a time, so that a
// client that reads slowly holds the page's nodes, not also their
// encoding.
func (p *nodesPage) writeJSON(w io.Writer) error {
	field := func(v any) []byte {
		b, _ := json.Marshal(v)
		return b
	}
	if _, err := fmt.Fprintf(w, "{\n  \"time\": %s,\n  \"total\": %d,\n  \"nodes\": [", field(p.Time), p.Total); err != nil {
		return err
	}
	for i := range p.Nodes {
		b, err := json.MarshalIndent(&p.Nodes[i], "    ", "  ")
		if err != nil {
			return err
		}
		sep := ",\n    "
		if i == 0 {
			sep = "\n    "
		}
		if _, err := io.WriteString(w, sep); err != nil {
			return err
		}
		if _, err := w.Write(b); err != nil {
			return err
		}
	}
	end := "\n  ]\n}\n"
	if len(p.Nodes) == 0 {
		end = "]\n}\n"
	}
	if p.Next != "" {
		end = end[:len(end)-3] + fmt.Sprintf(",\n  \"next\": %s\n}\n", field(p.Next))
	}
	_, err := io.WriteString(w, end)
	return err
}

// disruptionText sums up what the disruption budget says of a node, for
// the table: the call that took it down, since when, and the calls held.
func disruptionText(v *disruption.View) string {
	if v == nil {
		return "-"
	}
	var parts []string
	if len(v.Active) > 0 {
		a := v.Active[0]
		what := strings.TrimPrefix(a.Method, "/machine.MachineService/") + " since " + a.Since.UTC().Format("15:04:05")
		if a.Gateway != "" {
			what += " via " + a.Gateway
		}
		parts = append(parts, what)
	} else if v.Unavailable != "" {
		parts = append(parts, "unavailable")
	}
	if len(v.Held) > 0 {
		parts = append(parts, fmt.Sprintf("%d held", len(v.Held)))
	}
	if len(parts) == 0 {
		return "-"
	}
	return strings.Join(parts, ", ")
}
