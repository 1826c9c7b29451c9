package director

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"strings"
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

// conn gets target's connection from p, released when the test ends.
func conn(t *testing.T, p *Pool, target string) grpc.ClientConnInterface {
	t.Helper()
	c, release, err := p.Conn(target)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	return c
}

func TestPoolSharesOneConnectionPerNode(t *testing.T) {
	p := testPool(t, PoolConfig{})
	a := conn(t, p, "10.1.2.3")
	b := conn(t, p, "::ffff:10.1.2.3")
	c := conn(t, p, "10.1.2.4")
	d, e := conn(t, p, "[2001:db8::1]"), conn(t, p, "2001:DB8:0::1")
	f, g := conn(t, p, "Node-A.example"), conn(t, p, "node-a.example")
	if a != b || a == c || d != e || f != g || p.Len() != 4 {
		t.Fatalf("spellings of one node gave different connections or different nodes the same (len %d)", p.Len())
	}
}

func TestPoolIsBoundedAgainstMadeUpNodes(t *testing.T) {
	p := testPool(t, PoolConfig{MaxConns: 8})
	for i := 0; i < 1000; i++ {
		_, release, err := p.Conn(fmt.Sprintf("made-up-%d.invalid", i))
		if err != nil {
			t.Fatalf("node %d: %v", i, err)
		}
		if p.Len() > 8 {
			t.Fatalf("pool grew to %d", p.Len())
		}
		release()
	}
}

func TestPoolClosesAConnectionThatNeverWorkedWithItsLastCall(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := port(t, lis.Addr().String())
	lis.Close() // nothing listens there now: connections are refused
	p := testPool(t, PoolConfig{Port: dead})
	c, release, err := p.Conn("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := machine.NewMachineServiceClient(c).Version(ctx, &emptypb.Empty{}); status.Code(err) != codes.Unavailable {
		t.Fatalf("call to a dead node: %v, want Unavailable", err)
	}
	if p.Len() != 1 {
		t.Fatalf("pool holds %d connections during the call, want 1", p.Len())
	}
	release()
	if p.Len() != 0 {
		t.Fatalf("pool kept %d connections that never became ready", p.Len())
	}
	if s := c.(*grpc.ClientConn).GetState(); s != connectivity.Shutdown {
		t.Fatalf("connection that never worked is %v after its last call, want closed", s)
	}
}

func TestPoolKeepsAConnectionThatWorked(t *testing.T) {
	backend := testbackend.Start(t, "b", testbackend.Behaviour{})
	p := testPool(t, PoolConfig{Port: port(t, backend.Addr)})
	c, release, err := p.Conn("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := machine.NewMachineServiceClient(c).Version(context.Background(), &emptypb.Empty{}); err != nil {
		t.Fatal(err)
	}
	release()
	release() // a second release is a no-op
	if again := conn(t, p, "127.0.0.1"); again != c || p.Len() != 1 {
		t.Fatal("a connection that worked was not kept for the next call")
	}
}

// TestPoolNeverClosesAConnectionItHandedOut races Reset and idle eviction
// against a burst of calls: a call that got its connection must never find
// it closed (which gRPC reports as Canceled).
func TestPoolNeverClosesAConnectionItHandedOut(t *testing.T) {
	backend := testbackend.Start(t, "b", testbackend.Behaviour{})
	p := testPool(t, PoolConfig{Port: port(t, backend.Addr), IdleTimeout: time.Hour})
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	p.now = func() time.Time { return time.Unix(0, clock.Load()) }
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	stop := make(chan struct{})
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			clock.Add(int64(2 * time.Hour)) // every connection looks idle for long
			p.evictIdle()
			p.Reset()
		}
	})
	errs := make(chan error, 400)
	var calls sync.WaitGroup
	for i := range 400 {
		calls.Go(func() {
			c, release, err := p.Conn([]string{"127.0.0.1", "localhost"}[i%2])
			runtime.Gosched() // let the janitor run between handing out and using
			if err == nil {
				_, err = machine.NewMachineServiceClient(c).Version(ctx, &emptypb.Empty{})
				release()
			}
			errs <- err
		})
	}
	calls.Wait()
	close(stop)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatalf("a call lost its connection to eviction or Reset: %v", err)
		}
	}
}

func TestPoolRefusesWhenEveryConnectionIsBusy(t *testing.T) {
	backend := testbackend.Start(t, "b", testbackend.Behaviour{Hang: true})
	portNum := port(t, backend.Addr)
	p := testPool(t, PoolConfig{MaxConns: 1, Port: portNum})
	c, release, err := p.Conn("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := c.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/machine.MachineService/Dmesg"); err != nil {
		t.Fatal(err)
	}
	if _, _, err := p.Conn("127.0.0.2"); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("busy pool gave %v, want ResourceExhausted", err)
	}
	release()
	// Once the call ended the connection is idle and may be evicted.
	_, release2, err := p.Conn("127.0.0.2")
	if err != nil {
		t.Fatalf("connection still counted busy after its call ended: %v", err)
	}
	release2()
}

func TestPoolEvictsIdleButNotBusyConnections(t *testing.T) {
	backend := testbackend.Start(t, "b", testbackend.Behaviour{})
	portNum := port(t, backend.Addr)
	p := testPool(t, PoolConfig{Port: portNum, IdleTimeout: time.Hour})
	now := time.Now()
	p.now = func() time.Time { return now }

	idle, release, err := p.Conn("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := machine.NewMachineServiceClient(idle).Version(context.Background(), &emptypb.Empty{}); err != nil {
		t.Fatal(err)
	}
	release()
	busy := conn(t, p, "localhost")
	if _, err := machine.NewMachineServiceClient(busy).Version(context.Background(), &emptypb.Empty{}); err != nil {
		t.Fatal(err)
	}

	now = now.Add(2 * time.Hour)
	p.evictIdle()
	if p.Len() != 1 {
		t.Fatalf("after eviction %d connections, want the busy one only", p.Len())
	}
	if cc := idle.(*grpc.ClientConn); cc.GetState() != connectivity.Shutdown {
		t.Errorf("evicted connection is %v, want closed", cc.GetState())
	}
	if cc := busy.(*grpc.ClientConn); cc.GetState() == connectivity.Shutdown {
		t.Error("eviction closed a connection still handed out")
	}
}

func TestPoolResetClosesBusyConnectionsWhenTheirCallsEnd(t *testing.T) {
	backend := testbackend.Start(t, "b", testbackend.Behaviour{Hang: true})
	portNum := port(t, backend.Addr)
	p := testPool(t, PoolConfig{Port: portNum})
	c, release, err := p.Conn("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	if _, err := c.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true}, "/machine.MachineService/Dmesg"); err != nil {
		t.Fatal(err)
	}
	p.Reset()
	cc := c.(*grpc.ClientConn)
	if cc.GetState() == connectivity.Shutdown {
		t.Fatal("reset closed a connection under a running call")
	}
	if again := conn(t, p, "127.0.0.1"); again == c {
		t.Fatal("reset pool handed out the retired connection")
	}
	cancel()
	release()
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
			c, release, err := p.Conn("127.0.0.1")
			if err == nil {
				_, err = machine.NewMachineServiceClient(c).Version(context.Background(), &emptypb.Empty{})
				release()
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

// TestPoolReplacesAMovedNode: when the inventory moves a node (another
// address or identity under the same name), new calls get a new
// connection, and the old one is closed only when its last call ends.
func TestPoolReplacesAMovedNode(t *testing.T) {
	p := testPool(t, PoolConfig{Port: 1})
	old := Dest{Node: "cp-1", Host: "127.0.0.2", ServerName: "cp-1"}
	c1, release1, err := p.ConnTo(old)
	if err != nil {
		t.Fatal(err)
	}
	same, releaseSame, err := p.ConnTo(old)
	if err != nil || same != c1 {
		t.Fatalf("same destination: %v, new connection %v", err, same != c1)
	}
	releaseSame()
	moved := old
	moved.Host = "127.0.0.3"
	c2, release2, err := p.ConnTo(moved)
	if err != nil {
		t.Fatal(err)
	}
	defer release2()
	if c2 == c1 {
		t.Fatal("a moved node kept its old connection")
	}
	if s := c1.(*grpc.ClientConn).GetState(); s == connectivity.Shutdown {
		t.Fatal("the old connection was closed under a running call")
	}
	release1()
	if s := c1.(*grpc.ClientConn).GetState(); s != connectivity.Shutdown {
		t.Fatalf("the old connection is %s after its last call, want SHUTDOWN", s)
	}
	if snap := p.Snapshot(); len(snap) != 1 || snap[0].Node != "cp-1" {
		t.Fatalf("pool %v", snap)
	}
}

// TestPoolRefusesAddressesOutsideNodeNetworks: a name is checked where it
// resolves, at the dial.
func TestPoolRefusesAddressesOutsideNodeNetworks(t *testing.T) {
	p := testPool(t, PoolConfig{Port: 1})
	p.SetNetworks([]netip.Prefix{netip.MustParsePrefix("198.18.0.0/15")})
	cc, release, err := p.ConnTo(Dest{Node: "localhost", Host: "localhost"})
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	err = cc.Invoke(ctx, "/x.Y/Z", &emptypb.Empty{}, &emptypb.Empty{})
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "outside the networks nodes live in") {
		t.Fatalf("localhost outside 198.18.0.0/15: %v", err)
	}
}
