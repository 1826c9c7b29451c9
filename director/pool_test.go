package director

import (
	"context"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/testbackend"
)

func testPool(t *testing.T, cfg PoolConfig) *Pool {
	t.Helper()
	p := NewPool(cfg)
	t.Cleanup(func() { p.Close() })
	return p
}

// port returns the port of a host:port address.
func port(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, err := strconv.Atoi(p)
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func TestPoolSharesOneConnectionPerTarget(t *testing.T) {
	p := testPool(t, PoolConfig{})
	a, err := p.Conn("10.1.2.3")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := p.Conn("10.1.2.3")
	c, _ := p.Conn("10.1.2.4")
	if a != b || a == c || p.Len() != 2 {
		t.Fatalf("same target gave different connections or different targets the same (len %d)", p.Len())
	}
}

func TestPoolIsBoundedAgainstMadeUpNodes(t *testing.T) {
	p := testPool(t, PoolConfig{MaxConns: 8})
	for i := 0; i < 1000; i++ {
		if _, err := p.Conn(fmt.Sprintf("made-up-%d.invalid", i)); err != nil {
			t.Fatalf("idle connection not evicted for node %d: %v", i, err)
		}
		if p.Len() > 8 {
			t.Fatalf("pool grew to %d", p.Len())
		}
	}
}

func TestPoolRefusesWhenEveryConnectionIsBusy(t *testing.T) {
	backend := testbackend.Start(t, "b", testbackend.Behaviour{Hang: true})
	portNum := port(t, backend.Addr)
	p := testPool(t, PoolConfig{MaxConns: 1, Port: portNum})
	conn, err := p.Conn("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/machine.MachineService/Dmesg")
	if err != nil {
		t.Fatal(err)
	}
	_ = stream
	if _, err := p.Conn("127.0.0.2"); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("busy pool gave %v, want ResourceExhausted", err)
	}
	cancel()
	// Once the call ended the connection is idle and may be evicted.
	deadline := time.After(10 * time.Second)
	for {
		if _, err := p.Conn("127.0.0.2"); err == nil {
			break
		}
		select {
		case <-deadline:
			t.Fatal("connection still counted busy after its call ended")
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func TestPoolEvictsIdleButNotBusyConnections(t *testing.T) {
	backend := testbackend.Start(t, "b", testbackend.Behaviour{})
	portNum := port(t, backend.Addr)
	p := testPool(t, PoolConfig{Port: portNum, IdleTimeout: time.Hour})
	now := time.Now()
	p.now = func() time.Time { return now }

	conn, _ := p.Conn("127.0.0.1")
	if _, err := machine.NewMachineServiceClient(conn).Version(context.Background(), &emptypb.Empty{}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	busy, _ := p.Conn("localhost")
	if _, err := busy.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/machine.MachineService/Dmesg"); err != nil {
		t.Fatal(err)
	}

	now = now.Add(2 * time.Hour)
	p.evictIdle()
	if p.Len() != 1 {
		t.Fatalf("after eviction %d connections, want the busy one only", p.Len())
	}
	if cc := conn.(*poolConn).ClientConn; cc.GetState() != connectivity.Shutdown {
		t.Errorf("evicted connection is %v, want closed", cc.GetState())
	}
}

func TestPoolResetClosesBusyConnectionsWhenTheirCallsEnd(t *testing.T) {
	backend := testbackend.Start(t, "b", testbackend.Behaviour{Hang: true})
	portNum := port(t, backend.Addr)
	p := testPool(t, PoolConfig{Port: portNum})
	conn, _ := p.Conn("127.0.0.1")
	ctx, cancel := context.WithCancel(context.Background())
	if _, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/machine.MachineService/Dmesg"); err != nil {
		t.Fatal(err)
	}
	p.Reset()
	cc := conn.(*poolConn).ClientConn
	if cc.GetState() == connectivity.Shutdown {
		t.Fatal("reset closed a connection under a running call")
	}
	if again, _ := p.Conn("127.0.0.1"); again == conn {
		t.Fatal("reset pool handed out the retired connection")
	}
	cancel()
	waitCtx, done := context.WithTimeout(context.Background(), 10*time.Second)
	defer done()
	for s := cc.GetState(); s != connectivity.Shutdown; s = cc.GetState() {
		if !cc.WaitForStateChange(waitCtx, s) {
			t.Fatal("retired connection not closed after its last call")
		}
	}
}

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	accepted atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.accepted.Add(1)
	}
	return c, err
}

func TestPoolConcurrentCallsToANewNodeShareOneConnection(t *testing.T) {
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	lis := &countingListener{Listener: inner}
	backend := testbackend.New("b", testbackend.Behaviour{})
	go func() { _ = backend.Serve(lis) }()
	t.Cleanup(backend.Stop)

	p := testPool(t, PoolConfig{Port: port(t, inner.Addr().String())})
	var wg sync.WaitGroup
	errs := make(chan error, 50)
	for i := 0; i < 50; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			conn, err := p.Conn("127.0.0.1")
			if err == nil {
				_, err = machine.NewMachineServiceClient(conn).Version(context.Background(), &emptypb.Empty{})
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if n := lis.accepted.Load(); n != 1 {
		t.Fatalf("50 concurrent calls to one new node opened %d connections, want 1", n)
	}
}
