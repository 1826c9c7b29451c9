// Package logbuf batches log lines into fewer writes.
//
// apid's call log writes a line per call; written one by one, each line is
// a write system call on the gateway's hottest path (about 3 % of a
// one-to-one call's CPU). A Writer holds lines for at most its interval
// and writes them together, as access logs commonly do (Envoy flushes
// every second); Close writes what is left.
package logbuf

import (
	"io"
	"sync"
	"time"
)

// Writer buffers whole writes (a slog handler writes one line per call)
// and passes them on together: after interval, when max bytes are held,
// on Flush and on Close. It is safe for concurrent use.
type Writer struct {
	w        io.Writer
	interval time.Duration
	max      int

	mu     sync.Mutex
	buf    []byte
	timer  *time.Timer // armed while buf holds anything
	closed bool
	err    error // the last error of w, reported by Flush and Close
}

// DefaultInterval is how long a line may wait: short enough that someone
// watching the log sees no lag, long enough to batch a busy gateway's
// lines.
const DefaultInterval = 100 * time.Millisecond

// New returns a Writer to w that holds lines for at most interval and at
// most max bytes at once (a write that would pass max goes out at once,
// with what was held).
func New(w io.Writer, interval time.Duration, max int) *Writer {
	return &Writer{w: w, interval: interval, max: max}
}

// Write holds p (whole: a line is never split between two writes) and
// always reports it written; what w later refuses is reported by Flush.
// After Close, p goes straight to w.
func (b *Writer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return b.w.Write(p)
	}
	if len(b.buf)+len(p) > b.max {
		b.flushLocked()
		if len(p) >= b.max {
			_, err := b.w.Write(p)
			b.note(err)
			return len(p), nil
		}
	}
	b.buf = append(b.buf, p...)
	if b.timer == nil {
		b.timer = time.AfterFunc(b.interval, b.onTimer)
	} else if len(b.buf) == len(p) {
		b.timer.Reset(b.interval)
	}
	return len(p), nil
}

func (b *Writer) onTimer() {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushLocked()
}

// flushLocked writes what is held. The buffer is kept for reuse unless a
// burst grew it past max.
func (b *Writer) flushLocked() {
	if len(b.buf) == 0 {
		return
	}
	_, err := b.w.Write(b.buf)
	b.note(err)
	if cap(b.buf) > 2*b.max {
		b.buf = nil
	} else {
		b.buf = b.buf[:0]
	}
}

func (b *Writer) note(err error) {
	if err != nil {
		b.err = err
	}
}

// Flush writes what is held now and returns the last error w returned
// since the previous Flush.
func (b *Writer) Flush() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.flushLocked()
	err := b.err
	b.err = nil
	return err
}

// Close writes what is held; later writes go straight to w.
func (b *Writer) Close() error {
	b.mu.Lock()
	b.closed = true
	if b.timer != nil {
		b.timer.Stop()
	}
	b.mu.Unlock()
	return b.Flush()
}
