package limits

import (
	"bytes"
	"errors"
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

func TestListenerClosesConnectionsOverTheTotalAtOnce(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var logs bytes.Buffer
	c := NewConnections(2, 0, slog.New(slog.NewTextHandler(&logs, nil)))
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
	dial()
	dial()
	first, second := <-accepted, <-accepted
	for range 3 {
		if !closedSoon(dial()) {
			t.Fatal("a connection over the limit of 2 was not closed at once")
		}
	}
	if c.Open() != 2 || c.RefusedTotal() != 3 {
		t.Fatalf("open %d, refused %d; want 2 and 3", c.Open(), c.RefusedTotal())
	}
	if n := strings.Count(logs.String(), "limits.connections reached"); n != 1 {
		t.Fatalf("3 refusals within a second logged %d times, want once:\n%s", n, logs.String())
	}
	first.Close()
	first.Close() // closing twice gives back one place
	if c.Open() != 1 {
		t.Fatalf("open %d after one close, want 1", c.Open())
	}
	third := dial()
	if closedSoon(third) {
		t.Fatal("a connection under the limit was closed")
	}
	second.Close()
	(<-accepted).Close()
	if c.Open() != 0 {
		t.Fatalf("open %d after all closed, want 0", c.Open())
	}
}
