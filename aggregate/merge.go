package aggregate

import "google.golang.org/grpc/codes"

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
