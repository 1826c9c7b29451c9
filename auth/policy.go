package auth

import (
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"

	"github.com/apid/apid/certs"
)

// Rule allows the listed roles to call the methods it matches. Method is a
// full method name (/package.Service/Method) or a pattern ending in "*"
// that matches every method starting with what precedes it
// (/machine.MachineService/*).
type Rule struct {
	Method string   `yaml:"method"`
	Roles  []string `yaml:"roles"`
}

// Policy decides which roles may call which methods. os:admin may call
// everything; a method no rule matches is admin-only.
type Policy struct {
	exact    map[string][]string
	patterns []Rule // longest prefix first
	known    map[string]bool
}

// The methods of the Talos API grouped by who may call them, after the
// reference's authorization table: read-only calls that expose no secrets,
// operational calls that expose none either, and etcd backup calls.
var (
	readOnlyMethods = []string{
		"/cluster.ClusterService/HealthCheck",
		"/inspect.InspectService/ControllerRuntimeDependencies",
		"/machine.MachineService/CPUFreqStats",
		"/machine.MachineService/CPUInfo",
		"/machine.MachineService/Containers",
		"/machine.MachineService/DiskStats",
		"/machine.MachineService/DiskUsage",
		"/machine.MachineService/Dmesg",
		"/machine.MachineService/EtcdAlarmList",
		"/machine.MachineService/EtcdMemberList",
		"/machine.MachineService/EtcdStatus",
		"/machine.MachineService/Events",
		"/machine.MachineService/Hostname",
		"/machine.MachineService/ImageList",
		"/machine.MachineService/List",
		"/machine.MachineService/LoadAvg",
		"/machine.MachineService/Logs",
		"/machine.MachineService/LogsContainers",
		"/machine.MachineService/Memory",
		"/machine.MachineService/Mounts",
		"/machine.MachineService/NetworkDeviceStats",
		"/machine.MachineService/Netstat",
		"/machine.MachineService/Processes",
		"/machine.MachineService/ServiceList",
		"/machine.MachineService/Stats",
		"/machine.MachineService/SystemStat",
		"/machine.MachineService/Version",
		"/machine.ImageService/List",
		"/machine.ImageService/Verify",
		"/cosi.resource.State/Get",
		"/cosi.resource.State/List",
		"/cosi.resource.State/Watch",
		"/storage.StorageService/Disks",
		"/time.TimeService/Time",
		"/time.TimeService/TimeCheck",
		"/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
		"/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
	}
	operationalMethods = []string{
		"/machine.MachineService/EtcdAlarmDisarm",
		"/machine.MachineService/EtcdDefragment",
		"/machine.MachineService/EtcdSnapshot",
		"/machine.MachineService/ImagePull",
		"/machine.ImageService/Pull",
		"/machine.MachineService/PacketCapture",
		"/machine.MachineService/Reboot",
		"/machine.MachineService/Restart",
		"/machine.MachineService/ServiceRestart",
		"/machine.MachineService/ServiceStart",
		"/machine.MachineService/ServiceStop",
		"/machine.MachineService/Shutdown",
	}
	etcdBackupMethods = []string{
		"/machine.MachineService/EtcdAlarmList",
		"/machine.MachineService/EtcdMemberList",
		"/machine.MachineService/EtcdSnapshot",
		"/machine.MachineService/EtcdStatus",
	}
)

// DefaultRules returns the built-in policy: os:reader may make read-only
// calls that expose no secrets; os:operator those and operational calls
// (reboot, service restarts, etcd maintenance); os:etcd:backup read-only
// calls plus etcd snapshots. Everything else is admin-only.
func DefaultRules() []Rule {
	roles := map[string][]string{}
	add := func(methods []string, rs ...string) {
		for _, m := range methods {
			for _, r := range rs {
				if !slices.Contains(roles[m], r) {
					roles[m] = append(roles[m], r)
				}
			}
		}
	}
	add(readOnlyMethods, certs.RoleReader, certs.RoleOperator, certs.RoleEtcdBackup)
	add(operationalMethods, certs.RoleOperator)
	add(etcdBackupMethods, certs.RoleEtcdBackup)
	rules := make([]Rule, 0, len(roles))
	for m, rs := range roles {
		rules = append(rules, Rule{Method: m, Roles: rs})
	}
	sort.Slice(rules, func(i, j int) bool { return rules[i].Method < rules[j].Method })
	return rules
}

// NewPolicy builds a policy from the default rules (unless replace) with
// rules laid over them: a rule for a method or pattern replaces the one
// before it for the same method or pattern.
func NewPolicy(rules []Rule, replace bool) (*Policy, error) {
	p := &Policy{exact: map[string][]string{}, known: map[string]bool{}}
	for _, r := range certs.BuiltinRoles {
		p.known[r] = true
	}
	all := rules
	if !replace {
		all = append(DefaultRules(), rules...)
	}
	patterns := map[string][]string{}
	var errs []error
	offset := len(all) - len(rules) // the caller's rules come last
	for i, r := range all {
		key := fmt.Sprintf("policy.rules[%d]", i-offset)
		if len(r.Roles) == 0 {
			errs = append(errs, fmt.Errorf("%s.roles: rule %q lists no roles", key, r.Method))
			continue
		}
		for _, role := range r.Roles {
			p.known[role] = true
		}
		switch {
		case strings.HasSuffix(r.Method, "*") && strings.HasPrefix(r.Method, "/"):
			patterns[strings.TrimSuffix(r.Method, "*")] = slices.Clone(r.Roles)
		case ValidMethod(r.Method):
			p.exact[r.Method] = slices.Clone(r.Roles)
		default:
			errs = append(errs, fmt.Errorf("%s.method %q: want /package.Service/Method or a pattern ending in *", key, r.Method))
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	for prefix, roles := range patterns {
		p.patterns = append(p.patterns, Rule{Method: prefix, Roles: roles})
	}
	sort.Slice(p.patterns, func(i, j int) bool { return len(p.patterns[i].Method) > len(p.patterns[j].Method) })
	return p, nil
}

// Allowed returns the roles that may call method, os:admin always among
// them.
func (p *Policy) Allowed(method string) []string {
	if roles, ok := p.exact[method]; ok {
		return append([]string{certs.RoleAdmin}, roles...)
	}
	for _, r := range p.patterns {
		if strings.HasPrefix(method, r.Method) {
			return append([]string{certs.RoleAdmin}, r.Roles...)
		}
	}
	return []string{certs.RoleAdmin}
}

// HasRule reports whether method is named by a rule of its own (not only
// matched by a pattern or the admin-only fallback). Metrics use it to keep
// caller-chosen method names out of their labels.
func (p *Policy) HasRule(method string) bool {
	_, ok := p.exact[method]
	return ok
}

// Services returns, sorted, the services whose methods the policy names
// one by one ("machine.MachineService"): those apid reports in its health.
func (p *Policy) Services() []string {
	var out []string
	for m := range p.exact {
		if svc, _, ok := strings.Cut(strings.TrimPrefix(m, "/"), "/"); ok && !slices.Contains(out, svc) {
			out = append(out, svc)
		}
	}
	slices.Sort(out)
	return out
}

// Permits reports whether a caller holding roles may call method.
func (p *Policy) Permits(method string, roles []string) bool {
	if slices.Contains(roles, certs.RoleAdmin) {
		return true
	}
	allowed := p.Allowed(method)
	for _, r := range roles {
		if slices.Contains(allowed, r) {
			return true
		}
	}
	return false
}

// Known splits roles into those the policy knows and those it does not;
// unknown roles grant nothing and are not forwarded.
func (p *Policy) Known(roles []string) (known, unknown []string) {
	for _, r := range roles {
		if p.known[r] {
			known = append(known, r)
		} else {
			unknown = append(unknown, r)
		}
	}
	return known, unknown
}

// ValidMethod reports whether m is a canonical gRPC method path:
// "/" service "/" method, both non-empty, nothing else.
func ValidMethod(m string) bool {
	if len(m) < 4 || m[0] != '/' {
		return false
	}
	rest := m[1:]
	i := strings.IndexByte(rest, '/')
	return i > 0 && i < len(rest)-1 && strings.IndexByte(rest[i+1:], '/') < 0
}
