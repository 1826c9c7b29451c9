package limits

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc/credentials"
)

// Connections bounds the client connections open at once: Total in all
// (counted from accept, so connections still in their handshake count) and
// PerIdentity for one client certificate identity (its subject, counted
// once the handshake has verified it). A connection over either limit is
// closed at once and the reason logged, at most once a second.
type Connections struct {
	total       atomic.Int64
	perIdentity atomic.Int64
	log         *slog.Logger

	open     atomic.Int64
	byRemote sync.Map // remote address -> *countedConn, for CloseRemote
	mu       sync.Mutex
	identity map[string]int
	// By limit (byTotal, byIdentity): refusals, when one was last logged
	// (unix nanoseconds), and how many were not logged since.
	refusals [3]atomic.Int64
	lastLog  [3]atomic.Int64
	quiet    [3]atomic.Int64
}

// The limits a connection can be refused by, and failed handshakes.
const (
	byTotal = iota
	byIdentity
	byHandshake
)

// NewConnections returns limits of total connections and perIdentity
// connections per identity; zero or less means unlimited. log receives the
// refusals (nil: discarded).
func NewConnections(total, perIdentity int, log *slog.Logger) *Connections {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	c := &Connections{log: log, identity: map[string]int{}}
	c.SetLimits(total, perIdentity)
	return c
}

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
	for {
		conn, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		n := l.c.open.Add(1)
		if total := l.c.total.Load(); total > 0 && n > total {
			l.c.open.Add(-1)
			l.c.refused(byTotal, "connection refused: limits.connections reached",
				"remote", conn.RemoteAddr().String(), "limit", total)
			_ = conn.Close()
			continue
		}
		remote := conn.RemoteAddr().String()
		cc := &countedConn{Conn: conn}
		cc.release = func() {
			l.c.open.Add(-1)
			l.c.byRemote.CompareAndDelete(remote, cc)
		}
		l.c.byRemote.Store(remote, cc)
		return cc, nil
	}
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
	conn, info, err := l.TransportCredentials.ServerHandshake(raw)
	if err != nil && !errors.Is(err, io.EOF) {
		// (A peer that closes before saying anything, such as a balancer's
		// TCP check, is not a failed handshake.)
		l.c.refused(byHandshake, "TLS handshake refused", "remote", raw.RemoteAddr().String(), "err", err.Error())
	}
	perIdentity := int(l.c.perIdentity.Load())
	if err != nil || perIdentity <= 0 {
		return conn, info, err
	}
	tlsInfo, ok := info.(credentials.TLSInfo)
	if !ok || len(tlsInfo.State.PeerCertificates) == 0 {
		return conn, info, err
	}
	id := tlsInfo.State.PeerCertificates[0].Subject.String()
	l.c.mu.Lock()
	n := l.c.identity[id]
	if n >= perIdentity {
		l.c.mu.Unlock()
		l.c.refused(byIdentity, "connection refused: limits.connectionsPerIdentity reached",
			"peer", id, "remote", raw.RemoteAddr().String(), "limit", perIdentity)
		_ = conn.Close()
		return nil, nil, fmt.Errorf("%s already has %d connections (limits.connectionsPerIdentity)", id, n)
	}
	l.c.identity[id] = n + 1
	l.c.mu.Unlock()
	return &countedConn{Conn: conn, release: func() { l.c.forget(id) }}, info, nil
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
