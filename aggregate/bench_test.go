package aggregate_test

import (
	"bytes"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"

	"github.com/apid/apid/aggregate"
)

// benchReply is a realistic one-entry Version reply of about 200 bytes.
func benchReply(b *testing.B) []byte {
	r := &machine.VersionResponse{Messages: []*machine.Version{{
		Version: &machine.VersionInfo{
			Tag: "v1.13.9", Sha: "0123456789abcdef0123456789abcdef01234567",
			Built: "2026-11-02T10:04:05Z", GoVersion: "go1.26.8", Os: "linux", Arch: "amd64",
		},
		Platform: &machine.PlatformInfo{Name: "metal", Mode: "metal"},
		Features: &machine.FeaturesInfo{Rbac: true},
	}}}
	body := marshal(b, r)
	// Pad to ~200 B with an unknown field, as a newer backend might send.
	return append(body, bytesField(15, bytes.Repeat([]byte{'x'}, 200-len(body)-3))...)
}

func BenchmarkStampReply(b *testing.B) {
	reply := benchReply(b)
	b.Run("reuse dst", func(b *testing.B) {
		dst := make([]byte, 0, 1024)
		b.SetBytes(int64(len(reply)))
		b.ReportAllocs()
		for b.Loop() {
			if _, err := aggregate.StampReply(dst[:0], reply, host); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("nil dst", func(b *testing.B) {
		b.SetBytes(int64(len(reply)))
		b.ReportAllocs()
		for b.Loop() {
			if _, err := aggregate.StampReply(nil, reply, host); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkStampMessage(b *testing.B) {
	msg := marshal(b, &common.Data{Bytes: bytes.Repeat([]byte{'l'}, 200)})
	dst := make([]byte, 0, 1024)
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	for b.Loop() {
		if _, err := aggregate.StampMessage(dst[:0], msg, host); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkMerge(b *testing.B) {
	reply := benchReply(b)
	parts := make([]aggregate.Part, 100)
	for i := range parts {
		parts[i] = aggregate.Part{Host: "10.5.0." + string(rune('0'+i%10)), Body: reply}
	}
	parts[10] = aggregate.Part{Host: "10.5.0.99", Code: codes.Unavailable, Message: "connection refused"}
	b.SetBytes(int64(100 * len(reply)))
	b.ReportAllocs()
	for b.Loop() {
		_ = aggregate.Merge(parts)
	}
}
