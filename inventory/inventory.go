// Package inventory is the list of nodes apid knows by name: where each is
// reached, which name its certificate must carry, its role and its labels.
// It turns the names and groups a caller writes (cp-1, @controlplane,
// @zone=eu-1) into nodes. The nodes come from sources (the configuration
// file, a watched file, DNS records) that Inventory merges into immutable
// Sets; routing reads the current Set once per call.
package inventory

import (
	"errors"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"sort"
	"strings"
)

// Roles of a node, and the groups that name them.
const (
	RoleControlPlane = "controlplane"
	RoleWorker       = "worker"

	GroupAll          = "all"
	GroupControlPlane = "controlplane"
	GroupWorkers      = "workers"
)

// GroupPrefix starts a group where a node name may stand: @controlplane.
const GroupPrefix = "@"

// Node is one node of the inventory.
type Node struct {
	// Name is how callers name the node, and the hostname its replies are
	// stamped with when a group names it. Required.
	Name string `yaml:"name"`
	// Address is the IP address or DNS name apid dials. Default: Name.
	Address string `yaml:"address"`
	// Port is where the node's apid listens. Default: apid's remotePort.
	Port int `yaml:"port"`
	// Identity is the DNS name or IP address the node's certificate must
	// carry; apid verifies it on every connection. Default: Name.
	Identity string `yaml:"identity"`
	// Role is controlplane or worker (the default).
	Role string `yaml:"role"`
	// Labels select the node in groups such as @zone=eu-1.
	Labels map[string]string `yaml:"labels"`
}

// withDefaults fills Address, Identity and Role.
func (n Node) withDefaults() Node {
	n.Name = strings.TrimSpace(n.Name)
	if n.Address == "" {
		n.Address = n.Name
	}
	if n.Identity == "" {
		n.Identity = n.Name
	}
	if n.Role == "" {
		n.Role = RoleWorker
	}
	return n
}

// Validate reports what is wrong with one node as written.
func (n Node) Validate() error {
	n = n.withDefaults()
	var errs []error
	switch {
	case n.Name == "":
		errs = append(errs, errors.New("a node needs a name"))
	case strings.HasPrefix(n.Name, GroupPrefix):
		errs = append(errs, fmt.Errorf("node %q: a name cannot start with %s, which starts a group", n.Name, GroupPrefix))
	case !validHost(n.Name):
		errs = append(errs, fmt.Errorf("node %q: a name is a DNS name or an IP address", n.Name))
	default:
		// A caller naming an address means the node there: a node named
		// as one address and reached at another would take that address's
		// calls (the identity check would still refuse the node, late).
		if ip, err := netip.ParseAddr(n.Name); err == nil {
			if addr, err := netip.ParseAddr(n.Address); err != nil || addr.Unmap() != ip.Unmap() {
				errs = append(errs, fmt.Errorf("node %q: named by an IP address, but reached at %s: a node named by an address is reached there", n.Name, n.Address))
			}
		}
	}
	if !validHost(n.Address) {
		errs = append(errs, fmt.Errorf("node %q: address %q is neither an IP address nor a DNS name (no port: use port)", n.Name, n.Address))
	}
	if !validHost(n.Identity) {
		errs = append(errs, fmt.Errorf("node %q: identity %q is neither an IP address nor a DNS name", n.Name, n.Identity))
	}
	if n.Port < 0 || n.Port > 65535 {
		errs = append(errs, fmt.Errorf("node %q: port %d out of range", n.Name, n.Port))
	}
	if n.Role != RoleControlPlane && n.Role != RoleWorker {
		errs = append(errs, fmt.Errorf("node %q: role %q: want %s or %s", n.Name, n.Role, RoleControlPlane, RoleWorker))
	}
	for k, v := range n.Labels {
		if !validLabelPart(k) || !validLabelPart(v) {
			errs = append(errs, fmt.Errorf("node %q: label %q=%q: keys and values are letters, digits, '-', '_', '.' and '/', up to 63 bytes", n.Name, k, v))
		}
	}
	return errors.Join(errs...)
}

// validHost accepts an IP address (IPv6 without brackets) or a DNS name.
func validHost(s string) bool {
	if _, err := netip.ParseAddr(s); err == nil {
		return true
	}
	return ValidDNSName(s)
}

// ValidDNSName reports whether s is a DNS name as nodes are named: at most
// 253 bytes of dot-separated labels of letters, digits, '-' and '_' (not
// starting or ending with '-'), each 1 to 63 bytes.
func ValidDNSName(s string) bool {
	if s == "" || len(s) > 253 {
		return false
	}
	for _, l := range strings.Split(s, ".") {
		if l == "" || len(l) > 63 || l[0] == '-' || l[len(l)-1] == '-' {
			return false
		}
		for i := 0; i < len(l); i++ {
			c := l[i]
			if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return false
			}
		}
	}
	return true
}

func validLabelPart(s string) bool {
	if s == "" || len(s) > 63 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-_./", c) >= 0) {
			return false
		}
	}
	return true
}

// Key is the one spelling of a name or address under which a Set finds
// it: an IP address canonical (IPv4-mapped unmapped, no brackets), a name
// lower-cased.
func Key(s string) string {
	s = strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(s), "["), "]")
	if a, err := netip.ParseAddr(s); err == nil {
		return a.Unmap().WithZone("").String()
	}
	return strings.ToLower(s)
}

// Set is an immutable inventory: the nodes of every source, merged.
type Set struct {
	nodes     []Node          // sorted by name
	byName    map[string]int  // Key(name) -> index
	byAddress map[string]int  // Key(address) -> index, IP addresses only
	labels    map[string]bool // "key=value" of every label
	selectors []string        // the keys of labels, sorted
	known     string          // the groups an unknown group's error lists
}

// listedGroups is how many label selectors an unknown group's error lists.
const listedGroups = 20

// NewSet builds a Set from nodes, defaults filled. A node whose name was
// already taken (by an earlier source) is left out, and so reported in
// the returned error along with nodes that do not validate; the Set holds
// the rest.
func NewSet(nodes []Node) (*Set, error) {
	s := &Set{byName: map[string]int{}, byAddress: map[string]int{}, labels: map[string]bool{}}
	addrs := map[string]string{} // Key(address) -> the first node reached there
	var errs []error
	for _, n := range nodes {
		if err := n.Validate(); err != nil {
			errs = append(errs, err)
			continue
		}
		n = n.withDefaults()
		if _, dup := s.byName[Key(n.Name)]; dup {
			errs = append(errs, fmt.Errorf("node %q is listed twice; the first one stays", n.Name))
			continue
		}
		// A node named by an address (a DNS A record) that an earlier node
		// is reached at is that node: callers naming the address keep
		// getting it, verified as it.
		if owner, taken := addrs[Key(n.Name)]; taken {
			errs = append(errs, fmt.Errorf("node %q is the address of node %q, listed first; it stays %q", n.Name, owner, owner))
			continue
		}
		s.byName[Key(n.Name)] = -1
		if _, err := netip.ParseAddr(n.Address); err == nil {
			if _, taken := addrs[Key(n.Address)]; !taken {
				addrs[Key(n.Address)] = n.Name
			}
		}
		s.nodes = append(s.nodes, n)
	}
	sort.SliceStable(s.nodes, func(i, j int) bool { return s.nodes[i].Name < s.nodes[j].Name })
	for i, n := range s.nodes {
		s.byName[Key(n.Name)] = i
		for k, v := range n.Labels {
			s.labels[k+"="+v] = true
		}
	}
	for addr, owner := range addrs {
		s.byAddress[addr] = s.byName[Key(owner)]
	}
	// What an unknown group's refusal lists is built once per inventory:
	// a caller naming made-up groups must not make apid sort every label
	// on every call.
	s.selectors = slices.Sorted(maps.Keys(s.labels))
	s.known = strings.Join(s.Groups(listedGroups), ", ")
	return s, errors.Join(errs...)
}

// Len is the number of nodes.
func (s *Set) Len() int {
	if s == nil {
		return 0
	}
	return len(s.nodes)
}

// Nodes returns the nodes, sorted by name.
func (s *Set) Nodes() []Node {
	if s == nil {
		return nil
	}
	return slices.Clone(s.nodes)
}

// Lookup finds the node a caller named by its inventory name or by the IP
// address it is reached at.
func (s *Set) Lookup(target string) (Node, bool) {
	if s == nil {
		return Node{}, false
	}
	k := Key(target)
	if i, ok := s.byName[k]; ok {
		return s.nodes[i], true
	}
	if i, ok := s.byAddress[k]; ok {
		return s.nodes[i], true
	}
	return Node{}, false
}

// IsGroup reports whether a target names a group (@...).
func IsGroup(target string) bool { return strings.HasPrefix(strings.TrimSpace(target), GroupPrefix) }

// ErrUnknownGroup is wrapped by Expand's error for a group that selects
// nothing the inventory knows.
var ErrUnknownGroup = errors.New("unknown group")

// Expand returns the nodes of group, written with or without its @:
// all, controlplane, workers, or a label selector key=value.
func (s *Set) Expand(group string) ([]Node, error) {
	g := strings.TrimPrefix(strings.TrimSpace(group), GroupPrefix)
	var match func(Node) bool
	switch {
	case g == GroupAll:
		match = func(Node) bool { return true }
	case g == GroupControlPlane:
		match = func(n Node) bool { return n.Role == RoleControlPlane }
	case g == GroupWorkers:
		match = func(n Node) bool { return n.Role == RoleWorker }
	case strings.Contains(g, "=") && s != nil && s.labels[g]:
		k, v, _ := strings.Cut(g, "=")
		match = func(n Node) bool { return n.Labels[k] == v }
	default:
		return nil, fmt.Errorf("%w %s%s: known groups are %s", ErrUnknownGroup, GroupPrefix, g, s.KnownGroups())
	}
	var out []Node
	if s != nil {
		for _, n := range s.nodes {
			if match(n) {
				out = append(out, n)
			}
		}
	}
	return out, nil
}

// KnownGroups lists, comma-separated, the groups callers may name: the
// three fixed ones and the first label selectors (built with the Set).
func (s *Set) KnownGroups() string {
	if s == nil {
		return strings.Join((*Set)(nil).Groups(0), ", ")
	}
	return s.known
}

// Groups lists the groups callers may name, @-prefixed: the three fixed
// ones, then up to max label selectors in order (and how many more).
func (s *Set) Groups(max int) []string {
	out := []string{GroupPrefix + GroupAll, GroupPrefix + GroupControlPlane, GroupPrefix + GroupWorkers}
	if s == nil {
		return out
	}
	for i, l := range s.selectors {
		if i == max {
			out = append(out, fmt.Sprintf("and %d more label selectors", len(s.selectors)-max))
			break
		}
		out = append(out, GroupPrefix+l)
	}
	return out
}
