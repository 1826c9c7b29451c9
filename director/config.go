package director

import (
	"errors"
	"fmt"
	"net/netip"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/apid/apid/auth"
)

// Config is the routing part of apid's configuration: which nodes a call
// may name and how its fan-out behaves. Its keys sit at the top level of
// the configuration file. The reload tag says whether a reload applies a
// key to calls that start after it (live) or a restart is needed.
type Config struct {
	// SelfNames are the names and addresses clients may use for this node;
	// a target among them is served by the local backend, not by a TLS
	// round trip to this apid itself.
	SelfNames []string `yaml:"selfNames" reload:"live"`
	// MaxNodes bounds the distinct nodes one request may name. Default 1000.
	MaxNodes int `yaml:"maxNodes" reload:"live"`
	// NodeTimeout is the per-node deadline of fan-out unary calls that a
	// client's KeyNodeTimeout may shorten. Zero: none. Default 30s.
	NodeTimeout time.Duration `yaml:"nodeTimeout" reload:"live"`
	// ForwardKeys are client metadata keys passed on to the next hop in
	// addition to DefaultForwardKeys; reserved keys (ReservedKey) are
	// refused by Validate and ignored by the router.
	ForwardKeys []string `yaml:"forwardMetadata" reload:"live"`
	// ReplyKeys are the header and trailer keys of nodes' replies that
	// reach the client of a fan-out; others stay at the gateway, so that
	// one node cannot fill every client's reply (one-to-one replies pass
	// untouched).
	ReplyKeys []string `yaml:"replyMetadata" reload:"live"`
	// Unary, ServerStreaming, ClientStreaming and BidiStreaming name (as
	// /package.Service/Method) methods outside the Talos API apid was
	// built with (a newer Talos's) whose replies carry common.Metadata, so
	// that they may fan out. Any other unknown method is relayed
	// one-to-one frame by frame both ways, whatever its shape, and never
	// fans out.
	Unary           []string `yaml:"unaryMethods" reload:"live"`
	ServerStreaming []string `yaml:"serverStreamingMethods" reload:"live"`
	ClientStreaming []string `yaml:"clientStreamingMethods" reload:"live"`
	BidiStreaming   []string `yaml:"bidiStreamingMethods" reload:"live"`
	// Ejection takes nodes that keep failing out of calls for a while.
	Ejection EjectionConfig `yaml:"ejection" reload:"live"`
	// NodeNetworks, when set, are the networks (CIDRs) nodes live in:
	// apid dials no address outside them, whoever named it (the
	// inventory, DNS, or a caller's IP); such a node gets a
	// PermissionDenied entry. Empty: any address.
	NodeNetworks []string `yaml:"nodeNetworks" reload:"live"`
	// LocalOnly serves this node only, as a Talos worker does (it holds no
	// certificate to forward with): a call whose node or nodes name
	// another node is refused with PermissionDenied "no request
	// forwarding"; one naming only this node (selfNames) is served.
	LocalOnly bool `yaml:"localOnly" reload:"live"`
}

// EjectionConfig takes nodes that keep failing out of calls for a while, so
// that a node that is down costs a fan-out nothing after its first few
// failures instead of a per-node deadline each time.
type EjectionConfig struct {
	// ConsecutiveFailures ejects a node after this many failures in a row
	// of the kinds a network or a dead node causes (UNAVAILABLE,
	// DEADLINE_EXCEEDED), not answers such as NOT_FOUND. Zero: never.
	// Default 3.
	ConsecutiveFailures int `yaml:"consecutiveFailures"`
	// BaseTime is the first ejection's length; each ejection in a row
	// doubles it, up to MaxTime, with up to 10 % jitter. Defaults 5s and 1m.
	BaseTime time.Duration `yaml:"baseTime"`
	MaxTime  time.Duration `yaml:"maxTime"`
	// MaxPercent of a fan-out's nodes may be skipped as ejected; the others
	// are tried even if ejected. Default 50.
	MaxPercent int `yaml:"maxPercent"`
}

// DefaultConfig returns the routing configuration with every default.
func DefaultConfig() Config {
	return Config{
		MaxNodes:    1000,
		NodeTimeout: 30 * time.Second,
		Ejection:    EjectionConfig{ConsecutiveFailures: 3, BaseTime: 5 * time.Second, MaxTime: time.Minute, MaxPercent: 50},
	}
}

// Validate lists every bad key, each by its path in the configuration file.
func (c Config) Validate() error {
	var errs []error
	if c.MaxNodes <= 0 {
		errs = append(errs, fmt.Errorf("maxNodes %d: must be positive", c.MaxNodes))
	}
	if c.NodeTimeout < 0 {
		errs = append(errs, fmt.Errorf("nodeTimeout %s: want 0 (none) or more", c.NodeTimeout))
	}
	for _, k := range c.ForwardKeys {
		if ReservedKey(k) {
			errs = append(errs, fmt.Errorf("forwardMetadata: %q is apid's own or reserved and is never forwarded: remove it", k))
		}
	}
	for _, list := range []struct {
		key     string
		methods []string
	}{{"unaryMethods", c.Unary}, {"serverStreamingMethods", c.ServerStreaming}, {"clientStreamingMethods", c.ClientStreaming}, {"bidiStreamingMethods", c.BidiStreaming}} {
		for _, m := range list.methods {
			if !auth.ValidMethod(m) {
				errs = append(errs, fmt.Errorf("%s %q: want /package.Service/Method", list.key, m))
			}
		}
	}
	for i, n := range c.NodeNetworks {
		if _, err := netip.ParsePrefix(n); err != nil {
			errs = append(errs, fmt.Errorf("nodeNetworks[%d] %q: want a CIDR such as 10.0.0.0/8 or fd00::/8", i, n))
		}
	}
	e := c.Ejection
	if e.ConsecutiveFailures < 0 {
		errs = append(errs, fmt.Errorf("ejection.consecutiveFailures %d: want 0 (off) or more", e.ConsecutiveFailures))
	}
	if e.BaseTime <= 0 {
		errs = append(errs, fmt.Errorf("ejection.baseTime %s: must be positive", e.BaseTime))
	}
	if e.MaxTime < e.BaseTime {
		errs = append(errs, fmt.Errorf("ejection.maxTime %s: want at least ejection.baseTime (%s)", e.MaxTime, e.BaseTime))
	}
	if e.MaxPercent < 0 || e.MaxPercent > 100 {
		errs = append(errs, fmt.Errorf("ejection.maxPercent %d: want 0 to 100", e.MaxPercent))
	}
	return errors.Join(errs...)
}

// PoolConfig is the part of apid's configuration about connections to
// other nodes; its keys sit at the top level of the configuration file.
// All of them need a restart.
type PoolConfig struct {
	// Port is where the apid of every other node listens. Default 50000.
	Port int `yaml:"remotePort" reload:"restart"`
	// IdleTimeout closes a connection that carried no call for this long.
	// Default 5m.
	IdleTimeout time.Duration `yaml:"idleTimeout" reload:"restart"`
	// MaxConns bounds the number of nodes connected at once; when full, idle
	// connections are closed oldest first, and a new node is refused only
	// when every connection is busy. Default 1024.
	MaxConns int `yaml:"maxConnections" reload:"restart"`
	// MaxDials bounds the connection attempts (TCP connects) in progress at
	// once across all nodes, so a fan-out to a thousand new nodes does not
	// open a thousand sockets and handshakes in the same instant. Default 64.
	MaxDials int `yaml:"maxDials" reload:"restart"`
	// TCPUserTimeout closes a connection whose sent data or keepalive
	// probes stay unacknowledged this long (Linux TCP_USER_TIMEOUT): a node
	// that vanished without closing its connections is noticed, on a
	// running stream too. TCP keepalive probes idle connections. Default
	// 60s; zero (outside the configuration file) leaves the kernel's.
	TCPUserTimeout time.Duration `yaml:"tcpUserTimeout" reload:"restart"`

	// DialOptions are applied to every connection (keepalive, backoff,
	// message limits).
	DialOptions []grpc.DialOption `yaml:"-"`
	// Credentials returns the transport credentials for a node whose
	// certificate must carry serverName (a DNS name or IP address without
	// brackets): the name verified is per node. Nil means insecure, which
	// only tests use.
	Credentials func(host string) credentials.TransportCredentials `yaml:"-"`
}

// DefaultPoolConfig returns the node connection settings with every default.
func DefaultPoolConfig() PoolConfig {
	return PoolConfig{Port: 50000, IdleTimeout: 5 * time.Minute, MaxConns: 1024, MaxDials: 64, TCPUserTimeout: time.Minute}
}

// withDefaults fills what was left zero (a Pool built outside a
// configuration file, as tests do) from DefaultPoolConfig.
func (c PoolConfig) withDefaults() PoolConfig {
	d := DefaultPoolConfig()
	if c.Port == 0 {
		c.Port = d.Port
	}
	if c.IdleTimeout <= 0 {
		c.IdleTimeout = d.IdleTimeout
	}
	if c.MaxConns <= 0 {
		c.MaxConns = d.MaxConns
	}
	if c.MaxDials <= 0 {
		c.MaxDials = d.MaxDials
	}
	return c
}

// Validate lists every bad key, each by its path in the configuration file.
func (c PoolConfig) Validate() error {
	var errs []error
	if c.Port <= 0 || c.Port > 65535 {
		errs = append(errs, fmt.Errorf("remotePort %d: want 1 to 65535", c.Port))
	}
	if c.IdleTimeout <= 0 {
		errs = append(errs, fmt.Errorf("idleTimeout %s: must be positive", c.IdleTimeout))
	}
	if c.MaxConns <= 0 {
		errs = append(errs, fmt.Errorf("maxConnections %d: must be positive", c.MaxConns))
	}
	if c.MaxDials <= 0 {
		errs = append(errs, fmt.Errorf("maxDials %d: must be positive", c.MaxDials))
	}
	if c.TCPUserTimeout < time.Second {
		errs = append(errs, fmt.Errorf("tcpUserTimeout %s: want at least 1s", c.TCPUserTimeout))
	}
	return errors.Join(errs...)
}
