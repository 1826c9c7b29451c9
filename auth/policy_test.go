package auth

import (
	"github.com/apid/apid/certs"
	"slices"
	"strings"
	"testing"
)

// Methods the policy tests ask about, named once so a typo cannot make a
// case pass by asking about a method no rule knows.
const (
	mVersion        = "/machine.MachineService/Version"
	mHostname       = "/machine.MachineService/Hostname"
	mMemory         = "/machine.MachineService/Memory"
	mDmesg          = "/machine.MachineService/Dmesg"
	mLogs           = "/machine.MachineService/Logs"
	mEtcdMemberList = "/machine.MachineService/EtcdMemberList"
	mReboot         = "/machine.MachineService/Reboot"
	mRestart        = "/machine.MachineService/Restart"
	mServiceRestart = "/machine.MachineService/ServiceRestart"
	mEtcdSnapshot   = "/machine.MachineService/EtcdSnapshot"
	mRead           = "/machine.MachineService/Read"
	mCopy           = "/machine.MachineService/Copy"
	mEtcdRecover    = "/machine.MachineService/EtcdRecover"
	mKubeconfig     = "/machine.MachineService/Kubeconfig"
	mApplyConfig    = "/machine.MachineService/ApplyConfiguration"
	mReset          = "/machine.MachineService/Reset"
	mUnknown        = "/made.Up/Method"
	mReflection     = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
	mReflectionV1a  = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
)

var policyMethods = []string{
	mVersion, mHostname, mMemory, mDmesg, mLogs, mEtcdMemberList, mReboot, mRestart, mServiceRestart,
	mEtcdSnapshot, mRead, mCopy, mEtcdRecover, mKubeconfig, mApplyConfig, mReset, mUnknown, mReflection, mReflectionV1a,
}

// TestDefaultPolicy pins, role by role, which of policyMethods the built-in
// policy lets through. Every method not listed for a role must be denied,
// so a rule that grants too much fails here as surely as one that grants
// too little.
func TestDefaultPolicy(t *testing.T) {
	readOnly := []string{mVersion, mHostname, mMemory, mDmesg, mLogs, mEtcdMemberList, mReflection, mReflectionV1a}
	for _, tc := range []struct {
		name    string
		roles   []string
		allowed []string
	}{
		{"admin", []string{certs.RoleAdmin}, policyMethods},
		{"admin among unknown roles", []string{"team:ops", certs.RoleAdmin}, policyMethods},
		{"operator", []string{certs.RoleOperator}, append(slices.Clone(readOnly), mReboot, mRestart, mServiceRestart, mEtcdSnapshot)},
		{"reader", []string{certs.RoleReader}, readOnly},
		{"etcd backup", []string{certs.RoleEtcdBackup}, append(slices.Clone(readOnly), mEtcdSnapshot)},
		{"reader and etcd backup", []string{certs.RoleReader, certs.RoleEtcdBackup}, append(slices.Clone(readOnly), mEtcdSnapshot)},
		{"impersonator only", []string{certs.RoleImpersonator}, nil},
		{"image verifier only", []string{certs.RoleImageVerifier}, nil},
		{"meta writer only", []string{certs.RoleMetaWriter}, nil},
		{"unknown roles only", []string{"os:wizard", "OS:ADMIN", "os:admin "}, nil},
		{"empty role", []string{""}, nil},
		{"no roles", nil, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := NewPolicy(nil, false)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range policyMethods {
				want := slices.Contains(tc.allowed, m)
				if got := p.Permits(m, tc.roles); got != want {
					t.Errorf("Permits(%s, %q) = %v, want %v", m, tc.roles, got, want)
				}
			}
		})
	}
}

func TestDefaultRulesAreCanonical(t *testing.T) {
	seen := map[string]bool{}
	for _, r := range DefaultRules() {
		if !ValidMethod(r.Method) {
			t.Errorf("default rule for %q is not a canonical method path", r.Method)
		}
		if seen[r.Method] {
			t.Errorf("two default rules for %s", r.Method)
		}
		seen[r.Method] = true
		if len(r.Roles) == 0 {
			t.Errorf("default rule for %s grants no role", r.Method)
		}
		// os:admin needs no rule, and a catch-all among the defaults would
		// quietly open every method a future Talos release adds.
		if slices.Contains(r.Roles, certs.RoleAdmin) || strings.Contains(r.Method, "*") {
			t.Errorf("default rule %+v names os:admin or a pattern", r)
		}
	}
	for _, secret := range []string{mRead, mCopy, mEtcdRecover, mKubeconfig, mApplyConfig, mReset} {
		if seen[secret] {
			t.Errorf("%s has a default rule; it must stay admin-only", secret)
		}
	}
}

func TestAllowedNamesAdminFirst(t *testing.T) {
	p, err := NewPolicy(nil, false)
	if err != nil {
		t.Fatal(err)
	}
	got := p.Allowed(mReboot)
	if len(got) == 0 || got[0] != certs.RoleAdmin || !slices.Contains(got, certs.RoleOperator) || slices.Contains(got, certs.RoleReader) {
		t.Errorf("Allowed(Reboot) = %q, want os:admin first, os:operator, no os:reader", got)
	}
	if got := p.Allowed(mUnknown); !slices.Equal(got, []string{certs.RoleAdmin}) {
		t.Errorf("Allowed(unknown method) = %q, want only os:admin", got)
	}
	// Allowed must hand out copies: a caller appending to the result must
	// not widen the policy.
	got = p.Allowed(mVersion)
	_ = append(got[:1], "os:wizard")
	if p.Permits(mVersion, []string{"os:wizard"}) {
		t.Error("writing to the slice Allowed returned changed the policy")
	}
}

func TestPolicyPatterns(t *testing.T) {
	p, err := NewPolicy([]Rule{
		{Method: "/a.S/*", Roles: []string{"r:wide"}},
		{Method: "/a.S/Admin*", Roles: []string{"r:narrow"}},
		{Method: "/a.S/AdminExact", Roles: []string{"r:exact"}},
		{Method: "/b.*", Roles: []string{"r:b"}},
	}, true)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		method string
		role   string
		want   bool
	}{
		{"/a.S/Get", "r:wide", true},
		{"/a.S/Get", "r:narrow", false},
		// The longest pattern decides alone: the wider one's roles do
		// not add up with it.
		{"/a.S/AdminDelete", "r:narrow", true},
		{"/a.S/AdminDelete", "r:wide", false},
		// An exact rule beats every pattern.
		{"/a.S/AdminExact", "r:exact", true},
		{"/a.S/AdminExact", "r:narrow", false},
		{"/a.S/AdminExact", "r:wide", false},
		// A pattern is a plain prefix of the whole path.
		{"/b.Other/M", "r:b", true},
		{"/a.SX/Get", "r:wide", false},
		{"/c.S/Get", "r:wide", false},
		{"/c.S/Get", certs.RoleAdmin, true},
		// With replace, nothing of the built-in policy is left.
		{mVersion, certs.RoleReader, false},
		{mVersion, certs.RoleAdmin, true},
	} {
		if got := p.Permits(tc.method, []string{tc.role}); got != tc.want {
			t.Errorf("Permits(%s, %s) = %v, want %v", tc.method, tc.role, got, tc.want)
		}
	}
}

func TestPolicyExtendAndReplace(t *testing.T) {
	rebootForReaders := []Rule{{Method: mReboot, Roles: []string{certs.RoleReader}}}

	t.Run("extend", func(t *testing.T) {
		p, err := NewPolicy(rebootForReaders, false)
		if err != nil {
			t.Fatal(err)
		}
		check(t, p, mReboot, certs.RoleReader, true)
		// A rule for a method replaces the built-in one for it: the
		// operator, who had Reboot by default, no longer has it.
		check(t, p, mReboot, certs.RoleOperator, false)
		check(t, p, mVersion, certs.RoleReader, true)
		check(t, p, mRead, certs.RoleReader, false)
		check(t, p, mReboot, certs.RoleAdmin, true)
	})

	t.Run("replace", func(t *testing.T) {
		p, err := NewPolicy(rebootForReaders, true)
		if err != nil {
			t.Fatal(err)
		}
		check(t, p, mReboot, certs.RoleReader, true)
		check(t, p, mVersion, certs.RoleReader, false)
		check(t, p, mVersion, certs.RoleOperator, false)
		check(t, p, mVersion, certs.RoleAdmin, true)
	})

	t.Run("replace with nothing leaves admin only", func(t *testing.T) {
		p, err := NewPolicy(nil, true)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range policyMethods {
			check(t, p, m, certs.RoleAdmin, true)
			for _, r := range []string{certs.RoleOperator, certs.RoleReader, certs.RoleEtcdBackup} {
				check(t, p, m, r, false)
			}
		}
	})

	t.Run("a rule's roles become known", func(t *testing.T) {
		p, err := NewPolicy([]Rule{{Method: "/x.S/M", Roles: []string{"team:ops"}}}, false)
		if err != nil {
			t.Fatal(err)
		}
		known, unknown := p.Known([]string{"team:ops", "team:dev", certs.RoleReader})
		if !slices.Equal(known, []string{"team:ops", certs.RoleReader}) || !slices.Equal(unknown, []string{"team:dev"}) {
			t.Errorf("Known = %q, %q", known, unknown)
		}
		check(t, p, "/x.S/M", "team:ops", true)
		check(t, p, mVersion, "team:ops", false)
	})

	t.Run("rules are copied", func(t *testing.T) {
		rules := []Rule{{Method: mReboot, Roles: []string{certs.RoleReader}}}
		p, err := NewPolicy(rules, false)
		if err != nil {
			t.Fatal(err)
		}
		rules[0].Roles[0] = "os:wizard"
		check(t, p, mReboot, "os:wizard", false)
	})
}

func check(t *testing.T, p *Policy, method, role string, want bool) {
	t.Helper()
	if got := p.Permits(method, []string{role}); got != want {
		t.Errorf("Permits(%s, %s) = %v, want %v", method, role, got, want)
	}
}

func TestPolicyRejectsInvalidRules(t *testing.T) {
	for _, tc := range []struct {
		name string
		rule Rule
	}{
		{"no roles", Rule{Method: mVersion}},
		{"empty role list", Rule{Method: mVersion, Roles: []string{}}},
		{"no leading slash", Rule{Method: "machine.MachineService/Version", Roles: []string{certs.RoleReader}}},
		{"double leading slash", Rule{Method: "//machine.MachineService/Version", Roles: []string{certs.RoleReader}}},
		{"three segments", Rule{Method: "/machine.MachineService/Version/x", Roles: []string{certs.RoleReader}}},
		{"no method", Rule{Method: "/machine.MachineService/", Roles: []string{certs.RoleReader}}},
		{"no service", Rule{Method: "//Version", Roles: []string{certs.RoleReader}}},
		{"empty", Rule{Method: "", Roles: []string{certs.RoleReader}}},
		{"bare star", Rule{Method: "*", Roles: []string{certs.RoleReader}}},
		{"pattern without leading slash", Rule{Method: "machine.*", Roles: []string{certs.RoleReader}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for _, replace := range []bool{false, true} {
				p, err := NewPolicy([]Rule{tc.rule}, replace)
				if err == nil || p != nil {
					t.Fatalf("NewPolicy(%+v, replace=%v) = %v, %v; want an error", tc.rule, replace, p, err)
				}
				if !strings.Contains(err.Error(), tc.rule.Method) {
					t.Errorf("error %q does not name the rule %q", err, tc.rule.Method)
				}
			}
		})
	}

	// Every problem is reported at once, not only the first.
	_, err := NewPolicy([]Rule{
		{Method: "bad.One/M", Roles: []string{"r"}},
		{Method: "/good.S/M", Roles: []string{"r"}},
		{Method: "/bad.Two/M/x", Roles: []string{"r"}},
		{Method: "/no.Roles/M"},
	}, true)
	if err == nil {
		t.Fatal("invalid rules accepted")
	}
	for _, want := range []string{"bad.One/M", "/bad.Two/M/x", "/no.Roles/M"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q misses %q", err, want)
		}
	}
	if strings.Contains(err.Error(), "/good.S/M") {
		t.Errorf("error %q blames a valid rule", err)
	}
}

func TestValidMethod(t *testing.T) {
	for _, tc := range []struct {
		m  string
		ok bool
	}{
		{"/Svc/M", true},
		{"/machine.MachineService/Version", true},
		{mReflection, true},
		{"/a/b", true},
		{"Svc/M", false},
		{"//Svc/M", false},
		{"/Svc//M", false},
		{"/Svc/M/x", false},
		{"/Svc/M/", false},
		{"/Svc/", false},
		{"/Svc", false},
		{"/", false},
		{"//", false},
		{"///", false},
		{"", false},
		{"/a/", false},
	} {
		if got := ValidMethod(tc.m); got != tc.ok {
			t.Errorf("ValidMethod(%q) = %v, want %v", tc.m, got, tc.ok)
		}
	}
}

// FuzzPolicy builds a policy from a fuzzed rule laid over the defaults and
// asks it about a fuzzed method for fuzzed roles. Whatever the input:
// nothing panics, os:admin is always permitted, a caller with no roles (or
// only roles the policy does not know) never is, and a permitted caller
// holds one of the roles Allowed names.
func FuzzPolicy(f *testing.F) {
	for _, s := range []struct{ ruleMethod, ruleRoles, method, roles string }{
		{"/machine.MachineService/Reboot", "os:reader", "/machine.MachineService/Reboot", "os:reader"},
		{"/a.S/*", "team:ops", "/a.S/Anything", "team:ops,os:wizard"},
		{"/*", "os:reader", "//x", ""},
		{"Svc/M", "os:reader", "Svc/M", "os:admin"},
		{"/Svc/M", "", "/Svc/M/x", ","},
		{"*", "os:operator", "", "os:impersonator"},
		{"/machine.MachineService/Version", "os:etcd:backup,", "/machine.MachineService/Version", "os:etcd:backup"},
	} {
		f.Add(s.ruleMethod, s.ruleRoles, s.method, s.roles, false)
	}
	f.Fuzz(func(t *testing.T, ruleMethod, ruleRoles, method, roleList string, replace bool) {
		var rr []string
		if ruleRoles != "" {
			rr = strings.Split(ruleRoles, ",")
		}
		p, err := NewPolicy([]Rule{{Method: ruleMethod, Roles: rr}}, replace)
		if err != nil {
			if p != nil {
				t.Fatal("a policy returned with an error")
			}
			if p, err = NewPolicy(nil, replace); err != nil {
				t.Fatal(err)
			}
		}
		var roles []string
		if roleList != "" {
			roles = strings.Split(roleList, ",")
		}

		_ = ValidMethod(method)
		if !p.Permits(method, []string{certs.RoleAdmin}) {
			t.Fatalf("os:admin denied %q", method)
		}
		if !p.Permits(method, append(slices.Clone(roles), certs.RoleAdmin)) {
			t.Fatalf("os:admin with %q denied %q", roles, method)
		}
		if p.Permits(method, nil) || p.Permits(method, []string{}) {
			t.Fatalf("a caller without roles may call %q", method)
		}

		known, unknown := p.Known(roles)
		if len(known)+len(unknown) != len(roles) {
			t.Fatalf("Known(%q) = %q, %q: roles lost or invented", roles, known, unknown)
		}
		if len(known) == 0 && p.Permits(method, roles) {
			t.Fatalf("none of %q is known, yet %q is permitted", roles, method)
		}
		if p.Permits(method, known) != p.Permits(method, roles) && len(unknown) > 0 {
			// Unknown roles are never named by a rule, so dropping them
			// cannot change the answer.
			t.Fatalf("unknown roles %q changed the answer for %q", unknown, method)
		}

		allowed := p.Allowed(method)
		if len(allowed) == 0 || allowed[0] != certs.RoleAdmin {
			t.Fatalf("Allowed(%q) = %q, want os:admin first", method, allowed)
		}
		if p.Permits(method, roles) {
			ok := false
			for _, r := range roles {
				ok = ok || slices.Contains(allowed, r)
			}
			if !ok {
				t.Fatalf("%q permitted for %q, none of which is in Allowed = %q", method, roles, allowed)
			}
		}
		if ValidMethod(method) && (method[0] != '/' || strings.Count(method, "/") != 2 || strings.Contains(method, "//") || strings.HasSuffix(method, "/")) {
			t.Fatalf("validMethod accepted %q", method)
		}
	})
}
