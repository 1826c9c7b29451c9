package bench

import (
	"fmt"
	"testing"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
)

// unarySizes are the Version reply payloads: a typical small reply and one
// large enough that copying it shows.
var unarySizes = []struct {
	name  string
	bytes int
}{
	{"64B", 64},
	{"64KiB", 64 << 10},
}

// BenchmarkUnary measures a one-to-one Version call: its latency with one
// caller, and the time per call when 32 callers share one connection.
func BenchmarkUnary(b *testing.B) {
	for _, size := range unarySizes {
		b.Run("size="+size.name, func(b *testing.B) {
			backend := testbackend.Start(b, "node", testbackend.Behaviour{Payload: size.bytes})
			vias := []string{viaDirect, viaApid, viaMwitkow, viaSiderolabs}
			clients := make(map[string]machine.MachineServiceClient, len(vias))
			for _, via := range vias {
				clients[via] = oneToOne(b, via, backend.Addr)
			}
			for _, callers := range []int{1, 32} {
				b.Run(fmt.Sprintf("callers=%d", callers), func(b *testing.B) {
					for _, via := range vias {
						b.Run("via="+via, func(b *testing.B) {
							benchVersion(b, clients[via], callers, size.bytes)
						})
					}
				})
			}
		})
	}
}

func benchVersion(b *testing.B, c machine.MachineServiceClient, callers, payload int) {
	ctx := benchContext(b)
	call := func() error {
		resp, err := c.Version(ctx, &emptypb.Empty{})
		if err != nil {
			return err
		}
		if n := len(resp.GetMessages()); n != 1 {
			return fmt.Errorf("%d entries, want 1", n)
		}
		if n := len(resp.Messages[0].GetVersion().GetSha()); n != payload {
			return fmt.Errorf("payload of %d bytes, want %d", n, payload)
		}
		return nil
	}
	// Connect and let the flow-control windows settle before timing.
	for range 2 * callers {
		if err := call(); err != nil {
			b.Fatal(err)
		}
	}
	runCalls(b, callers, call)
}
