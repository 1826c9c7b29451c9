package aggregate_test

import (
	"fmt"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/apid/apid/aggregate"
)

func ExampleMerge() {
	// What two backends answered to machine.MachineService/Version.
	fromA, _ := proto.Marshal(&machine.VersionResponse{Messages: []*machine.Version{
		{Version: &machine.VersionInfo{Tag: "v1.13.9"}},
	}})
	fromB, _ := proto.Marshal(&machine.VersionResponse{Messages: []*machine.Version{
		{Version: &machine.VersionInfo{Tag: "v1.13.8"}},
	}})

	reply := aggregate.Merge([]aggregate.Part{
		{Host: "10.5.0.2", Body: fromA},
		{Host: "10.5.0.3", Code: codes.Unavailable, Message: "connection refused"},
		{Host: "10.5.0.4", Body: fromB},
	})

	// The client decodes one reply with an entry per node, in request order.
	var merged machine.VersionResponse
	if err := proto.Unmarshal(reply, &merged); err != nil {
		panic(err)
	}
	for _, m := range merged.Messages {
		md := m.GetMetadata()
		if md.GetError() != "" {
			fmt.Printf("%s: error %d: %s\n", md.GetHostname(), md.GetStatus().GetCode(), md.GetError())
			continue
		}
		fmt.Printf("%s: %s\n", md.GetHostname(), m.GetVersion().GetTag())
	}
	// Output:
	// 10.5.0.2: v1.13.9
	// 10.5.0.3: error 14: rpc error: code = Unavailable desc = connection refused
	// 10.5.0.4: v1.13.8
}
