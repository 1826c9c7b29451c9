package aggregate_test

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/apid/apid/aggregate"
)

const host = "10.5.0.2"

func marshal(t testing.TB, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatalf("marshal: %v", err)
	}
	return b
}

func decodeVersions(t testing.TB, b []byte) *machine.VersionResponse {
	t.Helper()
	var r machine.VersionResponse
	if err := proto.Unmarshal(b, &r); err != nil {
		t.Fatalf("decode as machine.VersionResponse: %v", err)
	}
	return &r
}

func version(tag string, md *common.Metadata) *machine.Version {
	return &machine.Version{
		Metadata: md,
		Version:  &machine.VersionInfo{Tag: tag, Sha: "abc123", Arch: "amd64"},
		Platform: &machine.PlatformInfo{Name: "metal", Mode: "metal"},
	}
}

// Wire builders for hand-made inputs.
func bytesField(num protowire.Number, v []byte) []byte {
	b := protowire.AppendTag(nil, num, protowire.BytesType)
	return protowire.AppendBytes(b, v)
}

func varintField(num protowire.Number, v uint64) []byte {
	b := protowire.AppendTag(nil, num, protowire.VarintType)
	return protowire.AppendVarint(b, v)
}

func cat(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// stampOf is the field 1 StampReply appends: Metadata{hostname: h}.
func stampOf(h string) []byte { return bytesField(1, bytesField(1, []byte(h))) }

func TestStampReplyDecodes(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name string
		in   *machine.VersionResponse
		want *machine.VersionResponse
	}{
		{
			name: "one entry",
			in:   &machine.VersionResponse{Messages: []*machine.Version{version("v1.9.0", nil)}},
			want: &machine.VersionResponse{Messages: []*machine.Version{version("v1.9.0", &common.Metadata{Hostname: host})}},
		},
		{
			name: "three entries each stamped",
			in: &machine.VersionResponse{Messages: []*machine.Version{
				version("v1", nil), version("v2", nil), version("v3", nil),
			}},
			want: &machine.VersionResponse{Messages: []*machine.Version{
				version("v1", &common.Metadata{Hostname: host}),
				version("v2", &common.Metadata{Hostname: host}),
				version("v3", &common.Metadata{Hostname: host}),
			}},
		},
		{
			name: "backend metadata: hostname overwritten, error kept",
			in: &machine.VersionResponse{Messages: []*machine.Version{
				version("v1", &common.Metadata{Hostname: "backend-name", Error: "partial"}),
				version("v2", &common.Metadata{Error: "other"}),
			}},
			want: &machine.VersionResponse{Messages: []*machine.Version{
				version("v1", &common.Metadata{Hostname: host, Error: "partial"}),
				version("v2", &common.Metadata{Hostname: host, Error: "other"}),
			}},
		},
		{
			name: "entry with nothing set",
			in:   &machine.VersionResponse{Messages: []*machine.Version{{}}},
			want: &machine.VersionResponse{Messages: []*machine.Version{{Metadata: &common.Metadata{Hostname: host}}}},
		},
		{
			name: "empty reply gets one entry",
			in:   &machine.VersionResponse{},
			want: &machine.VersionResponse{Messages: []*machine.Version{{Metadata: &common.Metadata{Hostname: host}}}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			in := marshal(t, tt.in)
			prefix := []byte("keep")
			out, err := aggregate.StampReply(bytes.Clone(prefix), in, host)
			if err != nil {
				t.Fatalf("StampReply: %v", err)
			}
			if !bytes.HasPrefix(out, prefix) {
				t.Fatalf("dst prefix not kept: %q", out[:len(prefix)])
			}
			out = out[len(prefix):]
			if got := decodeVersions(t, out); !proto.Equal(got, tt.want) {
				t.Errorf("decoded\n got %v\nwant %v", got, tt.want)
			}
			n, err := aggregate.StampedReplySize(in, host)
			if err != nil || n != len(out) {
				t.Errorf("StampedReplySize = %d, %v; output is %d bytes", n, err, len(out))
			}
		})
	}
}

func TestStampReplyBytes(t *testing.T) {
	t.Parallel()

	entryA := cat(bytesField(2, []byte("payload")), varintField(9, 7)) // 9 is unknown to every Talos type
	entryB := cat(bytesField(1, bytesField(1, []byte("old"))), bytesField(3, []byte("x")))
	grown := func(entry []byte) []byte { return bytesField(1, cat(entry, stampOf(host))) }
	only := bytesField(1, stampOf(host))

	tests := []struct {
		name      string
		in, want  []byte
		otherHost string
	}{
		{name: "empty", in: nil, want: only},
		{name: "empty entry", in: bytesField(1, nil), want: grown(nil)},
		{
			name: "only other fields: copied, entry appended",
			in:   cat(varintField(2, 1), bytesField(3, []byte("z"))),
			want: cat(varintField(2, 1), bytesField(3, []byte("z")), only),
		},
		{
			name: "unknown fields between entries stay in place",
			in:   cat(varintField(7, 300), bytesField(1, entryA), protowire.AppendFixed32(protowire.AppendTag(nil, 5, protowire.Fixed32Type), 9), bytesField(1, entryB), protowire.AppendFixed64(protowire.AppendTag(nil, 6, protowire.Fixed64Type), 1)),
			want: cat(varintField(7, 300), grown(entryA), protowire.AppendFixed32(protowire.AppendTag(nil, 5, protowire.Fixed32Type), 9), grown(entryB), protowire.AppendFixed64(protowire.AppendTag(nil, 6, protowire.Fixed64Type), 1)),
		},
		{
			// 0x8a 0x00 is field 1, bytes, in a two-byte (non-minimal) tag.
			name: "non-minimal tag re-emitted canonically",
			in:   cat([]byte{0x8a, 0x00}, protowire.AppendBytes(nil, entryA)),
			want: grown(entryA),
		},
		{
			name: "length grows past one varint byte",
			in:   bytesField(1, bytesField(2, bytes.Repeat([]byte{'a'}, 120))),
			want: grown(bytesField(2, bytes.Repeat([]byte{'a'}, 120))),
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			out, err := aggregate.StampReply(nil, tt.in, host)
			if err != nil {
				t.Fatalf("StampReply: %v", err)
			}
			if !bytes.Equal(out, tt.want) {
				t.Errorf("StampReply\n got %x\nwant %x", out, tt.want)
			}
			if n, _ := aggregate.StampedReplySize(tt.in, host); n != len(out) {
				t.Errorf("StampedReplySize = %d, output is %d bytes", n, len(out))
			}
		})
	}
}

// malformed lists inputs that no stamping function may accept.
var malformed = []struct {
	name  string
	in    []byte
	cause error // also wrapped, when set
}{
	{name: "truncated tag", in: []byte{0x80}, cause: io.ErrUnexpectedEOF},
	{name: "truncated length", in: []byte{0x0a}, cause: io.ErrUnexpectedEOF},
	{name: "length past end", in: []byte{0x0a, 0x05, 0x01}, cause: io.ErrUnexpectedEOF},
	{name: "truncated varint value", in: []byte{0x10, 0xff}, cause: io.ErrUnexpectedEOF},
	{name: "truncated fixed64", in: []byte{0x11, 1, 2, 3}, cause: io.ErrUnexpectedEOF},
	{name: "varint overflow", in: cat([]byte{0x10}, bytes.Repeat([]byte{0xff}, 10), []byte{0x01})},
	{name: "field number 0", in: []byte{0x02, 0x00}},
	{name: "field number above max", in: protowire.AppendVarint(nil, uint64(protowire.MaxValidNumber+1)<<3|2)},
	{name: "reserved wire type", in: []byte{0x0e, 0x00}},
	{name: "start group", in: []byte{0x13, 0x14}},
	{name: "end group", in: []byte{0x14}},
	{name: "field 1 as varint", in: varintField(1, 5)},
	{name: "field 1 as fixed32", in: []byte{0x0d, 1, 2, 3, 4}},
	{name: "valid entry then garbage", in: cat(bytesField(1, bytesField(2, []byte("ok"))), []byte{0xff})},
	{name: "garbage", in: []byte("\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff")},
}

// malformedEntries are replies whose top level is fine but an entry is broken.
var malformedEntries = []struct {
	name string
	in   []byte
}{
	{name: "entry truncated inside", in: bytesField(1, []byte{0x12, 0x05, 'a'})},
	{name: "entry metadata as varint", in: bytesField(1, varintField(1, 1))},
	{name: "entry with group", in: bytesField(1, []byte{0x1b, 0x1c})},
	{name: "second entry broken", in: cat(bytesField(1, nil), bytesField(1, []byte{0x80}))},
}

func TestStampReplyMalformed(t *testing.T) {
	t.Parallel()

	type tc struct {
		name  string
		in    []byte
		cause error
	}
	var cases []tc
	for _, m := range malformed {
		cases = append(cases, tc{m.name, m.in, m.cause})
	}
	for _, m := range malformedEntries {
		cases = append(cases, tc{m.name, m.in, nil})
	}
	real := marshal(t, &machine.VersionResponse{Messages: []*machine.Version{version("v1", nil)}})
	cases = append(cases, tc{"real reply cut short", real[:len(real)-1], io.ErrUnexpectedEOF})

	for _, tt := range cases {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			dst := []byte("prefix")
			out, err := aggregate.StampReply(dst, tt.in, host)
			if !errors.Is(err, aggregate.ErrMalformed) {
				t.Fatalf("StampReply error = %v, want ErrMalformed", err)
			}
			if tt.cause != nil && !errors.Is(err, tt.cause) {
				t.Errorf("StampReply error = %v, want it to wrap %v", err, tt.cause)
			}
			if string(out) != "prefix" {
				t.Errorf("StampReply changed dst on error: %q", out)
			}
			if _, err := aggregate.StampedReplySize(tt.in, host); !errors.Is(err, aggregate.ErrMalformed) {
				t.Errorf("StampedReplySize error = %v, want ErrMalformed", err)
			}
		})
	}
}

func TestStampMessage(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name string
		in   *common.Data
	}{
		{name: "data", in: &common.Data{Bytes: []byte("log line\n")}},
		{name: "backend metadata overwritten", in: &common.Data{Metadata: &common.Metadata{Hostname: "self", Error: "kept"}, Bytes: []byte{0, 1, 2}}},
		{name: "empty message", in: &common.Data{}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			in := marshal(t, tt.in)
			out, err := aggregate.StampMessage([]byte("x"), in, host)
			if err != nil {
				t.Fatalf("StampMessage: %v", err)
			}
			out = out[1:]
			if want := cat(in, stampOf(host)); !bytes.Equal(out, want) {
				t.Errorf("StampMessage\n got %x\nwant %x", out, want)
			}
			var got common.Data
			if err := proto.Unmarshal(out, &got); err != nil {
				t.Fatalf("decode as common.Data: %v", err)
			}
			want := proto.Clone(tt.in).(*common.Data)
			if want.Metadata == nil {
				want.Metadata = &common.Metadata{}
			}
			want.Metadata.Hostname = host
			if !proto.Equal(&got, want) {
				t.Errorf("decoded\n got %v\nwant %v", &got, want)
			}
		})
	}
}

func TestStampMessageMalformed(t *testing.T) {
	t.Parallel()

	for _, tt := range malformed {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			out, err := aggregate.StampMessage([]byte("p"), tt.in, host)
			if !errors.Is(err, aggregate.ErrMalformed) {
				t.Fatalf("StampMessage error = %v, want ErrMalformed", err)
			}
			if string(out) != "p" {
				t.Errorf("StampMessage changed dst on error: %q", out)
			}
		})
	}
}

// wantMeta is what an error entry's common.Metadata should hold.
type wantMeta struct {
	host, msg string
	code      int32
}

func checkMeta(t *testing.T, md *common.Metadata, want wantMeta) {
	t.Helper()
	printed := fmt.Sprintf("rpc error: code = %s desc = %s", codes.Code(want.code), want.msg)
	if md.GetHostname() != want.host || md.GetError() != printed ||
		md.GetStatus().GetCode() != want.code || md.GetStatus().GetMessage() != want.msg {
		t.Errorf("metadata = %v, want hostname %q, error %q, status message %q, code %d", md, want.host, printed, want.msg, want.code)
	}
}

func TestErrorEntries(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name     string
		host     string
		code     codes.Code
		msg      string
		wantHost string
		wantMsg  string
		wantCode int32
	}{
		{name: "unavailable", host: host, code: codes.Unavailable, msg: "connection refused", wantHost: host, wantMsg: "connection refused", wantCode: 14},
		{name: "deadline", host: "node-1", code: codes.DeadlineExceeded, msg: "context deadline exceeded", wantHost: "node-1", wantMsg: "context deadline exceeded", wantCode: 4},
		{name: "empty message uses the code name", host: host, code: codes.PermissionDenied, wantHost: host, wantMsg: "PermissionDenied", wantCode: 7},
		{name: "long message", host: host, code: codes.Internal, msg: strings.Repeat("e", 300), wantHost: host, wantMsg: strings.Repeat("e", 300), wantCode: 13},
		{name: "invalid UTF-8 replaced", host: "n\xff\xfe", code: codes.Unknown, msg: "bad \xc3 byte", wantHost: "n\uFFFD", wantMsg: "bad \uFFFD byte", wantCode: 2},
		{name: "code beyond int32", host: host, code: codes.Code(1 << 31), msg: "odd", wantHost: host, wantMsg: "odd", wantCode: -1 << 31},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			want := wantMeta{tt.wantHost, tt.wantMsg, tt.wantCode}

			reply := aggregate.AppendErrorReply([]byte("p"), tt.host, tt.code, tt.msg)[1:]
			if n := aggregate.ErrorReplySize(tt.host, tt.code, tt.msg); n != len(reply) {
				t.Errorf("ErrorReplySize = %d, reply is %d bytes", n, len(reply))
			}
			var r common.EmptyResponse
			if err := proto.Unmarshal(reply, &r); err != nil {
				t.Fatalf("decode reply: %v", err)
			}
			if len(r.Messages) != 1 {
				t.Fatalf("reply has %d entries, want 1", len(r.Messages))
			}
			checkMeta(t, r.Messages[0].GetMetadata(), want)
			// The same entry decodes under any reply type of the layout.
			checkMeta(t, decodeVersions(t, reply).Messages[0].GetMetadata(), want)

			msg := aggregate.AppendErrorMessage(nil, tt.host, tt.code, tt.msg)
			var d common.Data
			if err := proto.Unmarshal(msg, &d); err != nil {
				t.Fatalf("decode message: %v", err)
			}
			checkMeta(t, d.GetMetadata(), want)
		})
	}
}

func TestStampInvalidUTF8Host(t *testing.T) {
	t.Parallel()

	reply := marshal(t, &machine.VersionResponse{Messages: []*machine.Version{version("v1", nil), version("v2", nil)}})
	msg := marshal(t, &common.Data{Bytes: []byte("b")})
	tests := []struct{ host, want string }{
		{host: "node-\xff\xff-\xe2\x82", want: "node-\uFFFD-\uFFFD"},
		// Three bad bytes become one three-byte U+FFFD: same length, different bytes.
		{host: "0000\x8e\xb1\xff", want: "0000\uFFFD"},
		{host: "ok-\uFFFD", want: "ok-\uFFFD"},
	}
	for _, tt := range tests {
		out, err := aggregate.StampReply(nil, reply, tt.host)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range decodeVersions(t, out).Messages {
			if got := m.GetMetadata().GetHostname(); got != tt.want {
				t.Errorf("StampReply host %q: hostname = %q, want %q", tt.host, got, tt.want)
			}
		}
		if n, _ := aggregate.StampedReplySize(reply, tt.host); n != len(out) {
			t.Errorf("StampedReplySize = %d, output is %d bytes", n, len(out))
		}
		out, err = aggregate.StampMessage(nil, msg, tt.host)
		if err != nil {
			t.Fatal(err)
		}
		var d common.Data
		if err := proto.Unmarshal(out, &d); err != nil || d.GetMetadata().GetHostname() != tt.want {
			t.Errorf("StampMessage host %q: decoded %v, %v", tt.host, &d, err)
		}
	}
}

func TestMerge(t *testing.T) {
	t.Parallel()

	one := marshal(t, &machine.VersionResponse{Messages: []*machine.Version{version("a1", nil)}})
	two := marshal(t, &machine.VersionResponse{Messages: []*machine.Version{version("b1", nil), version("b2", &common.Metadata{Hostname: "x"})}})
	parts := []aggregate.Part{
		{Host: "a", Body: one},
		{Host: "b", Body: two},
		{Host: "c", Code: codes.Unavailable, Message: "dial tcp: connection refused"},
		{Host: "d", Body: []byte{0x0a, 0x05, 0x01}},
		{Host: "e"},
		{Host: "f", Body: bytesField(1, varintField(1, 3))},
	}
	out := aggregate.Merge(parts)

	type entry struct {
		host, tag, err string
		code           int32
	}
	want := []entry{
		{host: "a", tag: "a1"},
		{host: "b", tag: "b1"},
		{host: "b", tag: "b2"},
		{host: "c", err: "dial tcp: connection refused", code: int32(codes.Unavailable)},
		{host: "d", err: "malformed reply: field at offset 0: unexpected EOF", code: int32(codes.Internal)},
		{host: "e"},
		{host: "f", err: "malformed reply: entry at offset 2: field at offset 2: field 1 is not length-delimited", code: int32(codes.Internal)},
	}
	got := decodeVersions(t, out).Messages
	if len(got) != len(want) {
		t.Fatalf("merged reply has %d entries, want %d: %v", len(got), len(want), got)
	}
	for i, w := range want {
		md := got[i].GetMetadata()
		g := entry{md.GetHostname(), got[i].GetVersion().GetTag(), md.GetStatus().GetMessage(), md.GetStatus().GetCode()}
		if g != w {
			t.Errorf("entry %d = %+v, want %+v", i, g, w)
		}
		if w.err != "" && md.GetError() != fmt.Sprintf("rpc error: code = %s desc = %s", codes.Code(w.code), w.err) {
			t.Errorf("entry %d error = %q, want the status as grpc-go prints it", i, md.GetError())
		}
	}
	if len(out) != cap(out) {
		t.Errorf("Merge sized %d bytes but wrote %d", cap(out), len(out))
	}

	if got := aggregate.Merge(nil); len(got) != 0 {
		t.Errorf("Merge(nil) = %x, want empty", got)
	}
}

func TestHotPathAllocations(t *testing.T) {
	reply := marshal(t, &machine.VersionResponse{Messages: []*machine.Version{version("v1", nil), version("v2", nil)}})
	msg := marshal(t, &common.Data{Bytes: bytes.Repeat([]byte{1}, 200)})
	dst := make([]byte, 0, 4096)
	parts := []aggregate.Part{
		{Host: "a", Body: reply},
		{Host: "b", Code: codes.Unavailable, Message: "down"},
		{Host: "c", Body: []byte{0x0a, 0x05}}, // malformed: its error text is rendered in place
		{Host: "d"},
	}

	tests := []struct {
		name string
		fn   func()
		want float64
	}{
		{"StampedReplySize", func() { _, _ = aggregate.StampedReplySize(reply, host) }, 0},
		{"StampReply into roomy dst", func() { _, _ = aggregate.StampReply(dst, reply, host) }, 0},
		{"StampReply into nil", func() { _, _ = aggregate.StampReply(nil, reply, host) }, 1},
		{"StampMessage into roomy dst", func() { _, _ = aggregate.StampMessage(dst, msg, host) }, 0},
		{"ErrorReplySize", func() { _ = aggregate.ErrorReplySize(host, codes.Unavailable, "down") }, 0},
		{"Merge", func() { _ = aggregate.Merge(parts) }, 1},
		{"AppendErrorReply into roomy dst", func() { _ = aggregate.AppendErrorReply(dst, host, codes.Unavailable, "down") }, 0},
	}
	for _, tt := range tests {
		if got := testing.AllocsPerRun(50, tt.fn); got != tt.want {
			t.Errorf("%s: %v allocations, want %v", tt.name, got, tt.want)
		}
	}
}

// Merge remembers which bodies it validated for a bounded number of parts;
// past that it must still turn a bad body into an error entry.
func TestMergeManyParts(t *testing.T) {
	t.Parallel()

	body := marshal(t, &machine.VersionResponse{Messages: []*machine.Version{version("v", nil)}})
	parts := make([]aggregate.Part, 1500)
	for i := range parts {
		parts[i] = aggregate.Part{Host: "n", Body: body}
	}
	bad := map[int]bool{3: true, 1023: true, 1024: true, 1499: true}
	for i := range bad {
		parts[i].Body = []byte{0x08}
	}
	out := aggregate.Merge(parts)
	if len(out) != cap(out) {
		t.Errorf("Merge sized %d bytes but wrote %d", cap(out), len(out))
	}
	got := decodeVersions(t, out).Messages
	if len(got) != len(parts) {
		t.Fatalf("merged reply has %d entries, want %d", len(got), len(parts))
	}
	for i, m := range got {
		isErr := m.GetMetadata().GetStatus().GetCode() == int32(codes.Internal)
		if isErr != bad[i] || m.GetMetadata().GetHostname() != "n" {
			t.Errorf("entry %d = %v, want error %v", i, m, bad[i])
		}
	}
}

func TestMergeWithinMakesEveryOutcomeExplicitAndBoundsTheMerge(t *testing.T) {
	small := marshal(t, &machine.VersionResponse{Messages: []*machine.Version{version("v1", nil)}})
	big := marshal(t, &machine.VersionResponse{Messages: []*machine.Version{{Version: &machine.VersionInfo{Sha: strings.Repeat("x", 4096)}}}})
	parts := []aggregate.Part{
		{Host: "a", Body: small},
		{Host: "big", Body: big},
		{Host: "bad", Body: []byte{0x08, 0x01}},
		{Host: "down", Code: codes.Unavailable, Message: "refused"},
	}
	reply, fitted := aggregate.MergeWithin(parts, 0)
	var got []codes.Code
	for _, p := range fitted {
		got = append(got, p.Code)
	}
	if !slices.Equal(got, []codes.Code{codes.OK, codes.OK, codes.Internal, codes.Unavailable}) || parts[2].Code != codes.OK {
		t.Fatalf("MergeWithin without a bound gave %v (input changed: %v)", got, parts[2].Code != codes.OK)
	}
	if !bytes.Equal(reply, aggregate.Merge(parts)) || !bytes.Equal(aggregate.Merge(fitted), reply) {
		t.Fatal("MergeWithin without a bound, or the merge of its explicit parts, differs from Merge")
	}
	reply, fitted = aggregate.MergeWithin(parts, 2048)
	if fitted[1].Code != codes.ResourceExhausted || fitted[0].Code != codes.OK {
		t.Fatalf("MergeWithin 2 KiB kept %v, %v; want the big reply left out", fitted[0].Code, fitted[1].Code)
	}
	if n := len(reply); n > 2048 || !bytes.Equal(reply, aggregate.Merge(fitted)) {
		t.Fatalf("merge within 2048 bytes is %d bytes, or not the merge of the parts it reports", n)
	}
}
