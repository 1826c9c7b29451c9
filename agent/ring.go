package agent

import "sync"

// ring keeps the latest items of a log (the agent's log lines, its
// events). Items are numbered from 0 in the order they arrive; a reader
// keeps the number of the next item it wants and is woken through a
// channel that is closed on every append.
type ring[T any] struct {
	mu      sync.Mutex
	items   []T    // items[seq%len(items)] holds item seq
	next    uint64 // number of the next item to be appended
	changed chan struct{}
}

func newRing[T any](capacity int) *ring[T] {
	return &ring[T]{items: make([]T, capacity), changed: make(chan struct{})}
}

// appendLocked appends v and wakes the readers; r.mu must be held.
func (r *ring[T]) appendLocked(v T) {
	r.items[r.next%uint64(len(r.items))] = v
	r.next++
	close(r.changed)
	r.changed = make(chan struct{})
}

// at is item seq, which must still be kept; r.mu must be held.
func (r *ring[T]) at(seq uint64) T { return r.items[seq%uint64(len(r.items))] }

// oldest is the number of the oldest item still kept; r.mu must be held.
func (r *ring[T]) oldest() uint64 {
	if c := uint64(len(r.items)); r.next > c {
		return r.next - c
	}
	return 0
}

// tailStartLocked returns the number of the item from which the last n
// items start; a negative n means every kept item. r.mu must be held.
func (r *ring[T]) tailStartLocked(n int32) uint64 {
	oldest := r.oldest()
	if n < 0 || uint64(n) >= r.next-oldest {
		return oldest
	}
	return r.next - uint64(n)
}

// since returns the kept items numbered from onwards, the number to ask
// for next, how many items from that position were already overwritten,
// and a channel closed on the next append.
func (r *ring[T]) since(from uint64) (items []T, next, dropped uint64, changed <-chan struct{}) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if oldest := r.oldest(); from < oldest {
		dropped, from = oldest-from, oldest
	}
	for seq := from; seq < r.next; seq++ {
		items = append(items, r.at(seq))
	}
	return items, r.next, dropped, r.changed
}
