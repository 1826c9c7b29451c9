package proxy

import (
	"slices"

	"google.golang.org/grpc/encoding"
	_ "google.golang.org/grpc/encoding/proto" // registers the fallback codec
	"google.golang.org/grpc/mem"
)

// frame is one gRPC message exactly as the wire carried it. Exactly one of
// data (a reference-counted buffer handed over by gRPC, relayed without a
// copy) and raw (bytes this package built) is set.
type frame struct {
	data mem.BufferSlice
	raw  []byte
}

// bytes returns the frame's payload as one contiguous slice, copying only
// when gRPC delivered it in several buffers. The frame keeps ownership.
func (f *frame) bytes() []byte {
	if f.data == nil {
		return f.raw
	}
	if len(f.data) == 1 {
		return f.data[0].ReadOnlyData()
	}
	f.raw = f.data.Materialize()
	f.data.Free()
	f.data = nil
	return f.raw
}

// len returns the payload's length.
func (f *frame) len() int {
	if f.data != nil {
		return f.data.Len()
	}
	return len(f.raw)
}

// share returns a frame holding the same bytes as f, for one more send:
// received buffers gain a reference (each send frees its own), so a
// request sent to many backends is held once, never copied.
func (f *frame) share() *frame {
	if f.data == nil {
		return &frame{raw: f.raw}
	}
	f.data.Ref()
	return &frame{data: slices.Clone(f.data)}
}

// release returns any buffer still held to gRPC's pool.
func (f *frame) release() {
	if f.data != nil {
		f.data.Free()
		f.data = nil
	}
	f.raw = nil
}

// Codec returns the codec a proxying grpc.Server must be created with
// (grpc.ForceServerCodecV2). Frames of the proxy pass through it as raw bytes;
// every other value (a service registered beside the proxy, such as health
// or reflection) is handed to the standard protobuf codec.
func Codec() encoding.CodecV2 { return rawCodec{fallback: encoding.GetCodecV2("proto")} }

type rawCodec struct{ fallback encoding.CodecV2 }

func (c rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	f, ok := v.(*frame)
	if !ok {
		return c.fallback.Marshal(v)
	}
	if f.data != nil {
		// gRPC frees what Marshal returns once it is written: ownership of
		// the received buffer moves to the send, so nothing is copied.
		out := f.data
		f.data = nil
		return out, nil
	}
	return mem.BufferSlice{mem.SliceBuffer(f.raw)}, nil
}

func (c rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	f, ok := v.(*frame)
	if !ok {
		return c.fallback.Unmarshal(data, v)
	}
	data.Ref() // gRPC frees data when Unmarshal returns; keep it for the relay
	f.data = data
	f.raw = nil
	return nil
}

// Name keeps the standard content subtype so that peers see ordinary
// application/grpc+proto traffic.
func (c rawCodec) Name() string { return "proto" }
