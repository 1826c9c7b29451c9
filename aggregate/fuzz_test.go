package aggregate_test

import (
	"bytes"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"

	"github.com/apid/apid/aggregate"
)

// The fuzz targets run only their seed corpus under plain `go test`; explore
// with e.g. go test -run='^$' -fuzz=FuzzStampReply -fuzztime=30s ./aggregate/

func seedReplies(f *testing.F) {
	for _, r := range []*machine.VersionResponse{
		{},
		{Messages: []*machine.Version{version("v1.9.0", nil)}},
		{Messages: []*machine.Version{version("v1", &common.Metadata{Hostname: "h", Error: "e"}), {}, version("v3", nil)}},
	} {
		f.Add(marshal(f, r), host)
	}
	f.Add(marshal(f, &common.Data{Bytes: []byte("line")}), "node-\xff")
	for _, m := range malformed {
		f.Add(m.in, host)
	}
	for _, m := range malformedEntries {
		f.Add(m.in, "")
	}
}

// fields splits b into top-level fields, failing the test if b is not
// well-formed wire data.
func fields(t *testing.T, b []byte) (nums []protowire.Number, vals [][]byte) {
	t.Helper()
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			t.Fatalf("output tag: %v", protowire.ParseError(n))
		}
		b = b[n:]
		n = protowire.ConsumeFieldValue(num, typ, b)
		if n < 0 {
			t.Fatalf("output field %d: %v", num, protowire.ParseError(n))
		}
		v := b[:n]
		if typ == protowire.BytesType {
			v, _ = protowire.ConsumeBytes(b)
		} else if num == 1 {
			t.Fatalf("output field 1 has wire type %d", typ)
		}
		nums, vals = append(nums, num), append(vals, v)
		b = b[n:]
	}
	return nums, vals
}

// lastStampedHost decodes the last field 1 of an entry or streamed message,
// which must be the stamp, as common.Metadata.
func lastStampedHost(t *testing.T, msg []byte) string {
	t.Helper()
	nums, vals := fields(t, msg)
	for i := len(nums) - 1; i >= 0; i-- {
		if nums[i] == 1 {
			var md common.Metadata
			if err := proto.Unmarshal(vals[i], &md); err != nil {
				t.Fatalf("stamp does not decode as common.Metadata: %v", err)
			}
			return md.GetHostname()
		}
	}
	t.Fatal("no field 1 in stamped message")
	return ""
}

func FuzzStampReply(f *testing.F) {
	seedReplies(f)
	f.Fuzz(func(t *testing.T, reply []byte, host string) {
		wantHost := strings.ToValidUTF8(host, "\uFFFD")
		out, err := aggregate.StampReply(nil, reply, host)
		n, sizeErr := aggregate.StampedReplySize(reply, host)
		merged := aggregate.Merge([]aggregate.Part{{Host: host, Body: reply}})
		if within, _ := aggregate.MergeWithin([]aggregate.Part{{Host: host, Body: reply}}, 0); !bytes.Equal(within, merged) {
			t.Fatal("MergeWithin without a bound differs from Merge")
		}
		if err != nil {
			if !errors.Is(err, aggregate.ErrMalformed) || !errors.Is(sizeErr, aggregate.ErrMalformed) {
				t.Fatalf("StampReply error %v, StampedReplySize error %v; want both ErrMalformed", err, sizeErr)
			}
			md := decodeVersions(t, merged).GetMessages()[0].GetMetadata()
			if md.GetHostname() != wantHost || md.GetStatus().GetCode() != int32(codes.Internal) ||
				!strings.HasPrefix(md.GetError(), "rpc error: code = Internal desc = malformed reply: ") {
				t.Fatalf("Merge of a malformed part gave %v", md)
			}
			return
		}
		if sizeErr != nil || n != len(out) {
			t.Fatalf("StampedReplySize = %d, %v; output is %d bytes", n, sizeErr, len(out))
		}
		if !bytes.Equal(merged, out) {
			t.Fatalf("Merge of one part differs from StampReply")
		}

		// Every entry, old or added, ends with our stamp.
		nums, vals := fields(t, out)
		entries := 0
		for i, num := range nums {
			if num == 1 {
				entries++
				if got := lastStampedHost(t, vals[i]); got != wantHost {
					t.Fatalf("entry %d stamped %q, want %q", entries, got, wantHost)
				}
			}
		}
		if entries == 0 {
			t.Fatal("stamped reply has no entry")
		}

		// Stamping never makes a reply the client could read unreadable.
		for _, typ := range []proto.Message{&machine.VersionResponse{}, &common.EmptyResponse{}} {
			if proto.Unmarshal(reply, typ) != nil {
				continue
			}
			if err := proto.Unmarshal(out, typ); err != nil {
				t.Fatalf("input decodes as %T but output does not: %v", typ, err)
			}
		}
		var in, got machine.VersionResponse
		if proto.Unmarshal(reply, &in) == nil {
			_ = proto.Unmarshal(out, &got)
			if want := max(len(in.Messages), 1); len(got.Messages) != want {
				t.Fatalf("output has %d entries, want %d", len(got.Messages), want)
			}
			for i, m := range got.Messages {
				if m.GetMetadata().GetHostname() != wantHost {
					t.Fatalf("entry %d hostname %q, want %q", i, m.GetMetadata().GetHostname(), wantHost)
				}
			}
		}
	})
}

func FuzzStampMessage(f *testing.F) {
	seedReplies(f)
	f.Add(marshal(f, &common.Data{Metadata: &common.Metadata{Hostname: "old"}, Bytes: bytes.Repeat([]byte{7}, 300)}), host)
	f.Fuzz(func(t *testing.T, msg []byte, host string) {
		wantHost := strings.ToValidUTF8(host, "\uFFFD")
		out, err := aggregate.StampMessage(nil, msg, host)
		if err != nil {
			if !errors.Is(err, aggregate.ErrMalformed) {
				t.Fatalf("StampMessage error %v does not wrap ErrMalformed", err)
			}
			return
		}
		if !bytes.HasPrefix(out, msg) {
			t.Fatal("message not copied verbatim")
		}
		if got := lastStampedHost(t, out); got != wantHost {
			t.Fatalf("stamped %q, want %q", got, wantHost)
		}
		var in, got common.Data
		if proto.Unmarshal(msg, &in) == nil {
			if err := proto.Unmarshal(out, &got); err != nil {
				t.Fatalf("input decodes as common.Data but output does not: %v", err)
			}
			if got.GetMetadata().GetHostname() != wantHost || !bytes.Equal(got.Bytes, in.Bytes) {
				t.Fatalf("decoded %v from input %v", &got, &in)
			}
		}
	})
}

func FuzzErrorEntry(f *testing.F) {
	f.Add(host, uint32(codes.Unavailable), "connection refused")
	f.Add("", uint32(0), "")
	f.Add("\xff", uint32(1<<31), "\xc3(")
	f.Fuzz(func(t *testing.T, host string, code uint32, msg string) {
		reply := aggregate.AppendErrorReply(nil, host, codes.Code(code), msg)
		if n := aggregate.ErrorReplySize(host, codes.Code(code), msg); n != len(reply) {
			t.Fatalf("ErrorReplySize = %d, reply is %d bytes", n, len(reply))
		}
		var r common.EmptyResponse
		if err := proto.Unmarshal(reply, &r); err != nil || len(r.Messages) != 1 {
			t.Fatalf("error reply decodes to %v, %v", &r, err)
		}
		md := r.Messages[0].GetMetadata()
		// metadata.error is the status as grpc-go prints the error, as
		// Talos writes it.
		printed := fmt.Sprintf("rpc error: code = %s desc = %s", codes.Code(md.GetStatus().GetCode()), md.GetStatus().GetMessage())
		if code != 0 {
			printed = status.FromProto(md.GetStatus()).Err().Error()
		}
		if md.GetStatus().GetMessage() == "" || md.GetError() != printed ||
			md.GetHostname() != strings.ToValidUTF8(host, "\uFFFD") || md.GetStatus().GetCode() != int32(code) {
			t.Fatalf("error entry %v for host %q code %d msg %q", md, host, code, msg)
		}
	})
}

// FuzzCheckMessage splits a message at up to three fuzzed points (as the
// transport may deliver it in several buffers) and checks that CheckMessage
// judges it exactly as StampMessage judges the whole, and that appending
// Stamp stamps it as StampMessage does.
func FuzzCheckMessage(f *testing.F) {
	seedReplies(f)
	f.Fuzz(func(t *testing.T, msg []byte, host string) {
		_, want := aggregate.StampMessage(nil, msg, host)
		cuts := []int{0, len(msg)}
		for i := 0; i < 3 && i < len(host); i++ {
			cuts = append(cuts, int(host[i])*len(msg)/255)
		}
		slices.Sort(cuts)
		var segs [][]byte
		for i := 1; i < len(cuts); i++ {
			segs = append(segs, msg[cuts[i-1]:cuts[i]])
		}
		got := aggregate.CheckMessage(segs...)
		if (got == nil) != (want == nil) || (got != nil && got.Error() != want.Error()) {
			t.Fatalf("CheckMessage over %d segments: %v; StampMessage: %v", len(segs), got, want)
		}
		if got == nil {
			stamped, _ := aggregate.StampMessage(nil, msg, host)
			if joined := append(slices.Clip(msg), aggregate.Stamp(host)...); !bytes.Equal(joined, stamped) {
				t.Fatalf("message + Stamp differs from StampMessage")
			}
		}
	})
}
