package node_test

import (
	"context"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/node"
)

// Serve an agent on a unix socket and call it with the generated Talos
// client, as apid does when it proxies to a node.
func Example() {
	dir, err := os.MkdirTemp("", "agent-example")
	if err != nil {
		log.Fatal(err)
	}
	defer os.RemoveAll(dir)
	addr := "unix://" + filepath.Join(dir, "agent.sock")

	lis, err := node.Listen(addr)
	if err != nil {
		log.Fatal(err)
	}
	a := node.New(node.Config{Hostname: "node-1"})
	g := grpc.NewServer(a.ServerOptions()...)
	a.Register(g)
	served := make(chan error, 1)
	go func() { served <- g.Serve(lis) }()
	defer func() { g.Stop(); <-served; a.Close() }()

	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		log.Fatal(err)
	}
	defer conn.Close()
	resp, err := machine.NewMachineServiceClient(conn).Hostname(context.Background(), &emptypb.Empty{})
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(resp.GetMessages()[0].GetHostname())
	// Output: node-1
}
