package aggregate

import (
	"errors"
	"strconv"
)

// ErrMalformed is wrapped by every error this package returns for bytes that
// are not a well-formed message in the Talos reply layout. Test for it with
// errors.Is.
var ErrMalformed = errors.New("malformed message")

// Causes that protowire does not report itself.
var (
	errFieldNumber = errors.New("invalid field number")
	errGroup       = errors.New("group wire type is not supported")
	errNotBytes    = errors.New("field 1 is not length-delimited")
)

// failure locates what is wrong with a message. It is a plain value so that
// the size pass of Merge can describe a bad part without allocating.
type failure struct {
	cause error // nil when nothing is wrong
	field int   // offset of the offending field within the whole message
	entry int   // offset of the enclosing field-1 entry's contents, or -1 at the top level
}

func (f *failure) ok() bool { return f.cause == nil }

// Prefixes of the texts a failure renders into.
const (
	entryAt = "entry at offset "
	fieldAt = "field at offset "
	sep     = ": "
)

// textLen returns len(f.appendText(nil)).
func (f *failure) textLen() int {
	n := len(fieldAt) + decimalLen(f.field) + len(sep) + len(f.cause.Error())
	if f.entry >= 0 {
		n += len(entryAt) + decimalLen(f.entry) + len(sep)
	}
	return n
}

// appendText describes the failure, e.g.
// "entry at offset 2: field at offset 7: unexpected EOF".
func (f *failure) appendText(b []byte) []byte {
	if f.entry >= 0 {
		b = append(b, entryAt...)
		b = strconv.AppendInt(b, int64(f.entry), 10)
		b = append(b, sep...)
	}
	b = append(b, fieldAt...)
	b = strconv.AppendInt(b, int64(f.field), 10)
	b = append(b, sep...)
	return append(b, f.cause.Error()...)
}

func decimalLen(n int) int {
	d := 1
	for ; n >= 10; n /= 10 {
		d++
	}
	return d
}

// malformedError is the error returned to callers; it wraps both ErrMalformed
// and the underlying cause (for example io.ErrUnexpectedEOF).
type malformedError struct{ f failure }

func (e *malformedError) Error() string {
	b := make([]byte, 0, len("malformed message: ")+e.f.textLen())
	b = append(b, ErrMalformed.Error()...)
	b = append(b, sep...)
	return string(e.f.appendText(b))
}

func (e *malformedError) Unwrap() []error { return []error{ErrMalformed, e.f.cause} }
