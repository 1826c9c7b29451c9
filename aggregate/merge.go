package aggregate

import (
	"fmt"
	"slices"

	"google.golang.org/grpc/codes"
)

// Part is one node's contribution to a merged unary reply: its reply Body
// when Code is codes.OK, otherwise an error entry carrying Code and Message.
type Part struct {
	Host    string     // node name as the client sent it; stamped on every entry
	Body    []byte     // the node's encoded unary reply; used only when Code is codes.OK
	Code    codes.Code // codes.OK, or why the node has no reply
	Message string     // error text when Code is not codes.OK
}

// Merge returns one unary reply holding the entries of every part, in the
// order of parts, each stamped with its part's Host. A part whose Body cannot
// be stamped (see StampReply) becomes an error entry for its host with
// codes.Internal and a message saying the reply is malformed and why, so one
// bad node never spoils the others' answers. Merge sizes the reply first and
// allocates exactly once.
func Merge(parts []Part) []byte {
	var stampable partSet
	size := 0
	for i := range parts {
		n, ok := partLen(&parts[i])
		if ok {
			stampable.add(i)
		}
		size += n
	}
	out := make([]byte, 0, size)
	for i := range parts {
		out = appendPart(out, &parts[i], stampable.has(i))
	}
	return out
}

// partSet is a fixed set of part indexes kept on the stack. It lets Merge's
// write pass skip validating again the bodies its size pass accepted; parts
// beyond its reach are simply validated twice.
type partSet [16]uint64

func (s *partSet) add(i int) {
	if i < len(s)*64 {
		s[i/64] |= 1 << (i % 64)
	}
}

func (s *partSet) has(i int) bool {
	return i < len(s)*64 && s[i/64]&(1<<(i%64)) != 0
}

// partLen returns the encoded length of p's entries and whether its Body (if
// it is to be used) can be stamped.
func partLen(p *Part) (int, bool) {
	if p.Code != codes.OK {
		m := newErrorMetadata(p.Host, p.Code, plainText(p.Code, p.Message))
		return m.replyLen(), false
	}
	s := newStamp(p.Host)
	_, n, f := walkReply(nil, p.Body, &s, false)
	if !f.ok() {
		m := malformedEntry(p.Host, f)
		return m.replyLen(), false
	}
	return n, true
}

// appendPart appends p's entries to out; stampable says the size pass has
// already validated p.Body.
func appendPart(out []byte, p *Part, stampable bool) []byte {
	if p.Code != codes.OK {
		m := newErrorMetadata(p.Host, p.Code, plainText(p.Code, p.Message))
		return m.appendReply(out)
	}
	s := newStamp(p.Host)
	if !stampable {
		// Validate before writing: a body that fails late would otherwise
		// have written more than the error entry it is sized for.
		if _, _, f := walkReply(nil, p.Body, &s, false); !f.ok() {
			m := malformedEntry(p.Host, f)
			return m.appendReply(out)
		}
	}
	start := len(out)
	out, _, f := walkReply(out, p.Body, &s, true)
	if !f.ok() {
		// Only possible if Body changed during Merge; keep the output decodable.
		m := malformedEntry(p.Host, f)
		return m.appendReply(out[:start])
	}
	return out
}

// malformedEntry is the error metadata standing in for a body that failed f.
func malformedEntry(host string, f failure) errorMetadata {
	return newErrorMetadata(host, codes.Internal, text{fail: f})
}

// MergeWithin is Merge for a client that accepts at most max bytes (no
// bound when max <= 0). When the merged reply would be larger, the largest
// replies become ResourceExhausted error entries until it fits, so that an
// oversized merge costs the client those nodes' entries rather than the
// whole call. It also returns the parts as merged, with every node's
// outcome explicit (a body that cannot be stamped is the Internal part
// Merge writes for it): their codes are what the client sees for each
// node. Each body is validated once, as in Merge.
func MergeWithin(parts []Part, max int) ([]byte, []Part) {
	merged := slices.Clone(parts)
	sizes := make([]int, len(merged))
	var stampable partSet
	total := 0
	for i := range merged {
		p := &merged[i]
		if p.Code == codes.OK {
			s := newStamp(p.Host)
			_, n, f := walkReply(nil, p.Body, &s, false)
			if f.ok() {
				stampable.add(i)
				sizes[i], total = n, total+n
				continue
			}
			*p = Part{Host: p.Host, Code: codes.Internal, Message: string(f.appendText([]byte(malformedReply)))}
		}
		sizes[i] = ErrorReplySize(p.Host, p.Code, p.Message)
		total += sizes[i]
	}
	if max > 0 && total > max {
		total = leaveOut(merged, sizes, total, max)
	}
	out := make([]byte, 0, total)
	for i := range merged {
		out = appendPart(out, &merged[i], stampable.has(i))
	}
	return out, merged
}

// leaveOut replaces the largest replies of parts with ResourceExhausted
// parts until their total size is at most max, and returns the new total.
func leaveOut(parts []Part, sizes []int, total, max int) int {
	order := make([]int, len(parts))
	for i := range order {
		order[i] = i
	}
	slices.SortStableFunc(order, func(a, b int) int { return sizes[b] - sizes[a] })
	for _, i := range order {
		if total <= max {
			break
		}
		if parts[i].Code != codes.OK {
			continue
		}
		msg := fmt.Sprintf("reply of %d bytes left out: the merged reply would exceed %d bytes; ask this node alone", sizes[i], max)
		parts[i] = Part{Host: parts[i].Host, Code: codes.ResourceExhausted, Message: msg}
		n := ErrorReplySize(parts[i].Host, parts[i].Code, msg)
		total += n - sizes[i]
		sizes[i] = n
	}
	return total
}
