// Package ring keeps the latest items of a log that readers follow: the
// lines of the node's logs, the events of its machine. Items are numbered in
// the order they arrive, the oldest are overwritten, and a reader that falls
// behind learns how many it missed.
//
// It holds items and nothing else: it must not know what a line or an event
// is, nor serve anything.
package ring
