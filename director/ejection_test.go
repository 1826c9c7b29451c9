package director

import (
	"context"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testkit"
)

// clock is a time the test moves by hand.
type clock struct{ t time.Time }

func (c *clock) now() time.Time { return c.t }

func TestEjectionLifecycle(t *testing.T) {
	c := &clock{t: time.Unix(1_000_000, 0)}
	var events []string
	e := newEjector(func(x Ejection, ejected bool) {
		if ejected {
			events = append(events, "ejected")
		} else {
			events = append(events, "restored")
		}
	})
	e.now = c.now
	e.setConfig(EjectionConfig{ConsecutiveFailures: 3, BaseTime: 5 * time.Second, MaxTime: 15 * time.Second, MaxPercent: 50})

	// Answers, even errors of the node's own, do not count.
	e.report(Dest{Node: "n"}, codes.Unavailable, "refused")
	e.report(Dest{Node: "n"}, codes.NotFound, "no such file")
	e.report(Dest{Node: "n"}, codes.Unavailable, "refused")
	e.report(Dest{Node: "n"}, codes.Canceled, "caller left")
	e.report(Dest{Node: "n"}, codes.DeadlineExceeded, "slow")
	if _, ej := e.ejected(Dest{Node: "n"}); ej {
		t.Fatal("ejected after 2 failures in a row")
	}
	e.report(Dest{Node: "n"}, codes.Unavailable, "connection refused")
	x, ej := e.ejected(Dest{Node: "n"})
	if !ej || x.Failures != 3 || !strings.Contains(x.LastError, "connection refused") {
		t.Fatalf("after 3 failures in a row: %+v, %v", x, ej)
	}
	if err := refusal(x, c.now()); !strings.Contains(err.Error(), "ejected since") || !strings.Contains(err.Error(), "tried again in") {
		t.Fatalf("refusal: %v", err)
	}
	first := x.Until.Sub(c.now())
	if first < 5*time.Second || first > 5500*time.Millisecond {
		t.Fatalf("first ejection lasts %s, want 5 s plus at most 10 %%", first)
	}

	// Time up: one probe goes through, a second caller meanwhile does not.
	c.t = x.Until
	if _, ej := e.ejected(Dest{Node: "n"}); ej {
		t.Fatal("no probe let through once the ejection is over")
	}
	if _, ej := e.ejected(Dest{Node: "n"}); !ej {
		t.Fatal("a second call went through while the probe runs")
	}
	// The probe fails: ejected again, twice as long.
	e.report(Dest{Node: "n"}, codes.Unavailable, "still refused")
	x, _ = e.ejected(Dest{Node: "n"})
	if d := x.Until.Sub(c.now()); d < 10*time.Second || d > 11*time.Second {
		t.Fatalf("second ejection lasts %s, want 10 s plus jitter", d)
	}
	// And again: capped at MaxTime.
	c.t = x.Until
	e.ejected(Dest{Node: "n"})
	e.report(Dest{Node: "n"}, codes.DeadlineExceeded, "timeout")
	x, _ = e.ejected(Dest{Node: "n"})
	if d := x.Until.Sub(c.now()); d < 15*time.Second || d > 16500*time.Millisecond {
		t.Fatalf("third ejection lasts %s, want the 15 s cap plus jitter", d)
	}
	// The probe succeeds: restored and forgotten.
	c.t = x.Until
	e.ejected(Dest{Node: "n"})
	e.report(Dest{Node: "n"}, codes.OK, "")
	if _, ej := e.ejected(Dest{Node: "n"}); ej || len(e.snapshot()) != 0 || len(e.nodes) != 0 {
		t.Fatalf("not restored: %v", e.snapshot())
	}
	if got := strings.Join(events, ","); got != "ejected,ejected,ejected,restored" {
		t.Fatalf("notifications %s", got)
	}

	// Off: failures never eject.
	e.setConfig(EjectionConfig{ConsecutiveFailures: 0, BaseTime: time.Second, MaxTime: time.Second})
	for range 10 {
		e.report(Dest{Node: "m"}, codes.Unavailable, "x")
	}
	if _, ej := e.ejected(Dest{Node: "m"}); ej {
		t.Fatal("ejected with ejection off")
	}
}

// TestCallersDeadlinesEjectNobody: a deadline the caller chose (its own, or
// a node timeout it shortened) says nothing about the node; apid's own node
// timeout does.
func TestCallersDeadlinesEjectNobody(t *testing.T) {
	e := newEjector(nil)
	e.setConfig(EjectionConfig{ConsecutiveFailures: 3, BaseTime: time.Minute, MaxTime: time.Minute, MaxPercent: 50})
	callers := &Remote{name: "10.0.0.9", dest: DestOf("10.0.0.9"), ej: e}
	for range 10 {
		callers.Report(codes.DeadlineExceeded, "context deadline exceeded")
	}
	if e.peek(DestOf("10.0.0.9")) {
		t.Fatal("a caller's deadlines ejected the node")
	}
	own := &Remote{name: "10.0.0.9", dest: DestOf("10.0.0.9"), ej: e, ownDeadline: true}
	for range 3 {
		own.Report(codes.DeadlineExceeded, "context deadline exceeded")
	}
	if !e.peek(DestOf("10.0.0.9")) {
		t.Fatal("three misses of apid's own node deadline did not eject the node")
	}
	refused := &Remote{name: "10.0.0.9", dest: DestOf("10.0.0.9"), ej: e, refused: true}
	refused.Report(codes.OK, "")
	if !e.peek(DestOf("10.0.0.9")) {
		t.Fatal("a call refused without reaching the node restored it")
	}
}

// TestEjectionForgetsAMovedNode: failures at one destination say nothing
// about another, so a node the inventory moves is tried at once.
func TestEjectionForgetsAMovedNode(t *testing.T) {
	var events []string
	e := newEjector(func(_ Ejection, ejected bool) {
		events = append(events, map[bool]string{true: "ejected", false: "restored"}[ejected])
	})
	e.setConfig(EjectionConfig{ConsecutiveFailures: 2, BaseTime: time.Minute, MaxTime: time.Minute, MaxPercent: 50})
	old := Dest{Node: "cp-1", Host: "10.0.0.2", ServerName: "cp-1"}
	for range 2 {
		e.report(old, codes.Unavailable, "refused")
	}
	if !e.peek(old) {
		t.Fatal("not ejected")
	}
	if !e.peek(old) {
		t.Fatal("forgotten without moving")
	}
	moved := old
	moved.Host = "10.0.0.3"
	if e.peek(moved) || strings.Join(events, ",") != "ejected,restored" {
		t.Fatalf("after the move: ejected %v, events %v", e.peek(moved), events)
	}
	// A failure left over from the old address does not count at the new.
	e.report(old, codes.Unavailable, "refused")
	e.report(moved, codes.Unavailable, "refused")
	if e.peek(moved) {
		t.Fatal("two failures at two destinations ejected the node")
	}
}

// TestHungNodeEjectedWhateverCallersDeadlines: a node that accepts TCP and
// never completes a connection costs every caller its whole deadline; once
// its connections have stayed unestablished longer than an attempt may
// take, across calls, the callers' deadlines count as its failures.
func TestHungNodeEjectedWhateverCallersDeadlines(t *testing.T) {
	hung := testkit.SilentListener(t, "127.0.0.1:0")
	pool := testPool(t, PoolConfig{Port: port(t, hung.Addr().String())})
	pool.connectTimeout = 300 * time.Millisecond
	e := newEjector(nil)
	e.setConfig(EjectionConfig{ConsecutiveFailures: 3, BaseTime: time.Minute, MaxTime: time.Minute, MaxPercent: 50})
	dest := DestOf("127.0.0.1")
	ejected := testkit.Eventually(10*time.Second, func() bool {
		b := &Remote{name: "127.0.0.1", dest: dest, nodes: pool, ej: e}
		_, cc, release, err := b.Connect(context.Background(), "")
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond) // the caller's own
		err = cc.Invoke(ctx, "/x.Y/Z", &emptypb.Empty{}, &emptypb.Empty{})
		cancel()
		b.Report(status.Code(err), err.Error())
		release()
		return e.peek(dest)
	})
	if !ejected {
		t.Fatal("a node that never completes a connection was never ejected")
	}
}
