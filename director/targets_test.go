package director

import (
	"net"
	"slices"
	"strings"
	"testing"
)

func TestParseTarget(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		ok       bool
	}{
		{"10.0.0.1", "10.0.0.1", true},
		{" node-1.example.com ", "node-1.example.com", true},
		{"[fd00::1]", "[fd00::1]", true},
		{"fd00::1", "fd00::1", true},
		{"", "", false},
		{"   ", "", false},
		{"10.0.0.1:50000", "", false},
		{"node:50000", "", false},
		{"[10.0.0.1]", "", false},
		{"bad host", "", false},
		{"-lead.example", "", false},
		{"a..b", "", false},
		{"evil/path", "", false},
		{strings.Repeat("a", 254), "", false},
	} {
		got, err := ParseTarget(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseTarget(%q) = %q, %v; want %q, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

func TestParseTargets(t *testing.T) {
	got, err := ParseTargets([]string{"a", "b, c", "a", "c"}, 10)
	if err != nil || !slices.Equal(got, []string{"a", "b", "c"}) {
		t.Fatalf("got %v, %v", got, err)
	}
	got, err = ParseTargets([]string{"10.0.0.1", "::ffff:10.0.0.1", "::FFFF:a00:1", "Node-1", "node-1"}, 10)
	if err != nil || !slices.Equal(got, []string{"10.0.0.1", "Node-1"}) {
		t.Fatalf("spellings of one node not collapsed: %v, %v", got, err)
	}
	if _, err := ParseTargets([]string{"a,b,c"}, 2); err == nil {
		t.Fatal("3 nodes with a limit of 2 accepted")
	}
	if got, err := ParseTargets([]string{"a,a,a"}, 1); err != nil || len(got) != 1 {
		t.Fatalf("duplicates counted against the limit: %v, %v", got, err)
	}
	for _, bad := range [][]string{{""}, {"a,"}, {"a", ""}, {"x:1"}} {
		if _, err := ParseTargets(bad, 10); err == nil {
			t.Errorf("ParseTargets(%q) accepted", bad)
		}
	}
}

func FuzzParseTargets(f *testing.F) {
	for _, s := range []string{"a,b", "10.0.0.1", "[::1]", "x:1", ",,,", "a, a", "\x00", "ü.example", "@controlplane,a", "@zone=eu-1", "@"} {
		f.Add(s, 3)
	}
	f.Fuzz(func(t *testing.T, v string, max int) {
		if max < 1 || max > 100 {
			max = 3
		}
		got, err := ParseTargets([]string{v}, max)
		if err != nil {
			return
		}
		if len(got) == 0 || len(got) > max {
			t.Fatalf("%d targets for limit %d", len(got), max)
		}
		seen := map[string]bool{}
		for _, g := range got {
			if seen[g] {
				t.Fatalf("duplicate %q", g)
			}
			seen[g] = true
			if again, err := parseItem(g); err != nil || again != g {
				t.Fatalf("target %q does not parse to itself: %q, %v", g, again, err)
			}
			if strings.ContainsAny(g, ", /\x00") {
				t.Fatalf("target %q holds a separator", g)
			}
		}
	})
}

func TestDialAddress(t *testing.T) {
	for in, want := range map[string]string{"10.0.0.1": "10.0.0.1:50000", "[fd00::1]": "[fd00::1]:50000", "fd00::1": "[fd00::1]:50000", "n1": "n1:50000"} {
		if got := net.JoinHostPort(DestOf(in).Host, "50000"); got != want {
			t.Errorf("address of %q = %q, want %q", in, got, want)
		}
	}
}
