package director

import (
	"fmt"
	"net"
	"strings"

	"github.com/apid/apid/inventory"
)

// ParseTarget checks one node target as a client wrote it: an IP address
// (IPv6 optionally in brackets) or a DNS name, without a port. It returns
// the target trimmed of surrounding spaces.
func ParseTarget(s string) (string, error) {
	t := strings.TrimSpace(s)
	switch {
	case t == "":
		return "", fmt.Errorf("empty node name")
	case len(t) > 253:
		return "", fmt.Errorf("node name %.32q… is longer than 253 bytes", t)
	}
	if strings.HasPrefix(t, "[") && strings.HasSuffix(t, "]") {
		if ip := net.ParseIP(t[1 : len(t)-1]); ip != nil && ip.To4() == nil {
			return t, nil
		}
		return "", fmt.Errorf("node %q: brackets hold no IPv6 address", t)
	}
	if net.ParseIP(t) != nil {
		return t, nil
	}
	if _, _, err := net.SplitHostPort(t); err == nil {
		return "", fmt.Errorf("node %q: a node is named without a port", t)
	}
	if !inventory.ValidDNSName(t) {
		return "", fmt.Errorf("node %q is neither an IP address nor a DNS name", t)
	}
	return t, nil
}

// parseItem is ParseTarget that also lets groups (@controlplane) through,
// for the router to expand.
func parseItem(s string) (string, error) {
	t := strings.TrimSpace(s)
	if !inventory.IsGroup(t) {
		return ParseTarget(t)
	}
	if len(t) < 2 || len(t) > 253 || strings.ContainsAny(t[1:], "@ \t") {
		return "", fmt.Errorf("group %.64q: want @ and a group name such as @controlplane or @zone=eu-1", t)
	}
	return t, nil
}

// ParseTargets parses the values of a nodes header: node names, addresses
// and groups (@...), which the router expands. Each value may itself
// hold a comma-separated list (as people type it into grpcurl). Duplicates
// are collapsed, keeping the first occurrence's place; more than max
// distinct nodes is an error.
func ParseTargets(values []string, max int) ([]string, error) {
	var out []string
	seen := make(map[string]struct{}, len(values))
	for _, v := range values {
		for _, item := range strings.Split(v, ",") {
			t, err := parseItem(item)
			if err != nil {
				return nil, err
			}
			key := canonical(t)
			if _, dup := seen[key]; dup {
				continue
			}
			if len(out) == max {
				return nil, fmt.Errorf("more than %d nodes in one request", max)
			}
			seen[key] = struct{}{}
			out = append(out, t)
		}
	}
	if len(out) == 0 {
		return nil, fmt.Errorf("empty node list")
	}
	return out, nil
}

// Canonical is the one spelling of a node name or address (lower case, IPv6
// compressed, IPv4-mapped unmapped, no brackets) under which the pool,
// ejection and apid's node statistics know it: the inventory's Key, so a
// node is one whichever way it is named.
func Canonical(t string) string { return inventory.Key(t) }

func canonical(t string) string { return inventory.Key(t) }
