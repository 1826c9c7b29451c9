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
