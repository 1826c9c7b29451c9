package proxy

import "time"

// idleWorker is how long a worker goroutine waits for its next backend
// call before it exits.
const idleWorker = 5 * time.Second

// workers runs each backend's part of a one-to-many call on a goroutine
// that outlives it. A backend call grows its goroutine's stack well past
// the initial size (grpc-go sets up a client stream several dozen frames
// deep), and a fresh goroutine per backend per call paid for growing and
// copying that stack every time: about 5 % of the CPU of a 100-node
// fan-out. Idle workers wait idleWorker for more work and then exit, so a
// burst of fan-outs leaves nothing behind for long.
type workers struct{ work chan func() }

func newWorkers() *workers { return &workers{work: make(chan func())} }

// run runs f on an idle worker, or on a new one when none is idle. It never
// waits.
func (w *workers) run(f func()) {
	select {
	case w.work <- f:
	default:
		go w.loop(f)
	}
}

func (w *workers) loop(f func()) {
	idle := time.NewTimer(idleWorker)
	defer idle.Stop()
	for {
		f()
		f = nil // hold nothing of the last call while idle
		idle.Reset(idleWorker)
		select {
		case f = <-w.work:
		case <-idle.C:
			return
		}
	}
}
