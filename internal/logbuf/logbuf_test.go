package logbuf

import (
	"bytes"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"
)

// recorder keeps every write it is given, whole.
type recorder struct {
	mu     sync.Mutex
	writes []string
	fail   error
}

func (r *recorder) Write(p []byte) (int, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.writes = append(r.writes, string(p))
	return len(p), r.fail
}

func (r *recorder) got() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.writes...)
}

func TestLinesGoOutTogether(t *testing.T) {
	r := &recorder{}
	w := New(r, time.Hour, 1<<10)
	for i := range 3 {
		if n, err := fmt.Fprintf(w, "line %d\n", i); err != nil || n != 7 {
			t.Fatalf("write: %d, %v", n, err)
		}
	}
	if got := r.got(); len(got) != 0 {
		t.Fatalf("written before the interval or a flush: %q", got)
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := r.got(); len(got) != 1 || got[0] != "line 0\nline 1\nline 2\n" {
		t.Fatalf("one flush gave %q", got)
	}
	if err := w.Flush(); err != nil || len(r.got()) != 1 {
		t.Fatalf("an empty flush wrote: %q, %v", r.got(), err)
	}
}

func TestHeldLinesGoOutAfterTheInterval(t *testing.T) {
	r := &recorder{}
	w := New(r, 10*time.Millisecond, 1<<10)
	defer w.Close()
	for round := range 3 { // the timer re-arms after each flush
		line := fmt.Sprintf("round %d\n", round)
		_, _ = w.Write([]byte(line))
		deadline := time.Now().Add(10 * time.Second)
		for !strings.Contains(strings.Join(r.got(), ""), line) {
			if time.Now().After(deadline) {
				t.Fatalf("round %d: a held line was not written within 10 s (interval 10 ms): %q", round, r.got())
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

func TestAFullBufferGoesOutAtOnce(t *testing.T) {
	r := &recorder{}
	w := New(r, time.Hour, 16)
	_, _ = w.Write([]byte("0123456789\n"))
	_, _ = w.Write([]byte("abcdefghij\n")) // would pass 16: the first goes out
	if got := r.got(); len(got) != 1 || got[0] != "0123456789\n" {
		t.Fatalf("after passing max: %q", got)
	}
	long := strings.Repeat("x", 40) + "\n"
	_, _ = w.Write([]byte(long)) // longer than max: out at once, after what was held
	if got := r.got(); len(got) != 3 || got[1] != "abcdefghij\n" || got[2] != long {
		t.Fatalf("a line longer than max: %q", got)
	}
}

func TestCloseWritesWhatIsHeldAndLaterLinesPassStraight(t *testing.T) {
	r := &recorder{}
	w := New(r, time.Hour, 1<<10)
	_, _ = w.Write([]byte("held\n"))
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	_, _ = w.Write([]byte("late\n"))
	if got := r.got(); len(got) != 2 || got[0] != "held\n" || got[1] != "late\n" {
		t.Fatalf("close and after: %q", got)
	}
}

func TestErrorsAreReportedByFlush(t *testing.T) {
	r := &recorder{fail: errors.New("disk full")}
	w := New(r, time.Hour, 1<<10)
	if _, err := w.Write([]byte("a\n")); err != nil {
		t.Fatalf("a held write failed: %v", err)
	}
	if err := w.Flush(); err == nil || err.Error() != "disk full" {
		t.Fatalf("flush: %v, want the writer's error", err)
	}
	r.fail = nil
	_, _ = w.Write([]byte("b\n"))
	if err := w.Close(); err != nil {
		t.Fatalf("an error was reported twice: %v", err)
	}
}

// TestConcurrentLinesStayWhole: many writers, every line out once and
// never split, whatever the flushes in between.
func TestConcurrentLinesStayWhole(t *testing.T) {
	r := &recorder{}
	w := New(r, time.Millisecond, 256)
	const writers, lines = 8, 500
	var wg sync.WaitGroup
	for g := range writers {
		wg.Go(func() {
			for i := range lines {
				fmt.Fprintf(w, "writer %d line %03d\n", g, i)
			}
		})
	}
	wg.Wait()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	var all bytes.Buffer
	for _, s := range r.got() {
		if !strings.HasSuffix(s, "\n") {
			t.Fatalf("a write ends mid-line: %q", s)
		}
		all.WriteString(s)
	}
	seen := map[string]bool{}
	for _, l := range strings.Split(strings.TrimSuffix(all.String(), "\n"), "\n") {
		if seen[l] || !strings.HasPrefix(l, "writer ") || len(l) != len("writer 0 line 000") {
			t.Fatalf("line %q duplicated or mangled", l)
		}
		seen[l] = true
	}
	if len(seen) != writers*lines {
		t.Fatalf("%d lines out, want %d", len(seen), writers*lines)
	}
}
