package aggregate

import (
	"unicode/utf8"

	"google.golang.org/protobuf/encoding/protowire"
)

// stamp is the field 1 that marks an entry or streamed message with its
// node: an encoded common.Metadata holding only the hostname. Because a
// decoder merges repeated occurrences of a message field, appending it
// overrides any hostname the backend set and keeps everything else.
type stamp struct {
	host    string
	valid   bool // host is valid UTF-8 and can be copied as it is
	hostLen int  // len(host) once made valid UTF-8
	size    int  // encoded length of the whole field
}

func newStamp(host string) stamp {
	s := stamp{host: host, valid: utf8.ValidString(host)}
	s.hostLen = len(host)
	if !s.valid {
		// Not comparable with len(host): three bad bytes can become one
		// three-byte replacement character.
		s.hostLen = validUTF8Len(host)
	}
	s.size = bytesFieldLen(bytesFieldLen(s.hostLen))
	return s
}

func (s *stamp) appendTo(b []byte) []byte {
	b = append(b, tagMetadata)
	b = protowire.AppendVarint(b, uint64(bytesFieldLen(s.hostLen)))
	b = append(b, tagMetadata)
	b = protowire.AppendVarint(b, uint64(s.hostLen))
	if s.valid {
		return append(b, s.host...)
	}
	return appendValidUTF8(b, s.host)
}

// StampMessage appends msg, one server-streamed reply message, to dst
// followed by a field-1 common.Metadata holding only hostname host, so the
// client sees host as the message's origin. msg must be a sequence of
// well-formed fields whose field 1, if any, is length-delimited; otherwise
// StampMessage returns dst unchanged and an error wrapping ErrMalformed.
func StampMessage(dst, msg []byte, host string) ([]byte, error) {
	if f := checkFields(msg, 0); !f.ok() {
		return dst, &malformedError{f}
	}
	s := newStamp(host)
	dst = grow(dst, len(msg)+s.size)
	dst = append(dst, msg...)
	return s.appendTo(dst), nil
}

// StampReply appends the unary reply to dst with every top-level field-1
// entry stamped with host: each entry is re-emitted as field 1 whose length
// has grown by an appended common.Metadata holding only the hostname. Other
// top-level fields are copied verbatim in place. A reply without any field-1
// entry, including an empty one, gets a single entry holding only the
// metadata, so that every node is represented in a merged reply.
//
// The reply and the contents of each entry must be sequences of well-formed
// fields whose field 1 is length-delimited; appending to a broken entry would
// yield a reply the client cannot decode. Otherwise StampReply returns dst
// unchanged and an error wrapping ErrMalformed.
func StampReply(dst, reply []byte, host string) ([]byte, error) {
	s := newStamp(host)
	_, n, f := walkReply(nil, reply, &s, false)
	if !f.ok() {
		return dst, &malformedError{f}
	}
	dst = grow(dst, n)
	start := len(dst)
	if dst, _, f = walkReply(dst, reply, &s, true); !f.ok() {
		// Only possible if reply changed between the two passes.
		return dst[:start], &malformedError{f}
	}
	return dst, nil
}

// StampedReplySize returns len(StampReply(nil, reply, host)) without
// allocating, or the error StampReply would return.
func StampedReplySize(reply []byte, host string) (int, error) {
	s := newStamp(host)
	_, n, f := walkReply(nil, reply, &s, false)
	if !f.ok() {
		return 0, &malformedError{f}
	}
	return n, nil
}

// walkReply returns the size of reply's stamped form and, when write is set,
// appends that form to dst. Sizing and writing share this one walk so that
// they cannot disagree. Without write it validates reply fully; with write it
// relies on such a walk having succeeded and checks only the top level, which
// keeps it safe (if not useful) on bytes that changed since. On failure dst
// may hold part of the output; callers cut it back.
func walkReply(dst, reply []byte, s *stamp, write bool) ([]byte, int, failure) {
	size, entries, copied := 0, 0, 0
	for off := 0; off < len(reply); {
		num, typ, val, end, cause := nextField(reply, off)
		if cause == nil && num == 1 && typ != protowire.BytesType {
			cause = errNotBytes
		}
		if cause != nil {
			return dst, 0, failure{cause: cause, field: off, entry: -1}
		}
		if num != 1 {
			off = end
			continue
		}
		if !write {
			if f := checkFields(reply[val:end], val); !f.ok() {
				f.entry = val
				return dst, 0, f
			}
		}
		grown := end - val + s.size
		size += off - copied + bytesFieldLen(grown)
		if write {
			dst = append(dst, reply[copied:off]...)
			dst = append(dst, tagMetadata)
			dst = protowire.AppendVarint(dst, uint64(grown))
			dst = append(dst, reply[val:end]...)
			dst = s.appendTo(dst)
		}
		entries++
		copied, off = end, end
	}
	size += len(reply) - copied
	if write {
		dst = append(dst, reply[copied:]...)
	}
	if entries == 0 {
		size += bytesFieldLen(s.size)
		if write {
			dst = append(dst, tagMetadata)
			dst = protowire.AppendVarint(dst, uint64(s.size))
			dst = s.appendTo(dst)
		}
	}
	return dst, size, failure{}
}

// grow makes room for n more bytes in dst with at most one allocation.
// (slices.Grow allocates twice when built with -race.)
func grow(dst []byte, n int) []byte {
	if cap(dst)-len(dst) >= n {
		return dst
	}
	b := make([]byte, len(dst), len(dst)+n)
	copy(b, dst)
	return b
}

// Stamp returns the bytes that, appended to a server-streamed reply message,
// stamp it with host: the same field-1 common.Metadata StampMessage appends.
// They depend on host alone, so a relay computes them once per node and
// appends them to each message without copying the message (see
// CheckMessage).
func Stamp(host string) []byte {
	s := newStamp(host)
	return s.appendTo(make([]byte, 0, s.size))
}

// CheckMessage reports whether the concatenation of segs (one message as
// the transport delivered it, possibly in several buffers) has the shape
// StampMessage requires: well-formed fields whose field 1, if any, is
// length-delimited. It returns the error StampMessage would return, and
// never copies the message.
func CheckMessage(segs ...[]byte) error {
	var f failure
	if len(segs) == 1 {
		f = checkFields(segs[0], 0)
	} else {
		f = checkSegments(segs)
	}
	if !f.ok() {
		return &malformedError{f}
	}
	return nil
}

// checkSegments is checkFields over a message split into segments. Each
// field's head (tag, and length or value, at most 20 bytes) is gathered
// across segment boundaries into a small array and parsed there, so the
// parse, and every error, is exactly the one checkFields would give.
func checkSegments(segs [][]byte) failure {
	total := 0
	for _, s := range segs {
		total += len(s)
	}
	c := segmentCursor{segs: segs}
	for c.pos < total {
		var head [maxFieldHead]byte
		h := c.peek(head[:])
		num, typ, n := protowire.ConsumeTag(h)
		var cause error
		skip := 0
		switch {
		case n < 0:
			cause = protowire.ParseError(n)
		case num > protowire.MaxValidNumber:
			cause = errFieldNumber
		case typ == protowire.StartGroupType || typ == protowire.EndGroupType:
			cause = errGroup
		case typ == protowire.BytesType:
			v, m := protowire.ConsumeVarint(h[n:])
			switch {
			case m < 0:
				cause = protowire.ParseError(m)
			case v > uint64(total-c.pos-n-m):
				cause = protowire.ParseError(-1) // truncated, as ConsumeBytes reports it
			default:
				skip = n + m + int(v)
			}
		default:
			if m := protowire.ConsumeFieldValue(num, typ, h[n:]); m < 0 {
				cause = protowire.ParseError(m)
			} else {
				skip = n + m
			}
		}
		if cause == nil && num == 1 && typ != protowire.BytesType {
			cause = errNotBytes
		}
		if cause != nil {
			return failure{cause: cause, field: c.pos, entry: -1}
		}
		c.skip(skip)
	}
	return failure{}
}

// maxFieldHead bounds the head of a field: a tag and a varint (a length
// or a value), at most ten bytes each.
const maxFieldHead = 20

// segmentCursor is a read position in a message split into segments.
type segmentCursor struct {
	segs [][]byte
	seg  int // current segment
	off  int // offset in it
	pos  int // offset in the whole message
}

// peek copies up to len(buf) bytes from the position into buf without
// moving, and returns what it copied.
func (c *segmentCursor) peek(buf []byte) []byte {
	n := 0
	for i, off := c.seg, c.off; i < len(c.segs) && n < len(buf); i, off = i+1, 0 {
		n += copy(buf[n:], c.segs[i][off:])
	}
	return buf[:n]
}

// skip moves the position n bytes on.
func (c *segmentCursor) skip(n int) {
	c.pos += n
	for n > 0 && c.seg < len(c.segs) {
		left := len(c.segs[c.seg]) - c.off
		if n < left {
			c.off += n
			return
		}
		n -= left
		c.seg, c.off = c.seg+1, 0
	}
}
