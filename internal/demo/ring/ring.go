package ring

import (
	"sort"
	"sync"
)

// Ring keeps the latest items of a log. Items are numbered from 0 in the
// order they arrive; a reader keeps the number of the next item it wants
// and is woken through a channel that is closed on every append. It is safe
// for concurrent use.
type Ring[T any] struct {
	mu      sync.Mutex
	items   []T    // items[seq%len(items)] holds item seq
	next    uint64 // number of the next item to be appended
	changed chan struct{}
}

// New returns a ring that keeps the latest capacity items.
func New[T any](capacity int) *Ring[T] {
	return &Ring[T]{items: make([]T, capacity), changed: make(chan struct{})}
}

// Append appends vs, in one step for the readers, and wakes them.
func (r *Ring[T]) Append(vs ...T) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, v := range vs {
		r.appendLocked(v)
	}
}

// AppendNumbered appends the item make returns for the number it will
// have, and returns that item. make runs with the ring locked: what it
// reads and writes is in step with the ring's order.
func (r *Ring[T]) AppendNumbered(make func(seq uint64) T) T {
	r.mu.Lock()
	defer r.mu.Unlock()
	v := make(r.next)
	r.appendLocked(v)
	return v
}

// appendLocked appends v and wakes the readers; r.mu must be held.
func (r *Ring[T]) appendLocked(v T) {
	r.items[r.next%uint64(len(r.items))] = v
	r.next++
	close(r.changed)
	r.changed = make(chan struct{})
}

// at is item seq, which must still be kept; r.mu must be held.
func (r *Ring[T]) at(seq uint64) T { return r.items[seq%uint64(len(r.items))] }

// oldest is the number of the oldest item still kept; r.mu must be held.
func (r *Ring[T]) oldest() uint64 {
	if c := uint64(len(r.items)); r.next > c {
		return r.next - c
	}
	return 0
}

// Next is the number the next item will have.
func (r *Ring[T]) Next() uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.next
}

// TailStart returns the number of the item from which the last n items
// start; a negative n means every kept item.
func (r *Ring[T]) TailStart(n int32) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	oldest := r.oldest()
	if n < 0 || uint64(n) >= r.next-oldest {
		return oldest
	}
	return r.next - uint64(n)
}

// First returns the number of the first kept item for which after is true
// (the next number if there is none); after must be false and then true
// along the ring.
func (r *Ring[T]) First(after func(T) bool) uint64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	oldest := r.oldest()
	return oldest + uint64(sort.Search(int(r.next-oldest), func(i int) bool {
		return after(r.at(oldest + uint64(i)))
	}))
}

// Since returns the kept items numbered from onwards, the number to ask
// for next, how many items from that position were already overwritten,
// and a channel closed on the next append.
func (r *Ring[T]) Since(from uint64) (items []T, next, dropped uint64, changed <-chan struct{}) {
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
