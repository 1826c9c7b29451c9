// Package testkit holds what the tests of every package share: a context
// bounded in time that ends with its test, and a bounded wait for a
// condition. Test code only; nothing of apid's imports it.
package testkit

import (
	"bytes"
	"context"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// Timeout bounds every test context: generous, so that a loaded machine
// does not fail a test that works, and finite, so that a hang fails.
const Timeout = 60 * time.Second

// Context returns a context that ends after Timeout or when t ends.
func Context(t testing.TB) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), Timeout)
	t.Cleanup(cancel)
	return ctx
}

// Eventually polls cond until it holds (true) or timeout passes (false).
func Eventually(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}

// SilentListener listens on addr (host:port, port 0 for a free one) and
// accepts every connection without ever speaking on it, holding each open
// until the test ends: a node that accepts TCP and hangs.
func SilentListener(t testing.TB, addr string) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	held := make(chan net.Conn, 1024)
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			select {
			case held <- c:
			default:
				c.Close() // bounded: more than a test needs
			}
		}
	}()
	t.Cleanup(func() {
		l.Close()
		<-done
		close(held)
		for c := range held {
			c.Close()
		}
	})
	return l
}

// Buffer is a bytes.Buffer safe for concurrent writers and readers: what a
// server in the test's process logs or prints, read while it runs.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Metric reads one series' value from the Prometheus endpoint at
// http://admin/metrics (series as exposed, labels included: name{k="v"}),
// or -1 when the endpoint does not answer or lacks the series.
func Metric(admin, series string) float64 {
	resp, err := http.Get("http://" + admin + "/metrics")
	if err != nil {
		return -1
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return -1
	}
	for line := range strings.Lines(string(body)) {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), series+" "); ok {
			if f, err := strconv.ParseFloat(v, 64); err == nil {
				return f
			}
		}
	}
	return -1
}
