package disruption

import (
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/apid/apid/inventory"
)

// Config is the disruption section of apid's configuration: how many nodes
// of each group may be down at once because a caller asked. Every key
// applies live; a reload changes what held calls wait for.
type Config struct {
	// Enabled turns the budget on (the default). false lets every
	// disruptive call through at once, as Talos does.
	Enabled bool `yaml:"enabled" reload:"live"`
	// MaxUnavailable bounds, per inventory group (controlplane, workers,
	// or a label selector key=value), the nodes unavailable at once: a
	// count or a percentage of the group's nodes (rounded up). Defaults:
	// controlplane 1, workers 1. A node in no group listed here is its own
	// group of one. The groups given are added to the defaults; write
	// "100%" to lift one.
	MaxUnavailable map[string]Amount `yaml:"maxUnavailable" reload:"live"`
	// MaxWait bounds how long a call is held (also bounded by its own
	// deadline). Default 30m.
	MaxWait time.Duration `yaml:"maxWait" reload:"live"`
	// MaxHeldPerIdentity bounds the calls one client certificate subject
	// has held at once. Default 16.
	MaxHeldPerIdentity int `yaml:"maxHeldPerIdentity" reload:"live"`
	// ProbeInterval is how often a node taken down is asked whether it is
	// back (its boot, its services, its etcd member). Default 1s.
	ProbeInterval time.Duration `yaml:"probeInterval" reload:"live"`
	// Etcd shares the budget between every gateway of the cluster through
	// leases in its etcd; without it, the budget is this gateway's own.
	Etcd EtcdConfig `yaml:"etcd" reload:"restart"`
}

// Amount is a count of nodes, or a percentage of a group's nodes.
type Amount struct {
	N       int
	Percent bool
}

// Of returns the count a of a group of n nodes allows: a percentage is
// rounded up, as Kubernetes rounds a PodDisruptionBudget's maxUnavailable.
func (a Amount) Of(n int) int {
	if !a.Percent {
		return a.N
	}
	return int(math.Ceil(float64(n) * float64(a.N) / 100))
}

func (a Amount) String() string {
	if a.Percent {
		return strconv.Itoa(a.N) + "%"
	}
	return strconv.Itoa(a.N)
}

// more reports whether a admits more than b in a group of n nodes.
func (a Amount) more(b Amount, n int) bool { return a.Of(n) > b.Of(n) }

// ParseAmount reads "2" or "25%".
func ParseAmount(s string) (Amount, error) {
	s = strings.TrimSpace(s)
	v, pct := strings.CutSuffix(s, "%")
	n, err := strconv.Atoi(strings.TrimSpace(v))
	switch {
	case err != nil:
		return Amount{}, fmt.Errorf("%q: want a count of nodes (1) or a percentage (25%%)", s)
	case n < 0:
		return Amount{}, fmt.Errorf("%q: must not be negative", s)
	case pct && n > 100:
		return Amount{}, fmt.Errorf("%q: a percentage is at most 100%%", s)
	}
	return Amount{N: n, Percent: pct}, nil
}

// UnmarshalYAML reads a count (1) or a percentage ("25%").
func (a *Amount) UnmarshalYAML(n *yaml.Node) error {
	if n.Kind != yaml.ScalarNode {
		return fmt.Errorf("line %d: want a count of nodes (1) or a percentage (25%%)", n.Line)
	}
	v, err := ParseAmount(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*a = v
	return nil
}

// MarshalYAML writes what UnmarshalYAML reads.
func (a Amount) MarshalYAML() (any, error) {
	if a.Percent {
		return a.String(), nil
	}
	return a.N, nil
}

// DefaultConfig returns the section with every default filled in.
func DefaultConfig() Config {
	return Config{
		Enabled: true,
		MaxUnavailable: map[string]Amount{
			inventory.GroupControlPlane: {N: 1},
			inventory.GroupWorkers:      {N: 1},
		},
		MaxWait:            30 * time.Minute,
		MaxHeldPerIdentity: 16,
		ProbeInterval:      time.Second,
	}
}

// Validate lists every bad key of the section, each by its full path.
func (c Config) Validate() error {
	var errs []error
	for _, g := range slices.Sorted(maps.Keys(c.MaxUnavailable)) {
		name := strings.TrimPrefix(g, inventory.GroupPrefix)
		switch {
		case name == inventory.GroupControlPlane, name == inventory.GroupWorkers:
		case name == inventory.GroupAll:
		case strings.Count(name, "=") == 1 && !strings.HasPrefix(name, "=") && !strings.HasSuffix(name, "="):
		default:
			errs = append(errs, fmt.Errorf("disruption.maxUnavailable.%s: not a group: want controlplane, workers, all or a label selector key=value", g))
		}
	}
	if c.MaxWait <= 0 {
		errs = append(errs, fmt.Errorf("disruption.maxWait %s: must be positive", c.MaxWait))
	}
	if c.MaxHeldPerIdentity <= 0 {
		errs = append(errs, fmt.Errorf("disruption.maxHeldPerIdentity %d: must be positive", c.MaxHeldPerIdentity))
	}
	if c.ProbeInterval < 100*time.Millisecond || c.ProbeInterval > time.Minute {
		errs = append(errs, fmt.Errorf("disruption.probeInterval %s: want 100ms to 1m", c.ProbeInterval))
	}
	errs = append(errs, c.Etcd.validate()...)
	return errors.Join(errs...)
}

// group is one budget: a group's name and what it allows.
type group struct {
	name string // as configured, without @
	max  Amount
}

// groups returns the configured budgets, in a stable order.
func (c Config) groups() []group {
	out := make([]group, 0, len(c.MaxUnavailable))
	for _, g := range slices.Sorted(maps.Keys(c.MaxUnavailable)) {
		out = append(out, group{name: strings.TrimPrefix(g, inventory.GroupPrefix), max: c.MaxUnavailable[g]})
	}
	return out
}

// Loosens lists the keys of next that let more nodes down at once, or
// hold calls longer, than cur: the budget turned off, a group's bound
// raised or dropped (measured on a group of 100 nodes for percentages),
// a longer wait, more held calls.
func Loosens(cur, next Config) []string {
	var keys []string
	if cur.Enabled && !next.Enabled {
		keys = append(keys, "disruption.enabled")
	}
	for _, g := range slices.Sorted(maps.Keys(cur.MaxUnavailable)) {
		n, ok := next.MaxUnavailable[g]
		if !ok || n.more(cur.MaxUnavailable[g], 100) || n.more(cur.MaxUnavailable[g], 3) {
			keys = append(keys, "disruption.maxUnavailable."+g)
		}
	}
	if next.MaxWait > cur.MaxWait {
		keys = append(keys, "disruption.maxWait")
	}
	if next.MaxHeldPerIdentity > cur.MaxHeldPerIdentity {
		keys = append(keys, "disruption.maxHeldPerIdentity")
	}
	return keys
}
