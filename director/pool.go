package director

import (
	"context"
	"errors"
	"net"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// PoolConfig tunes a Pool.
type PoolConfig struct {
	// Port is where the apid of every other node listens. Default 50000.
	Port int
	// IdleTimeout closes a connection that carried no call for this long.
	// Default 5 minutes.
	IdleTimeout time.Duration
	// MaxConns bounds the number of nodes connected at once; when full, idle
	// connections are closed oldest first, and a new node is refused only
	// when every connection is busy. Default 1024.
	MaxConns int
	// MaxDials bounds the connection attempts (TCP connects) in progress at
	// once across all nodes, so a fan-out to a thousand new nodes does not
	// open a thousand sockets and handshakes in the same instant. Default 64.
	MaxDials int
	// DialOptions are applied to every connection (keepalive, backoff,
	// message limits).
	DialOptions []grpc.DialOption
	// Credentials returns the transport credentials for the node named host
	// (a name or IP address without port or brackets): the TLS server name
	// to verify is per node. Nil means insecure, which only tests use.
	Credentials func(host string) credentials.TransportCredentials
}

func (c PoolConfig) withDefaults() PoolConfig {
	if c.Port == 0 {
		c.Port = 50000
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = 5 * time.Minute
	}
	if c.MaxConns <= 0 {
		c.MaxConns = 1024
	}
	if c.MaxDials <= 0 {
		c.MaxDials = 64
	}
	return c
}

// Pool holds one connection per node target, created on first use and
// closed once idle, so that naming made-up nodes cannot grow it without
// bound.
type Pool struct {
	cfg  PoolConfig
	now  func() time.Time
	mu   sync.Mutex
	live map[string]*poolConn

	dials   chan struct{} // semaphore of connection attempts
	stop    context.CancelFunc
	stopped chan struct{}
}

// poolConn is a pooled connection that counts the calls using it, so the
// pool never closes a connection under a running stream.
type poolConn struct {
	*grpc.ClientConn
	active    atomic.Int64
	lastUsed  atomic.Int64 // unix nanoseconds
	retired   atomic.Bool  // out of the pool: close when the last call ends
	closeOnce sync.Once
}

// NewPool returns a Pool and starts its janitor, which runs until Close.
func NewPool(cfg PoolConfig) *Pool {
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{cfg: cfg, now: time.Now, live: map[string]*poolConn{}, dials: make(chan struct{}, cfg.MaxDials),
		stop: cancel, stopped: make(chan struct{})}
	go p.janitor(ctx)
	return p
}

// ErrPoolFull is returned when every pooled connection is busy and the pool
// may hold no more.
var ErrPoolFull = errors.New("connection pool is full: every connection is busy")

// Conn returns the connection to target's apid, creating it when needed.
// grpc.NewClient does not dial, so creation is cheap and never blocks on
// the network; the first call on the connection does the dialling.
func (p *Pool) Conn(target string) (grpc.ClientConnInterface, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.live[target]; ok {
		c.lastUsed.Store(p.now().UnixNano())
		return c, nil
	}
	if len(p.live) >= p.cfg.MaxConns && !p.evictOldestIdleLocked() {
		return nil, status.Error(codes.ResourceExhausted, ErrPoolFull.Error())
	}
	opts := append(slices.Clip(p.cfg.DialOptions), grpc.WithContextDialer(p.dial))
	if p.cfg.Credentials != nil {
		opts = append(opts, grpc.WithTransportCredentials(p.cfg.Credentials(unbracket(target))))
	} else {
		opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
	}
	cc, err := grpc.NewClient(dialAddress(target, p.cfg.Port), opts...)
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "node %q: %v", target, err)
	}
	c := &poolConn{ClientConn: cc}
	c.lastUsed.Store(p.now().UnixNano())
	p.live[target] = c
	return c, nil
}

// dial connects to addr once a slot among MaxDials is free.
func (p *Pool) dial(ctx context.Context, addr string) (net.Conn, error) {
	select {
	case p.dials <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-p.dials }()
	var d net.Dialer
	return d.DialContext(ctx, "tcp", addr)
}

// Len returns how many connections the pool holds.
func (p *Pool) Len() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.live)
}

// Reset closes every idle connection and forgets the busy ones so that new
// calls get new connections (used after the node's certificate changed);
// busy connections are closed when their last call ends.
func (p *Pool) Reset() {
	p.mu.Lock()
	old := p.live
	p.live = map[string]*poolConn{}
	p.mu.Unlock()
	for _, c := range old {
		c.closeWhenIdle()
	}
}

// Close stops the janitor and closes every connection.
func (p *Pool) Close() error {
	p.stop()
	<-p.stopped
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for t, c := range p.live {
		errs = append(errs, c.Close())
		delete(p.live, t)
	}
	return errors.Join(errs...)
}

func (p *Pool) janitor(ctx context.Context) {
	defer close(p.stopped)
	tick := time.NewTicker(p.cfg.IdleTimeout / 2)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
			p.evictIdle()
		}
	}
}

// evictIdle closes connections that have carried no call for IdleTimeout.
func (p *Pool) evictIdle() {
	cutoff := p.now().Add(-p.cfg.IdleTimeout).UnixNano()
	p.mu.Lock()
	defer p.mu.Unlock()
	for t, c := range p.live {
		if c.active.Load() == 0 && c.lastUsed.Load() < cutoff {
			delete(p.live, t)
			_ = c.Close()
		}
	}
}

func (p *Pool) evictOldestIdleLocked() bool {
	var oldest string
	var at int64
	for t, c := range p.live {
		if c.active.Load() == 0 && (oldest == "" || c.lastUsed.Load() < at) {
			oldest, at = t, c.lastUsed.Load()
		}
	}
	if oldest == "" {
		return false
	}
	_ = p.live[oldest].Close()
	delete(p.live, oldest)
	return true
}

// Invoke counts the unary call while it runs.
func (c *poolConn) Invoke(ctx context.Context, method string, args, reply any, opts ...grpc.CallOption) error {
	c.active.Add(1)
	defer c.done()
	return c.ClientConn.Invoke(ctx, method, args, reply, opts...)
}

// NewStream counts the stream until its context ends; the proxy always
// cancels a call's context when the call is over.
func (c *poolConn) NewStream(ctx context.Context, desc *grpc.StreamDesc, method string, opts ...grpc.CallOption) (grpc.ClientStream, error) {
	c.active.Add(1)
	cs, err := c.ClientConn.NewStream(ctx, desc, method, opts...)
	if err != nil {
		c.done()
		return nil, err
	}
	context.AfterFunc(ctx, c.done)
	return cs, nil
}

func (c *poolConn) done() {
	c.lastUsed.Store(time.Now().UnixNano())
	if c.active.Add(-1) == 0 && c.retired.Load() {
		c.close()
	}
}

// closeWhenIdle closes the connection now if no call uses it, otherwise
// when the last one ends. The connection is out of the pool, so no new
// call starts on it.
func (c *poolConn) closeWhenIdle() {
	c.retired.Store(true)
	if c.active.Load() == 0 {
		c.close()
	}
}

func (c *poolConn) close() { c.closeOnce.Do(func() { _ = c.ClientConn.Close() }) }
