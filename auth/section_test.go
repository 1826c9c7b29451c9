package auth

import (
	"slices"
	"testing"
)

// TestLoosens: a policy that grants a role a method it did not have is
// reported, also when a dropped rule lets the method fall through to a
// broader pattern; one that grants no more is not.
func TestLoosens(t *testing.T) {
	pattern := Rule{Method: "/machine.MachineService/*", Roles: []string{"os:reader"}}
	exact := Rule{Method: "/machine.MachineService/Reset", Roles: []string{"os:operator"}}
	for _, tc := range []struct {
		name      string
		cur, next Config
		want      []string
	}{
		{"a rule dropped, its method now the pattern's", Config{Replace: true, Rules: []Rule{pattern, exact}}, Config{Replace: true, Rules: []Rule{pattern}}, []string{"policy"}},
		{"a rule added that grants no more", Config{Replace: true, Rules: []Rule{pattern}}, Config{Replace: true, Rules: []Rule{pattern, {Method: exact.Method, Roles: []string{"os:reader"}}}}, nil},
		{"a rule added that grants another role", Config{Replace: true, Rules: []Rule{pattern}}, Config{Replace: true, Rules: []Rule{pattern, exact}}, []string{"policy"}},
		{"a role granted", Config{}, Config{Rules: []Rule{{Method: "/machine.MachineService/Reboot", Roles: []string{"os:reader"}}}}, []string{"policy"}},
		{"the same", Config{}, Config{}, nil},
	} {
		if got := Loosens(tc.cur, tc.next); !slices.Equal(got, tc.want) {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
