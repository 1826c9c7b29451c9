package limits

import (
	"bytes"
	"errors"
	"google.golang.org/grpc/credentials"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestMemoryRefusesOnlyWhileSpent(t *testing.T) {
	m := NewMemory(100)
	m.Hold(100)
	if err := m.Admit(); err != nil {
		t.Fatalf("at the limit: %v, want admitted", err)
	}
	m.Hold(1)
	err := m.Admit()
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "limits.bufferedBytes") {
		t.Fatalf("over the limit: %v, want ResourceExhausted naming limits.bufferedBytes", err)
	}
	m.Hold(-101)
	if err := m.Admit(); err != nil || m.Held() != 0 || m.Refused() != 1 {
		t.Fatalf("after release: %v, held %d, refused %d", err, m.Held(), m.Refused())
	}
	if err := NewMemory(0).Admit(); err != nil {
		t.Fatalf("no limit refused: %v", err)
	}
}

func TestDefaultMemoryIsAShareOfTheMachine(t *testing.T) {
	got := DefaultMemory()
	if got < 64<<20 {
		t.Fatalf("default budget %d, want at least 64 MiB", got)
	}
	if m := machineMemory(); m > 0 && got > m/8 && got != 64<<20 {
		t.Fatalf("default budget %d is more than an eighth of the machine's %d", got, m)
	}
}

// TestUnfinishedHandshakesHaveTheirOwnBudget: connections that never
// finish their handshake cannot hold more than the handshake budget (the
// oldest goes first), one source cannot hold more than its share, and
// authenticated connections count against the total alone.
func TestUnfinishedHandshakesHaveTheirOwnBudget(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	c := NewConnections(1, 0, slog.New(slog.NewTextHandler(&logs, nil)))
	c.SetHandshakeLimits(2, 0, 0)
	lis := c.Listener(inner)
	defer lis.Close()
	accepted := make(chan net.Conn, 10)
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				close(accepted)
				return
			}
			accepted <- conn
		}
	}()
	dial := func() net.Conn {
		conn, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return conn
	}
	// closedSoon reports whether the server closed conn within a second.
	closedSoon := func(conn net.Conn) bool {
		_ = conn.SetReadDeadline(time.Now().Add(time.Second))
		_, err := conn.Read(make([]byte, 1))
		var ne net.Error
		return err != nil && !(errors.As(err, &ne) && ne.Timeout())
	}
	oldest := dial()
	<-accepted
	second := dial()
	<-accepted
	third := dial()
	<-accepted
	if !closedSoon(oldest) {
		t.Fatal("a third unfinished handshake over the budget of 2 did not close the oldest")
	}
	if closedSoon(second) || closedSoon(third) || c.Handshaking() != 2 || c.RefusedHandshakes() != 1 {
		t.Fatalf("handshaking %d, refused %d; want the two newest kept", c.Handshaking(), c.RefusedHandshakes())
	}

	// A handshake that completes leaves the handshake budget for the
	// total one: with a total of 1, the second to complete is refused.
	creds := c.Credentials(instant{})
	for i, want := range []bool{true, false} {
		conn := <-func() chan net.Conn { dial(); return accepted }()
		_, _, err := creds.ServerHandshake(conn)
		if (err == nil) != want {
			t.Fatalf("authenticated connection %d: %v, want accepted %v", i+1, err, want)
		}
	}
	if c.RefusedTotal() != 1 {
		t.Fatalf("refused by the total %d, want 1", c.RefusedTotal())
	}
}

// TestSourcesBounded: one source address holds at most its share of the
// unfinished handshakes and opens connections at a bounded rate.
func TestSourcesBounded(t *testing.T) {
	c := NewConnections(0, 0, nil)
	c.SetHandshakeLimits(0, 2, 1000)
	a := &net.TCPAddr{IP: net.ParseIP("198.18.0.1"), Port: 1}
	b := &net.TCPAddr{IP: net.ParseIP("198.18.0.2"), Port: 1}
	var held []*countedConn
	for i, want := range []bool{true, true, false} {
		cc := &countedConn{}
		if err := c.enterSource(cc, a); (err == nil) != want {
			t.Fatalf("handshake %d from a: %v", i+1, err)
		}
		held = append(held, cc)
	}
	if err := c.enterSource(&countedConn{}, b); err != nil {
		t.Fatalf("another source: %v", err)
	}
	c.handshakeEnded(held[0])
	if err := c.enterSource(&countedConn{}, a); err != nil {
		t.Fatalf("a after one of its handshakes ended: %v", err)
	}
	c.SetHandshakeLimits(0, 0, 1) // one a second, bursts of 2
	fresh := &net.TCPAddr{IP: net.ParseIP("198.18.0.3"), Port: 1}
	for i, want := range []bool{true, true, false} {
		if err := c.enterSource(&countedConn{}, fresh); (err == nil) != want {
			t.Fatalf("connection %d within a second: %v", i+1, err)
		}
	}
}

// instant is transport credentials whose handshake succeeds at once.
type instant struct {
	credentials.TransportCredentials
}

func (instant) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return c, nil, nil
}
func (instant) Clone() credentials.TransportCredentials { return instant{} }

// TestHandshakeDeadlineShortensUnderPressure: until half the handshake
// budget is taken a handshake has the listener's whole timeout; beyond,
// less in proportion to the room left, never under MinHandshakeDeadline.
func TestHandshakeDeadlineShortensUnderPressure(t *testing.T) {
	const full = 10 * time.Second
	for _, tc := range []struct {
		n, limit int
		want     time.Duration
	}{
		{0, 100, 0}, {50, 100, 0}, {75, 100, 5 * time.Second}, {90, 100, 2 * time.Second},
		{100, 100, MinHandshakeDeadline}, {101, 100, MinHandshakeDeadline},
		{1000, 0, 0}, // no budget: nothing to protect
	} {
		if got := shortened(tc.n, tc.limit, full); got != tc.want {
			t.Errorf("%d of %d handshakes: %s, want %s", tc.n, tc.limit, got, tc.want)
		}
	}
	if got := shortened(100, 100, 500*time.Millisecond); got != 0 {
		t.Errorf("a timeout below the floor was changed to %s", got)
	}

	// On a socket: with the budget of 4 full, a handshake that never ends
	// is cut at the floor, not at the 10 s the listener gave it.
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := NewConnections(0, 0, nil)
	c.SetHandshakeLimits(4, 0, 0)
	c.SetHandshakeTimeout(full)
	lis := c.Listener(inner)
	defer lis.Close()
	var last net.Conn
	for range 4 {
		conn, err := net.Dial("tcp", inner.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		if last, err = lis.Accept(); err != nil {
			t.Fatal(err)
		}
		defer last.Close()
	}
	_ = last.SetDeadline(time.Now().Add(full)) // as grpc-go does
	start := time.Now()
	_, _, err = c.Credentials(silent{}).ServerHandshake(last)
	if took := time.Since(start); err == nil || took > full/2 {
		t.Fatalf("handshake with the budget full ended after %s (%v), want about %s", took, err, MinHandshakeDeadline)
	}
}

// silent is transport credentials whose handshake waits for a byte that
// never comes.
type silent struct {
	credentials.TransportCredentials
}

func (silent) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	_, err := c.Read(make([]byte, 1))
	return nil, nil, err
}
func (silent) Clone() credentials.TransportCredentials { return silent{} }
