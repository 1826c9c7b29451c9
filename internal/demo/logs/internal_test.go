package logs

import (
	"strings"
	"testing"
	"time"
)

func TestFormatKmsgRecord(t *testing.T) {
	boot := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, tc := range []struct {
		rec  string
		boot time.Time
		want string
	}{
		{"6,1,1500000,-;Linux version 6.1\n", boot, "kern:    info: [2026-01-02T03:04:06.5Z]: Linux version 6.1\n"},
		{"30,2,0,-;systemd: hello\n SUBSYSTEM=x\n", time.Time{}, "daemon:    info: [+0.000000s]: systemd: hello\n"},
		{"131,3,12,c,more;local0 crit", time.Time{}, "local0:     err: [+0.000012s]: local0 crit\n"},
		{"1001,4,5,-;odd facility\n", time.Time{}, "125:   alert: [+0.000005s]: odd facility\n"},
	} {
		got, ok := formatKmsgRecord([]byte(tc.rec), tc.boot)
		if !ok || got != tc.want {
			t.Errorf("formatKmsgRecord(%q) = %q, %v; want %q", tc.rec, got, ok, tc.want)
		}
	}
	for _, bad := range []string{"", "no header", "6,1;short header", "x,1,2,-;bad prio", "6,1,-2,-;bad time"} {
		if got, ok := formatKmsgRecord([]byte(bad), boot); ok {
			t.Errorf("formatKmsgRecord(%q) = %q, want rejection", bad, got)
		}
	}
}

func FuzzFormatKmsgRecord(f *testing.F) {
	f.Add([]byte("6,1,1500000,-;Linux version\n KEY=v\n"))
	f.Add([]byte("4294967295,0,9223372036854775807,-;max\n"))
	f.Fuzz(func(t *testing.T, rec []byte) {
		for _, boot := range []time.Time{{}, time.Unix(1e9, 0)} {
			if line, ok := formatKmsgRecord(rec, boot); ok && strings.Count(line, "\n") != 1 {
				t.Fatalf("line %q is not exactly one line", line)
			}
		}
	})
}

func TestLogRing(t *testing.T) {
	r := NewLines(3)
	if got := r.TailStart(-1); got != 0 {
		t.Fatalf("empty tailStart = %d", got)
	}
	_, _, _, changed := r.Since(0)
	if _, err := r.Write([]byte("a\nb\n")); err != nil {
		t.Fatal(err)
	}
	select {
	case <-changed:
	default:
		t.Fatal("append did not wake readers")
	}
	for _, l := range []string{"c", "d", "e"} {
		_, _ = r.Write([]byte(l + "\n"))
	}
	lines, next, dropped, _ := r.Since(0)
	if strings.Join(lines, "") != "cde" || next != 5 || dropped != 2 {
		t.Errorf("since(0) = %q, %d, %d", lines, next, dropped)
	}
	for _, tc := range []struct {
		n    int32
		want uint64
	}{{-1, 2}, {0, 5}, {1, 4}, {3, 2}, {10, 2}} {
		if got := r.TailStart(tc.n); got != tc.want {
			t.Errorf("tailStart(%d) = %d, want %d", tc.n, got, tc.want)
		}
	}
	if lines, _, _, _ := r.Since(5); len(lines) != 0 {
		t.Errorf("since(next) = %q", lines)
	}
}
