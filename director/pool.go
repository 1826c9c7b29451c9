package director

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
)

// Pool holds one connection per node, keyed by the node's canonical form
// (so every spelling of one node shares it), created on first use and
// closed once idle, so that naming made-up nodes cannot grow it without
// bound. A connection is counted in use from the moment Conn hands it out
// until its release, so neither eviction nor Reset can close it under a
// call.
type Pool struct {
	cfg  PoolConfig
	now  func() time.Time
	mu   sync.Mutex
	live map[string]*poolConn

	dials    chan struct{}                  // semaphore of connection attempts
	networks atomic.Pointer[[]netip.Prefix] // the router's nodeNetworks; nil or empty: any
	// unready: since when each node's connections have been trying and
	// never ready, across the connections closed with their last call.
	unready        map[string]time.Time
	connectTimeout time.Duration
	stop           context.CancelFunc
	stopped        chan struct{}
}

// poolConn is a pooled connection; every field but the connection is
// guarded by the pool's mutex.
type poolConn struct {
	cc       *grpc.ClientConn
	key      string
	dest     Dest
	active   int       // calls using it
	lastUsed time.Time // when the last call started or ended
	ready    bool      // it has been READY at least once
	retired  bool      // out of the pool: close when the last call ends
}

// NewPool returns a Pool and starts its janitor, which runs until Close.
func NewPool(cfg PoolConfig) *Pool {
	cfg = cfg.withDefaults()
	ctx, cancel := context.WithCancel(context.Background())
	p := &Pool{cfg: cfg, now: time.Now, live: map[string]*poolConn{}, unready: map[string]time.Time{}, connectTimeout: ConnectTimeout, dials: make(chan struct{}, cfg.MaxDials),
		stop: cancel, stopped: make(chan struct{})}
	go p.janitor(ctx)
	return p
}

// ConnectTimeout is how long a connection to a node may take to be
// established (TCP, TLS and HTTP/2 settings) before the attempt fails; a
// node whose connection has stayed unestablished longer than this, across
// calls, is failing, whatever deadlines its callers chose.
const ConnectTimeout = 20 * time.Second

// ErrPoolFull is returned when every pooled connection is busy and the pool
// may hold no more.
var ErrPoolFull = errors.New("connection pool is full: every connection is busy")

// Dest is where one node's apid is reached and who it must prove to be.
type Dest struct {
	// Node is how apid knows the node: the key of its pooled connection
	// and of its statistics.
	Node string
	// Host is the address dialled: an IP address (without brackets) or a
	// DNS name.
	Host string
	// Port is the node's apid port; zero means the pool's Port.
	Port int
	// ServerName is the DNS name or IP address the node's certificate must
	// carry. Empty means Host.
	ServerName string
}

// DestOf is the destination of a node named by its address or DNS name
// alone: dialled and verified under that name.
func DestOf(target string) Dest {
	key := canonical(target)
	return Dest{Node: key, Host: key, ServerName: key} // canonical: no brackets
}

// Conn returns the connection to target's apid; see ConnTo.
func (p *Pool) Conn(target string) (conn grpc.ClientConnInterface, release func(), err error) {
	return p.ConnTo(DestOf(target))
}

// ConnTo returns the connection to d's apid, creating it when needed,
// counted in use until release is called (exactly once, when the call is
// over). grpc.NewClient does not dial, so creation is cheap and never
// blocks on the network; the first call on the connection does the
// dialling. A node whose address or identity changed (the inventory
// moved it) gets a new connection; calls on the old one finish there.
func (p *Pool) ConnTo(d Dest) (conn grpc.ClientConnInterface, release func(), err error) {
	if d.Port == 0 {
		d.Port = p.cfg.Port
	}
	if d.ServerName == "" {
		d.ServerName = d.Host
	}
	key := d.Node
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.live[key]
	if ok && c.dest != d {
		c.retired = true
		delete(p.live, key)
		if c.active == 0 {
			_ = c.cc.Close()
		}
		ok = false
	}
	if !ok {
		if _, trying := p.unready[key]; !trying {
			if len(p.unready) >= maxUnready {
				clear(p.unready) // bounded, whatever names callers make up
			}
			p.unready[key] = p.now()
		}
		if len(p.live) >= p.cfg.MaxConns && !p.evictOldestIdleLocked() {
			return nil, nil, status.Error(codes.ResourceExhausted, ErrPoolFull.Error())
		}
		opts := append(slices.Clip(p.cfg.DialOptions), grpc.WithContextDialer(p.dial))
		if p.cfg.Credentials != nil {
			opts = append(opts, grpc.WithTransportCredentials(p.cfg.Credentials(d.ServerName)))
		} else {
			opts = append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))
		}
		cc, err := grpc.NewClient(net.JoinHostPort(d.Host, strconv.Itoa(d.Port)), opts...)
		if err != nil {
			return nil, nil, status.Errorf(codes.InvalidArgument, "node %q: %v", d.Node, err)
		}
		c = &poolConn{cc: cc, key: key, dest: d}
		p.live[key] = c
	}
	c.active++
	c.lastUsed = p.now()
	var once sync.Once
	return c.cc, func() { once.Do(func() { p.release(c) }) }, nil
}

// release ends one call on c. A connection that has never been ready
// (a node that does not exist or does not answer) is closed with its last
// call rather than kept, with its goroutines, for IdleTimeout; the next
// call to that node dials afresh.
func (p *Pool) release(c *poolConn) {
	ready := c.cc.GetState() == connectivity.Ready
	p.mu.Lock()
	c.active--
	c.lastUsed = p.now()
	c.ready = c.ready || ready
	if c.ready {
		delete(p.unready, c.key)
	}
	closing := false
	if c.active == 0 {
		switch {
		case c.retired:
			closing = true
		case !c.ready && p.live[c.key] == c:
			delete(p.live, c.key)
			closing = true
		}
	}
	p.mu.Unlock()
	if closing {
		_ = c.cc.Close()
	}
}

// maxUnready bounds the nodes whose unestablished time is remembered.
const maxUnready = 4096

// Unestablished reports whether the connections to node have been trying,
// across calls, for longer than a connection attempt may take without
// ever being ready: the node does not complete connections.
func (p *Pool) Unestablished(node string) (time.Duration, bool) {
	if p == nil {
		return 0, false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if c, ok := p.live[node]; ok && (c.ready || c.cc.GetState() == connectivity.Ready) {
		return 0, false
	}
	since, ok := p.unready[node]
	if !ok {
		return 0, false
	}
	d := p.now().Sub(since)
	return d, d > p.connectTimeout
}

// SetNetworks makes dials from now on refuse addresses outside networks
// (empty: none refused), whatever name resolved to them.
func (p *Pool) SetNetworks(networks []netip.Prefix) { p.networks.Store(&networks) }

// dial connects to addr once a slot among MaxDials is free.
func (p *Pool) dial(ctx context.Context, addr string) (net.Conn, error) {
	if nets := p.networks.Load(); nets != nil {
		host, _, _ := net.SplitHostPort(addr)
		if why := outside(*nets, host); why != "" {
			return nil, errors.New(why)
		}
	}
	select {
	case p.dials <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	defer func() { <-p.dials }()
	// Keepalive probes an idle connection (after at most 15 s); with a user
	// timeout, the kernel drops the connection once the probes, or data,
	// stay unanswered that long, so probing starts no later than that.
	ka := net.KeepAliveConfig{Enable: true, Idle: 15 * time.Second, Interval: 5 * time.Second, Count: 3}
	d := net.Dialer{}
	if ut := p.cfg.TCPUserTimeout; ut > 0 {
		ka.Idle, ka.Interval = min(ka.Idle, ut), min(ka.Interval, max(ut/3, time.Second))
		d.Control = userTimeout(ut)
	}
	d.KeepAliveConfig = ka
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil || p.cfg.TCPUserTimeout <= 0 {
		return c, err
	}
	// grpc-go sets TCP_USER_TIMEOUT to its keepalive timeout on every
	// *net.TCPConn a dialer returns; hidden behind this type, the
	// configured value stays.
	return userTimeoutConn{c}, nil
}

// userTimeoutConn is a TCP connection whose TCP_USER_TIMEOUT is apid's.
type userTimeoutConn struct{ net.Conn }

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
	var idle []*poolConn
	for _, c := range old {
		c.retired = true
		if c.active == 0 {
			idle = append(idle, c)
		}
	}
	p.mu.Unlock()
	for _, c := range idle {
		_ = c.cc.Close()
	}
}

// Close stops the janitor and closes every connection.
func (p *Pool) Close() error {
	p.stop()
	<-p.stopped
	p.mu.Lock()
	defer p.mu.Unlock()
	var errs []error
	for k, c := range p.live {
		errs = append(errs, c.cc.Close())
		delete(p.live, k)
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
	cutoff := p.now().Add(-p.cfg.IdleTimeout)
	p.mu.Lock()
	defer p.mu.Unlock()
	for k, c := range p.live {
		if c.active == 0 && c.lastUsed.Before(cutoff) {
			delete(p.live, k)
			_ = c.cc.Close()
		}
	}
}

func (p *Pool) evictOldestIdleLocked() bool {
	var oldest *poolConn
	for _, c := range p.live {
		if c.active == 0 && (oldest == nil || c.lastUsed.Before(oldest.lastUsed)) {
			oldest = c
		}
	}
	if oldest == nil {
		return false
	}
	_ = oldest.cc.Close()
	delete(p.live, oldest.key)
	return true
}

// PoolEntry is one node connection of the pool, as Snapshot sees it.
type PoolEntry struct {
	Node     string // the canonical target
	State    string // the connection's state: IDLE, CONNECTING, READY, TRANSIENT_FAILURE
	Active   int    // calls using it now
	LastUsed time.Time
}

// Snapshot lists the pool's connections, sorted by node.
func (p *Pool) Snapshot() []PoolEntry {
	p.mu.Lock()
	out := make([]PoolEntry, 0, len(p.live))
	for _, c := range p.live {
		out = append(out, PoolEntry{Node: c.key, State: c.cc.GetState().String(), Active: c.active, LastUsed: c.lastUsed})
	}
	p.mu.Unlock()
	slices.SortFunc(out, func(a, b PoolEntry) int { return strings.Compare(a.Node, b.Node) })
	return out
}
