package aggregate

import "google.golang.org/protobuf/encoding/protowire"

// tagMetadata is field 1 with the length-delimited wire type: the tag of
// common.Metadata inside an entry or streamed message, of an entry inside a
// unary reply, and of Metadata.hostname.
const tagMetadata = 1<<3 | byte(protowire.BytesType)

// Tags of the other common.Metadata and google.rpc.Status fields we write.
const (
	tagMetadataError  = 2<<3 | byte(protowire.BytesType)  // Metadata.error
	tagMetadataStatus = 3<<3 | byte(protowire.BytesType)  // Metadata.status
	tagStatusCode     = 1<<3 | byte(protowire.VarintType) // Status.code
	tagStatusMessage  = 2<<3 | byte(protowire.BytesType)  // Status.message
)

// bytesFieldLen is the encoded length of a length-delimited field with a
// one-byte tag and n bytes of contents.
func bytesFieldLen(n int) int {
	return 1 + protowire.SizeVarint(uint64(n)) + n
}

// nextField parses the field that starts at b[off:]. For a length-delimited
// field val is the offset of its contents; for others it is the offset of its
// value. end is the offset just past the field.
func nextField(b []byte, off int) (num protowire.Number, typ protowire.Type, val, end int, cause error) {
	num, typ, n := protowire.ConsumeTag(b[off:])
	if n < 0 {
		return 0, 0, 0, 0, protowire.ParseError(n)
	}
	if num > protowire.MaxValidNumber {
		return 0, 0, 0, 0, errFieldNumber
	}
	val = off + n
	switch typ {
	case protowire.StartGroupType, protowire.EndGroupType:
		return 0, 0, 0, 0, errGroup
	case protowire.BytesType:
		v, m := protowire.ConsumeBytes(b[val:])
		if m < 0 {
			return 0, 0, 0, 0, protowire.ParseError(m)
		}
		end = val + m
		return num, typ, end - len(v), end, nil
	}
	m := protowire.ConsumeFieldValue(num, typ, b[val:])
	if m < 0 {
		return 0, 0, 0, 0, protowire.ParseError(m)
	}
	return num, typ, val, val + m, nil
}

// checkFields reports whether b is a sequence of well-formed fields whose
// field 1, if present, is length-delimited: the shape of a message that
// carries common.Metadata as field 1. base is b's offset in the whole reply
// and is used only to report where a problem is.
func checkFields(b []byte, base int) failure {
	for off := 0; off < len(b); {
		num, typ, _, end, cause := nextField(b, off)
		if cause == nil && num == 1 && typ != protowire.BytesType {
			cause = errNotBytes
		}
		if cause != nil {
			return failure{cause: cause, field: base + off, entry: -1}
		}
		off = end
	}
	return failure{}
}
