package auth

import (
	"slices"

	"github.com/prometheus/client_golang/prometheus"
)

// Apply makes calls that start from now on checked against the policy cfg
// describes (already validated).
func (a *Authorizer) Apply(cfg Config) error {
	p, err := cfg.Policy()
	if err != nil {
		return err
	}
	a.SetPolicy(p)
	return nil
}

// Loosens lists what in next would let some role call a method the policy
// enforced now does not let it call: a rule that grants a method to a role
// the current policy does not allow it to.
func (a *Authorizer) Loosens(next Config) []string { return loosens(a.Policy(), next) }

// Loosens lists what in next grants a role more than cur does.
func Loosens(cur, next Config) []string {
	cp, err := cur.Policy()
	if err != nil {
		return nil
	}
	return loosens(cp, next)
}

func loosens(cur *Policy, next Config) []string {
	np, err := next.Policy()
	if err != nil {
		return nil
	}
	// Every method either policy names: a rule dropped from next can let
	// its method fall through to a broader pattern that grants more.
	methods := map[string]bool{}
	for _, p := range []*Policy{cur, np} {
		for m := range p.exact {
			methods[m] = true
		}
		for _, r := range p.patterns {
			methods[r.Method] = true
		}
	}
	for m := range methods {
		for _, role := range np.Allowed(m) {
			if !slices.Contains(cur.Allowed(m), role) {
				return []string{"policy"}
			}
		}
	}
	return nil
}

// Describe implements prometheus.Collector: the policy exports no series
// of its own (refusals are counted by status code with every call).
func (a *Authorizer) Describe(chan<- *prometheus.Desc) {}

// Collect implements prometheus.Collector.
func (a *Authorizer) Collect(chan<- prometheus.Metric) {}

// Close ends nothing: the policy holds no goroutine.
func (a *Authorizer) Close() error { return nil }
