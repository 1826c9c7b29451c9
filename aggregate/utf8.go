package aggregate

import "unicode/utf8"

// Hostnames and error texts end up in proto3 string fields, which a client
// refuses to decode unless they are valid UTF-8; one bad byte in one node's
// error would otherwise make the whole merged reply unreadable. Invalid
// sequences are therefore replaced the way strings.ToValidUTF8(s, "\uFFFD")
// does, but without building a new string: the size pass and the write pass
// each walk the original.

const replacement = "\uFFFD"

// validUTF8Len returns len(strings.ToValidUTF8(s, replacement)).
func validUTF8Len(s string) int {
	if utf8.ValidString(s) {
		return len(s)
	}
	n, invalid := 0, false
	for i := 0; i < len(s); {
		if s[i] < utf8.RuneSelf {
			n, i, invalid = n+1, i+1, false
			continue
		}
		_, w := utf8.DecodeRuneInString(s[i:])
		i += w
		if w == 1 {
			if !invalid {
				n += len(replacement)
			}
			invalid = true
			continue
		}
		n, invalid = n+w, false
	}
	return n
}

// appendValidUTF8 appends strings.ToValidUTF8(s, replacement) to b.
func appendValidUTF8(b []byte, s string) []byte {
	if utf8.ValidString(s) {
		return append(b, s...)
	}
	invalid := false
	for i := 0; i < len(s); {
		if s[i] < utf8.RuneSelf {
			b, i, invalid = append(b, s[i]), i+1, false
			continue
		}
		_, w := utf8.DecodeRuneInString(s[i:])
		if w == 1 {
			if !invalid {
				b = append(b, replacement...)
			}
			i, invalid = i+1, true
			continue
		}
		b, i, invalid = append(b, s[i:i+w]...), i+w, false
	}
	return b
}
