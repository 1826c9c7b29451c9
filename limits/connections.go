package limits

import (
	"container/list"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/time/rate"
	"google.golang.org/grpc/credentials"
)

// Connections bounds the client connections open at once. Connections
// still in their TLS handshake have a budget of their own, so that sockets
// that never authenticate cannot crowd out clients that do: at most
// Handshakes at once (when full, the oldest unfinished one is closed to make
// room: a client finishes its handshake in milliseconds, a flood never
// does), and at most HandshakesPerSource from one source address, which
// may also open only so many connections a second. Authenticated
// connections count against Total and, by client certificate subject,
// PerIdentity. A connection over a limit is closed at once and the reason
// logged, at most once a second per limit.
type Connections struct {
	total       atomic.Int64
	perIdentity atomic.Int64
	log         *slog.Logger

	// Connections in their handshake: oldest first, and by source.
	hsMu         sync.Mutex
	handshakes   int
	perSource    int
	sourceRate   rate.Limit
	pending      list.List // of *countedConn
	sources      map[string]*source
	sourcesSwept time.Time
	authed       atomic.Int64
	hsTimeout    time.Duration

	open     atomic.Int64
	byRemote sync.Map // remote address -> *countedConn, for CloseRemote
	mu       sync.Mutex
	identity map[string]int
	// By limit (byTotal, byIdentity): refusals, when one was last logged
	// (unix nanoseconds), and how many were not logged since.
	refusals [nLimits]atomic.Int64
	lastLog  [nLimits]atomic.Int64
	quiet    [nLimits]atomic.Int64
}

// The limits a connection can be refused by, and failed handshakes.
const (
	byTotal = iota
	byIdentity
	byHandshake
	byHandshakes
	bySource
	nLimits
)

// source is one source address's unfinished handshakes and its bucket of
// new connections.
type source struct {
	pending int
	bucket  *rate.Limiter
}

// NewConnections returns limits of total connections and perIdentity
// connections per identity; zero or less means unlimited. The handshake
// bounds are off until SetHandshakeLimits (the section applies its keys).
// log receives the refusals (nil: discarded).
func NewConnections(total, perIdentity int, log *slog.Logger) *Connections {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Connections{log: log, identity: map[string]int{}, sources: map[string]*source{}, sourcesSwept: time.Now()}
	c.SetLimits(total, perIdentity)
	c.SetHandshakeLimits(0, 0, 0)
	return c
}

// SetHandshakeLimits bounds the connections still in their handshake: in
// all, from one source address, and new connections a second from one
// source (bursts of twice that). Zero or less turns a bound off.
func (c *Connections) SetHandshakeLimits(total, perSource int, perSourcePerSecond float64) {
	c.hsMu.Lock()
	defer c.hsMu.Unlock()
	c.handshakes, c.perSource = total, perSource
	c.sourceRate = rate.Inf
	if perSourcePerSecond > 0 {
		c.sourceRate = rate.Limit(perSourcePerSecond)
	}
	for _, s := range c.sources {
		s.bucket.SetLimit(c.sourceRate)
		s.bucket.SetBurst(c.burst())
	}
}

// SetHandshakeTimeout tells the limits the listener's handshake timeout,
// which they shorten under pressure: see handshakeDeadline.
func (c *Connections) SetHandshakeTimeout(d time.Duration) {
	c.hsMu.Lock()
	c.hsTimeout = d
	c.hsMu.Unlock()
}

// MinHandshakeDeadline is the shortest time a handshake is given however
// full the budget: a client a few round trips away finishes well within it.
const MinHandshakeDeadline = time.Second

// handshakeDeadline is the time a handshake starting now is given, or 0
// to leave the listener's timeout as it is. Until half of
// limits.handshakes is taken, that is the handshake timeout; beyond, it
// shrinks in proportion to the room left, to MinHandshakeDeadline when
// the budget is full, so that a flood's sockets go sooner while a client
// still has seconds, and a flood held at the budget churns through
// faster than it can be refilled.
func (c *Connections) handshakeDeadline() time.Duration {
	c.hsMu.Lock()
	n, limit, full := c.pending.Len(), c.handshakes, c.hsTimeout
	c.hsMu.Unlock()
	return shortened(n, limit, full)
}

func shortened(n, limit int, full time.Duration) time.Duration {
	half := limit / 2
	if limit <= 0 || full <= MinHandshakeDeadline || n <= half {
		return 0
	}
	d := time.Duration(float64(full) * float64(limit-n) / float64(limit-half))
	return min(max(d, MinHandshakeDeadline), full)
}

func (c *Connections) burst() int { return max(int(2*float64(c.sourceRate)), 1) }

// Handshaking returns the connections in their handshake now.
func (c *Connections) Handshaking() int {
	c.hsMu.Lock()
	defer c.hsMu.Unlock()
	return c.pending.Len()
}

// RefusedHandshakes counts the unfinished handshakes closed to make room
// for new ones.
func (c *Connections) RefusedHandshakes() int64 { return c.refusals[byHandshakes].Load() }

// RefusedPerSource counts the connections refused by the per-source
// bounds.
func (c *Connections) RefusedPerSource() int64 { return c.refusals[bySource].Load() }

// SetLimits changes both limits for connections accepted from now on;
// open connections are never closed by a lower limit.
func (c *Connections) SetLimits(total, perIdentity int) {
	c.total.Store(int64(total))
	c.perIdentity.Store(int64(perIdentity))
}

// Open returns the client connections open now.
func (c *Connections) Open() int64 { return c.open.Load() }

// RefusedTotal counts the connections refused by the total limit.
func (c *Connections) RefusedTotal() int64 { return c.refusals[byTotal].Load() }

// RefusedPerIdentity counts the connections refused by the per-identity
// limit.
func (c *Connections) RefusedPerIdentity() int64 { return c.refusals[byIdentity].Load() }

// HandshakeFailures counts the TLS handshakes that failed (a bad, expired
// or missing client certificate, a client that gave up, a scanner).
func (c *Connections) HandshakeFailures() int64 { return c.refusals[byHandshake].Load() }

// Listener counts the connections l accepts and closes those over the
// total limit at once.
func (c *Connections) Listener(l net.Listener) net.Listener { return &listener{Listener: l, c: c} }

type listener struct {
	net.Listener
	c *Connections
}

func (l *listener) Accept() (net.Conn, error) {
	conn, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.c.open.Add(1)
	cc := &countedConn{Conn: conn}
	cc.release = func() {
		l.c.open.Add(-1)
		if remote := l.c.handshakeEnded(cc); remote != "" {
			l.c.byRemote.CompareAndDelete(remote, cc)
		}
	}
	if oldest, limit := l.c.handshakeStarted(cc); oldest != nil {
		l.c.refused(byHandshakes, "unfinished TLS handshake closed to make room: limits.handshakes reached", "limit", limit)
		_ = oldest.Close()
	}
	return cc, nil
}

// handshakeStarted puts cc among the connections in their handshake and
// returns the oldest one to close when that makes more than the bound.
func (c *Connections) handshakeStarted(cc *countedConn) (oldest *countedConn, limit int) {
	c.hsMu.Lock()
	defer c.hsMu.Unlock()
	cc.pending = c.pending.PushBack(cc)
	if c.handshakes > 0 && c.pending.Len() > c.handshakes {
		front := c.pending.Front()
		oldest = front.Value.(*countedConn)
		c.pending.Remove(front)
		oldest.pending = nil
		c.leaveSourceLocked(oldest)
	}
	return oldest, c.handshakes
}

// handshakeEnded takes cc out of the connections in their handshake, if
// it is still among them, and returns its remote address once it has
// authenticated.
func (c *Connections) handshakeEnded(cc *countedConn) (remote string) {
	c.hsMu.Lock()
	defer c.hsMu.Unlock()
	if cc.pending != nil {
		c.pending.Remove(cc.pending)
		cc.pending = nil
	}
	c.leaveSourceLocked(cc)
	return cc.remote
}

// authenticated records cc's remote address, for CloseRemote.
func (c *Connections) authenticated(cc *countedConn, remote string) {
	c.hsMu.Lock()
	cc.remote = remote
	c.hsMu.Unlock()
	c.byRemote.Store(remote, cc)
}

// enterSource counts cc's handshake against its source address, or says
// why the source may not open it.
func (c *Connections) enterSource(cc *countedConn, addr net.Addr) error {
	host := addr.String()
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	now := time.Now()
	c.hsMu.Lock()
	defer c.hsMu.Unlock()
	if now.Sub(c.sourcesSwept) > sweepEvery {
		for k, s := range c.sources {
			if s.pending == 0 && s.bucket.TokensAt(now) >= float64(s.bucket.Burst()) {
				delete(c.sources, k)
			}
		}
		c.sourcesSwept = now
	}
	s := c.sources[host]
	if s == nil {
		s = &source{bucket: rate.NewLimiter(c.sourceRate, c.burst())}
		c.sources[host] = s
	}
	switch {
	case c.perSource > 0 && s.pending >= c.perSource:
		return fmt.Errorf("%s has %d connections in their TLS handshake (limits.handshakesPerSource)", host, s.pending)
	case !s.bucket.AllowN(now, 1):
		return fmt.Errorf("%s opens connections faster than %s a second (limits.connectionsPerSourcePerSecond)", host, formatRate(c.sourceRate))
	}
	s.pending++
	cc.source = host
	return nil
}

func (c *Connections) leaveSourceLocked(cc *countedConn) {
	if cc.source == "" {
		return
	}
	if s := c.sources[cc.source]; s != nil && s.pending > 0 {
		s.pending--
	}
	cc.source = ""
}

// CloseRemote closes the client connection from remote (an address as
// the connection's RemoteAddr().String() gives it), if one is open, and
// reports whether it did.
func (c *Connections) CloseRemote(remote string) bool {
	v, ok := c.byRemote.Load(remote)
	if !ok {
		return false
	}
	_ = v.(*countedConn).Close()
	return true
}

// countedConn runs release once, when it is first closed.
type countedConn struct {
	net.Conn
	once    sync.Once
	release func()

	// Guarded by Connections.hsMu: its place among the connections in
	// their handshake, and the source its handshake counts against.
	pending *list.Element
	source  string
	remote  string // for CloseRemote, once authenticated
}

func (c *countedConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.release)
	return err
}

// Credentials wraps server transport credentials: after a handshake that
// verified a client certificate, the connection counts against its
// subject, and one over PerIdentity is closed.
func (c *Connections) Credentials(tc credentials.TransportCredentials) credentials.TransportCredentials {
	return &limitedCreds{TransportCredentials: tc, c: c}
}

type limitedCreds struct {
	credentials.TransportCredentials
	c *Connections
}

func (l *limitedCreds) ServerHandshake(raw net.Conn) (net.Conn, credentials.AuthInfo, error) {
	// The source address (behind a balancer, the one its PROXY header
	// names: reading it may wait, which is why this is not done in the
	// accept loop) may hold only so many unfinished handshakes.
	cc, _ := raw.(*countedConn)
	remote := raw.RemoteAddr()
	if cc != nil {
		if err := l.c.enterSource(cc, remote); err != nil {
			l.c.refused(bySource, "connection refused before its handshake", "err", err.Error())
			_ = raw.Close()
			return nil, nil, err
		}
		if d := l.c.handshakeDeadline(); d > 0 {
			// (grpc-go set the listener's timeout just before, and clears
			// the deadline once the connection is established.)
			_ = raw.SetDeadline(time.Now().Add(d))
		}
	}
	conn, info, err := l.TransportCredentials.ServerHandshake(raw)
	if cc != nil {
		l.c.handshakeEnded(cc)
	}
	if err != nil && !errors.Is(err, io.EOF) {
		// (A peer that closes before saying anything, such as a balancer's
		// TCP check, is not a failed handshake.)
		l.c.refused(byHandshake, "TLS handshake refused", "remote", remote.String(), "err", err.Error())
	}
	if err != nil {
		return conn, info, err
	}
	// Authenticated connections have the total budget.
	if total := l.c.total.Load(); total > 0 && l.c.authed.Add(1) > total {
		l.c.authed.Add(-1)
		l.c.refused(byTotal, "connection refused: limits.connections reached", "remote", remote.String(), "limit", total)
		_ = conn.Close()
		return nil, nil, fmt.Errorf("%d client connections are open (limits.connections)", total)
	}
	release := func() { l.c.authed.Add(-1) }
	if cc != nil {
		l.c.authenticated(cc, remote.String())
	}
	perIdentity := int(l.c.perIdentity.Load())
	tlsInfo, ok := info.(credentials.TLSInfo)
	if perIdentity <= 0 || !ok || len(tlsInfo.State.PeerCertificates) == 0 {
		return &countedConn{Conn: conn, release: release}, info, nil
	}
	id := tlsInfo.State.PeerCertificates[0].Subject.String()
	l.c.mu.Lock()
	n := l.c.identity[id]
	if n >= perIdentity {
		l.c.mu.Unlock()
		release()
		l.c.refused(byIdentity, "connection refused: limits.connectionsPerIdentity reached",
			"peer", id, "remote", remote.String(), "limit", perIdentity)
		_ = conn.Close()
		return nil, nil, fmt.Errorf("%s already has %d connections (limits.connectionsPerIdentity)", id, n)
	}
	l.c.identity[id] = n + 1
	l.c.mu.Unlock()
	return &countedConn{Conn: conn, release: func() { release(); l.c.forget(id) }}, info, nil
}

func (l *limitedCreds) Clone() credentials.TransportCredentials {
	return &limitedCreds{TransportCredentials: l.TransportCredentials.Clone(), c: l.c}
}

func (c *Connections) forget(id string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.identity[id]--; c.identity[id] <= 0 {
		delete(c.identity, id)
	}
}

// refused counts a refusal by limit and logs it unless one by the same
// limit was logged less than a second ago, so that a flood of connections
// cannot fill the disk; the next line logged says how many were left out.
func (c *Connections) refused(limit int, msg string, args ...any) {
	c.refusals[limit].Add(1)
	now := time.Now().UnixNano()
	last := c.lastLog[limit].Load()
	if now-last < int64(time.Second) || !c.lastLog[limit].CompareAndSwap(last, now) {
		c.quiet[limit].Add(1)
		return
	}
	if q := c.quiet[limit].Swap(0); q > 0 {
		args = append(args, "not_logged_since", q)
	}
	c.log.Warn(msg, args...)
}
