package aggregate

import (
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
)

// An error entry stands in for a node that produced no usable reply. It holds
// only common.Metadata{hostname, error, status{code, message}}; clients treat
// any entry whose metadata.error is non-empty as that node's failure.

// text is an error entry's message: either a caller's string or, for Merge,
// the description of a malformed reply, rendered straight into the output so
// that describing a bad part costs no allocation.
type text struct {
	s    string
	fail failure // used instead of s when fail.cause is set
}

// malformedReply prefixes the description of a reply Merge could not stamp.
const malformedReply = "malformed reply: "

func plainText(code codes.Code, s string) text {
	if s == "" {
		// An empty error would make the client take the entry for a success.
		s = code.String()
	}
	return text{s: s}
}

func (t *text) len() int {
	if !t.fail.ok() {
		return len(malformedReply) + t.fail.textLen()
	}
	return validUTF8Len(t.s)
}

func (t *text) appendTo(b []byte) []byte {
	if !t.fail.ok() {
		return t.fail.appendText(append(b, malformedReply...))
	}
	return appendValidUTF8(b, t.s)
}

// errorMetadata holds the lengths of one encoded error Metadata.
type errorMetadata struct {
	host      string
	code      codes.Code
	msg       text
	hostLen   int
	msgLen    int // the status message
	errLen    int // metadata.error: the message after its status prefix
	statusLen int // contents of Metadata.status
	size      int // contents of the Metadata message
}

// metadata.error holds the status as grpc-go prints an error, as Talos
// writes it (clients and Talos's own tests match that text), and
// metadata.status the status itself: rpc error: code = NotFound desc = ...
const (
	errorPrefix = "rpc error: code = "
	errorDesc   = " desc = "
)

func newErrorMetadata(host string, code codes.Code, msg text) errorMetadata {
	m := errorMetadata{host: host, code: code, msg: msg, hostLen: validUTF8Len(host), msgLen: msg.len()}
	m.errLen = len(errorPrefix) + len(code.String()) + len(errorDesc) + m.msgLen
	if code != codes.OK {
		m.statusLen = 1 + protowire.SizeVarint(statusCode(code))
	}
	m.statusLen += bytesFieldLen(m.msgLen)
	m.size = bytesFieldLen(m.hostLen) + bytesFieldLen(m.errLen) + bytesFieldLen(m.statusLen)
	return m
}

// statusCode encodes code as google.rpc.Status.code, an int32.
func statusCode(code codes.Code) uint64 { return uint64(int64(int32(code))) }

// messageLen is the length of a streamed message holding only this metadata.
func (m *errorMetadata) messageLen() int { return bytesFieldLen(m.size) }

// replyLen is the length of a unary reply holding one entry of this metadata.
func (m *errorMetadata) replyLen() int { return bytesFieldLen(m.messageLen()) }

func (m *errorMetadata) appendMessage(b []byte) []byte {
	b = append(b, tagMetadata)
	b = protowire.AppendVarint(b, uint64(m.size))
	b = append(b, tagMetadata)
	b = protowire.AppendVarint(b, uint64(m.hostLen))
	b = appendValidUTF8(b, m.host)
	b = append(b, tagMetadataError)
	b = protowire.AppendVarint(b, uint64(m.errLen))
	b = append(b, errorPrefix...)
	b = append(b, m.code.String()...)
	b = append(b, errorDesc...)
	b = m.msg.appendTo(b)
	b = append(b, tagMetadataStatus)
	b = protowire.AppendVarint(b, uint64(m.statusLen))
	if m.code != codes.OK {
		b = append(b, tagStatusCode)
		b = protowire.AppendVarint(b, statusCode(m.code))
	}
	b = append(b, tagStatusMessage)
	b = protowire.AppendVarint(b, uint64(m.msgLen))
	return m.msg.appendTo(b)
}

func (m *errorMetadata) appendReply(b []byte) []byte {
	b = append(b, tagMetadata)
	b = protowire.AppendVarint(b, uint64(m.messageLen()))
	return m.appendMessage(b)
}

// AppendErrorMessage appends to dst a server-streamed message that holds only
// common.Metadata{hostname: host, error: "rpc error: code = CODE desc = msg",
// status: {code, message: msg}}, telling the client that host failed (the
// error text is the status as grpc-go prints it, as Talos writes it). An empty msg is replaced by the
// code's name, because clients recognise error entries by a non-empty error.
// Invalid UTF-8 in host or msg is replaced by U+FFFD.
func AppendErrorMessage(dst []byte, host string, code codes.Code, msg string) []byte {
	m := newErrorMetadata(host, code, plainText(code, msg))
	return m.appendMessage(dst)
}

// AppendErrorReply appends to dst a unary reply holding one entry that is the
// error metadata AppendErrorMessage describes.
func AppendErrorReply(dst []byte, host string, code codes.Code, msg string) []byte {
	m := newErrorMetadata(host, code, plainText(code, msg))
	return m.appendReply(dst)
}

// ErrorReplySize returns len(AppendErrorReply(nil, host, code, msg)).
func ErrorReplySize(host string, code codes.Code, msg string) int {
	m := newErrorMetadata(host, code, plainText(code, msg))
	return m.replyLen()
}
