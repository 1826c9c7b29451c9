package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/director"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/limits"
)

// Config is everything a gateway needs. Defaults come from Default; a
// YAML file (Decode) overrides them, and apid serve's flags the file.
type Config struct {
	// Listen is the gateway's address. Default ":50000".
	Listen string `yaml:"listen"`
	// CA is the PEM bundle of CAs that sign client and node certificates;
	// during a rotation it holds both.
	CA string `yaml:"ca"`
	// Cert and Key are this node's certificate and key: served to clients
	// and presented to other nodes' apid (so it should carry serverAuth,
	// clientAuth and the os:impersonator role).
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
	// Backend is the local node agent: unix:///path.sock or host:port
	// (plaintext; keep it on loopback).
	Backend string `yaml:"backend"`
	// RemotePort is where the apid of other nodes listens. Default 50000.
	RemotePort int `yaml:"remotePort"`
	// SelfNames are names and addresses of this node; targets among them are
	// served by the local backend directly.
	SelfNames []string `yaml:"selfNames"`
	// MaxNodes bounds the nodes one request may name. Default 1000.
	MaxNodes int `yaml:"maxNodes"`
	// NodeTimeout bounds each node's part of a fan-out unary call. Default 30s.
	NodeTimeout time.Duration `yaml:"nodeTimeout"`
	// ForwardMetadata lists client metadata keys passed to the next hop in
	// addition to context, runtime, traceparent and tracestate.
	ForwardMetadata []string `yaml:"forwardMetadata"`
	// ServerStreamingMethods, ClientStreamingMethods and BidiStreamingMethods
	// declare the shape of methods outside the Talos API for fan-out.
	ServerStreamingMethods []string `yaml:"serverStreamingMethods"`
	ClientStreamingMethods []string `yaml:"clientStreamingMethods"`
	BidiStreamingMethods   []string `yaml:"bidiStreamingMethods"`
	// MaxMessageSize bounds one gRPC message either way. Default 32 MiB.
	MaxMessageSize int `yaml:"maxMessageSize"`
	// AllowTLS12 admits TLS 1.2 clients (with four AEAD suites only).
	AllowTLS12 bool `yaml:"allowTLS12"`
	// ReloadInterval is how often certificate files are checked for
	// changes. Default 10s. SIGHUP reloads at once.
	ReloadInterval time.Duration `yaml:"reloadInterval"`
	// TCPUserTimeout closes a connection to another node whose sent data
	// stays unacknowledged this long (TCP_USER_TIMEOUT): a node that
	// vanished without closing its connections is noticed, on a running
	// stream too. Default 60s.
	TCPUserTimeout time.Duration `yaml:"tcpUserTimeout"`
	// IdleTimeout closes connections to other nodes idle this long. Default 5m.
	IdleTimeout time.Duration `yaml:"idleTimeout"`
	// MaxConnections bounds the nodes connected at once (idle ones are
	// evicted first). Default 1024.
	MaxConnections int `yaml:"maxConnections"`
	// MaxDials bounds the connection attempts to other nodes in progress at
	// once. Default 64.
	MaxDials int `yaml:"maxDials"`
	// HandshakeTimeout closes connections whose TLS handshake has not
	// finished in time. Default 10s.
	HandshakeTimeout time.Duration `yaml:"handshakeTimeout"`
	// MaxConcurrentStreams bounds the calls open at once on one client
	// connection (HTTP/2 Rapid Reset). Default 1000.
	MaxConcurrentStreams uint32 `yaml:"maxConcurrentStreams"`
	// MaxConnectionIdle closes a client connection that has carried no call
	// for this long (a GOAWAY first, so the client reconnects cleanly when
	// it needs to). Default 5m.
	MaxConnectionIdle time.Duration `yaml:"maxConnectionIdle"`
	// Ejection takes nodes that keep failing out of calls for a while.
	Ejection EjectionConfig `yaml:"ejection"`
	// Limits bound what clients can make apid hold.
	Limits LimitsConfig `yaml:"limits"`
	// AdminListen serves /healthz (alive), /readyz (ready for calls) and
	// /metrics (Prometheus) over plain HTTP at this address: keep it on
	// loopback or a private interface. Default 127.0.0.1:50001. Empty: off.
	AdminListen string `yaml:"adminListen"`
	// DrainDelay is how long apid, told to stop, goes on accepting calls
	// with readiness already failing, so that balancers notice before
	// connections are refused. Default 5s.
	DrainDelay time.Duration `yaml:"drainDelay"`
	// ShutdownTimeout is how long running calls get to finish once apid
	// stops accepting; then they end with UNAVAILABLE. Default 30s.
	ShutdownTimeout time.Duration `yaml:"shutdownTimeout"`
	// MaxConnectionAge sends a client connection older than this a GOAWAY:
	// the client opens a new one for its next calls, so that long-lived
	// clients spread again over the gateways behind a balancer. Running
	// calls go on. Default 1h. Zero: never.
	MaxConnectionAge time.Duration `yaml:"maxConnectionAge"`
	// MaxConnectionAgeGrace is how long calls may still run on a connection
	// past MaxConnectionAge before it is closed. Zero (the default): as
	// long as they need.
	MaxConnectionAgeGrace time.Duration `yaml:"maxConnectionAgeGrace"`
	// LogLevel is debug, info, warn or error. Default info.
	LogLevel string `yaml:"logLevel"`
	// LogFormat is json (the default: one object per line, for log
	// pipelines) or text.
	LogFormat string `yaml:"logFormat"`
	// Tracing exports OpenTelemetry traces; off unless an endpoint is set
	// here or in the environment.
	Tracing TracingConfig `yaml:"tracing"`
	// Policy replaces or extends the built-in role policy.
	Policy PolicyConfig `yaml:"policy"`
	// Inventory lists the nodes callers may name, and the groups
	// (@controlplane, @workers, @all, @key=value) they form. Without one,
	// nodes are named by address or DNS name only.
	Inventory inventory.Config `yaml:"inventory"`
	// Health configures the cluster health check apid serves itself
	// (cluster.ClusterService/HealthCheck, talosctl health).
	Health HealthConfig `yaml:"health"`
}

// HealthConfig bounds what the cluster health check accepts.
type HealthConfig struct {
	// MaxClockSkew is how far a node's clock may be from this apid's.
	// Default 2s.
	MaxClockSkew time.Duration `yaml:"maxClockSkew"`
	// CertificateDays fails the check when a node's certificate expires
	// within this many days. Default 30.
	CertificateDays int `yaml:"certificateDays"`
	// MaxWait caps the wait a check may ask for: until then it asks its
	// pending nodes once a second. Default 20m (talosctl's default wait).
	MaxWait time.Duration `yaml:"maxWait"`
	// MaxRunning bounds the checks running at once on this apid.
	// Default 8.
	MaxRunning int `yaml:"maxRunning"`
}

// LimitsConfig bounds the memory and connections clients can make apid
// hold. Sizes are bytes, or a number with KiB, MiB or GiB.
type LimitsConfig struct {
	// BufferedBytes is the budget of bytes held for calls in flight
	// (messages being relayed, requests kept for several nodes, replies kept
	// for a merge, messages queued for a slow client); past it new calls
	// get RESOURCE_EXHAUSTED and running ones go on. Default: an eighth of
	// the memory of the machine or cgroup, at least 64 MiB.
	BufferedBytes ByteSize `yaml:"bufferedBytes"`
	// Connections bounds the client connections open at once. Default 4096.
	Connections int `yaml:"connections"`
	// ConnectionsPerIdentity bounds the connections open at once with one
	// client certificate subject. Default 256.
	ConnectionsPerIdentity int `yaml:"connectionsPerIdentity"`
	// StreamWindow is the HTTP/2 receive window of each stream, towards
	// clients and towards nodes: what one stream whose reader stalls can
	// make a hop hold. Default 256 KiB.
	StreamWindow ByteSize `yaml:"streamWindow"`
	// ConnectionWindow is the HTTP/2 receive window of each connection,
	// shared by its streams. Default 1 MiB.
	ConnectionWindow ByteSize `yaml:"connectionWindow"`
	// NodeBuffer is what a streamed fan-out queues of one node's messages
	// for a client that reads slower than the nodes send. Default 64 KiB.
	NodeBuffer ByteSize `yaml:"nodeBuffer"`
	// ConcurrentCallsPerIdentity bounds the calls one client certificate
	// subject has in flight at once on this apid, over all its
	// connections. Calls another apid forwarded were counted there and are
	// not counted again. Default 1000.
	ConcurrentCallsPerIdentity int `yaml:"concurrentCallsPerIdentity"`
	// CallsPerSecondPerIdentity and CallBurstPerIdentity are a token
	// bucket per client certificate subject: calls start at most this many
	// a second on average, and bursts of up to CallBurstPerIdentity.
	// Defaults 500 and 1000.
	CallsPerSecondPerIdentity float64 `yaml:"callsPerSecondPerIdentity"`
	CallBurstPerIdentity      int     `yaml:"callBurstPerIdentity"`
}

// EjectionConfig is outlier ejection: after ConsecutiveFailures failures in
// a row that a network or a dead node causes (UNAVAILABLE,
// DEADLINE_EXCEEDED), a node is ejected for BaseTime, doubling with each
// ejection in a row up to MaxTime (plus up to 10 % jitter); calls naming it
// get its UNAVAILABLE entry at once. When the time is up, one call tries
// it again and restores it on success. At most MaxPercent of a fan-out's
// nodes are skipped as ejected.
type EjectionConfig struct {
	// ConsecutiveFailures ejects a node; 0 turns ejection off. Default 3.
	ConsecutiveFailures int `yaml:"consecutiveFailures"`
	// BaseTime and MaxTime: defaults 5s and 1m.
	BaseTime time.Duration `yaml:"baseTime"`
	MaxTime  time.Duration `yaml:"maxTime"`
	// MaxPercent: default 50.
	MaxPercent int `yaml:"maxPercent"`
}

// ByteSize is a number of bytes, written in YAML as an integer or as a
// number followed by B, KiB, MiB or GiB ("256KiB").
type ByteSize int64

// UnmarshalYAML accepts an integer or a number with a binary unit.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	v, err := parseByteSize(n.Value)
	if err != nil {
		return fmt.Errorf("line %d: %w", n.Line, err)
	}
	*b = v
	return nil
}

func parseByteSize(s string) (ByteSize, error) {
	s = strings.TrimSpace(s)
	mult := int64(1)
	for _, u := range []struct {
		suffix string
		mult   int64
	}{{"KiB", 1 << 10}, {"MiB", 1 << 20}, {"GiB", 1 << 30}, {"B", 1}} {
		if v, ok := strings.CutSuffix(s, u.suffix); ok {
			s, mult = strings.TrimSpace(v), u.mult
			break
		}
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil || n < 0 || n > (1<<62)/mult {
		return 0, fmt.Errorf("%q is not a size: want bytes, or a number with KiB, MiB or GiB", s)
	}
	return ByteSize(n * mult), nil
}

// PolicyConfig is the authorization section of the configuration.
type PolicyConfig struct {
	// Replace starts from an empty policy instead of the built-in Talos
	// roles (os:admin may still call everything).
	Replace bool `yaml:"replace"`
	// Rules allow roles to call methods (/pkg.Service/Method or a pattern
	// ending in *); a rule replaces the built-in one for the same method.
	Rules []auth.Rule `yaml:"rules"`
}

// Default returns the configuration with every default filled in; a YAML
// file (Decode) and flags override it.
func Default() Config {
	return Config{
		Listen:         ":50000",
		Backend:        "unix:///system/run/machined/machine.sock",
		RemotePort:     50000,
		MaxNodes:       1000,
		NodeTimeout:    30 * time.Second,
		MaxMessageSize: 32 << 20,
		ReloadInterval: 10 * time.Second,
		IdleTimeout:    5 * time.Minute,
		TCPUserTimeout: time.Minute,
		Ejection:       EjectionConfig{ConsecutiveFailures: 3, BaseTime: 5 * time.Second, MaxTime: time.Minute, MaxPercent: 50},
		MaxConnections: 1024,
		MaxDials:       64,
		LogLevel:       "info",
		LogFormat:      "json",
		Tracing:        TracingConfig{SampleRatio: 1},
		Health:         HealthConfig{MaxClockSkew: 2 * time.Second, CertificateDays: 30, MaxWait: 20 * time.Minute, MaxRunning: 8},

		AdminListen:     "127.0.0.1:50001",
		DrainDelay:      5 * time.Second,
		ShutdownTimeout: 30 * time.Second,

		HandshakeTimeout:     10 * time.Second,
		MaxConcurrentStreams: 1000,
		MaxConnectionIdle:    5 * time.Minute,
		MaxConnectionAge:     time.Hour,
		Limits: LimitsConfig{
			BufferedBytes:              ByteSize(limits.DefaultMemory()),
			Connections:                4096,
			ConnectionsPerIdentity:     256,
			StreamWindow:               256 << 10,
			ConnectionWindow:           1 << 20,
			NodeBuffer:                 64 << 10,
			ConcurrentCallsPerIdentity: 1000,
			CallsPerSecondPerIdentity:  500,
			CallBurstPerIdentity:       1000,
		},
	}
}

// Decode overrides cfg with the YAML document data. Unknown keys are
// errors, so a typo is never silently ignored.
func Decode(data []byte, cfg *Config) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && err != io.EOF {
		return err
	}
	return nil
}

// Validate lists every problem of the configuration at once, in the order
// of the fields.
func (c Config) Validate() error {
	_, err := c.validate()
	return err
}

// validate is Validate that also returns the role policy it had to build
// to check the rules, so that New builds it once.
func (c Config) validate() (*auth.Policy, error) {
	var errs []error
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		errs = append(errs, fmt.Errorf("listen %q: %w", c.Listen, err))
	}
	for _, f := range []struct{ name, path string }{{"ca", c.CA}, {"cert", c.Cert}, {"key", c.Key}} {
		if f.path == "" {
			errs = append(errs, fmt.Errorf("%s: a file is required", f.name))
		}
	}
	if c.Backend == "" {
		errs = append(errs, errors.New("backend: an address is required"))
	} else if !strings.HasPrefix(c.Backend, "unix://") {
		if _, _, err := net.SplitHostPort(c.Backend); err != nil {
			errs = append(errs, fmt.Errorf("backend %q: want unix:///path or host:port", c.Backend))
		}
	}
	if c.RemotePort <= 0 || c.RemotePort > 65535 {
		errs = append(errs, fmt.Errorf("remotePort %d: out of range", c.RemotePort))
	}
	if c.MaxNodes <= 0 {
		errs = append(errs, fmt.Errorf("maxNodes %d: must be positive", c.MaxNodes))
	}
	if c.NodeTimeout < 0 || c.ReloadInterval <= 0 || c.IdleTimeout <= 0 || c.HandshakeTimeout <= 0 {
		errs = append(errs, errors.New("nodeTimeout must be >= 0; reloadInterval, idleTimeout and handshakeTimeout > 0"))
	}
	if c.MaxConnections <= 0 || c.MaxDials <= 0 {
		errs = append(errs, errors.New("maxConnections and maxDials must be positive"))
	}
	if e := c.Ejection; e.ConsecutiveFailures < 0 || e.BaseTime <= 0 || e.MaxTime < e.BaseTime || e.MaxPercent < 0 || e.MaxPercent > 100 {
		errs = append(errs, errors.New("ejection: want consecutiveFailures >= 0, 0 < baseTime <= maxTime and maxPercent 0 to 100"))
	}
	if c.TCPUserTimeout < time.Second {
		errs = append(errs, fmt.Errorf("tcpUserTimeout %s: want at least 1s", c.TCPUserTimeout))
	}
	if c.MaxConnectionIdle <= 0 {
		errs = append(errs, errors.New("maxConnectionIdle must be positive"))
	}
	if c.DrainDelay < 0 || c.ShutdownTimeout < 0 || c.MaxConnectionAge < 0 || c.MaxConnectionAgeGrace < 0 {
		errs = append(errs, errors.New("drainDelay, shutdownTimeout, maxConnectionAge and maxConnectionAgeGrace must be >= 0"))
	}
	errs = append(errs, c.Limits.validate()...)
	if c.MaxConcurrentStreams == 0 {
		errs = append(errs, errors.New("maxConcurrentStreams must be positive"))
	}
	if c.MaxMessageSize < 1024 {
		errs = append(errs, fmt.Errorf("maxMessageSize %d: too small", c.MaxMessageSize))
	}
	if c.AdminListen != "" {
		if _, _, err := net.SplitHostPort(c.AdminListen); err != nil {
			errs = append(errs, fmt.Errorf("adminListen %q: %w", c.AdminListen, err))
		} else if c.AdminListen == c.Listen {
			errs = append(errs, fmt.Errorf("adminListen %q: the same address as listen", c.AdminListen))
		}
	}
	for _, k := range c.ForwardMetadata {
		if director.ReservedKey(k) {
			errs = append(errs, fmt.Errorf("forwardMetadata: %q is apid's own or reserved and is never forwarded", k))
		}
	}
	policy, err := auth.NewPolicy(c.Policy.Rules, c.Policy.Replace)
	if err != nil {
		errs = append(errs, err)
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		errs = append(errs, fmt.Errorf("logLevel %q: want debug, info, warn or error", c.LogLevel))
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		errs = append(errs, fmt.Errorf("logFormat %q: want json or text", c.LogFormat))
	}
	if c.Tracing.SampleRatio < 0 || c.Tracing.SampleRatio > 1 {
		errs = append(errs, fmt.Errorf("tracing.sampleRatio %g: want 0 to 1", c.Tracing.SampleRatio))
	}
	if c.Tracing.Endpoint != "" {
		if _, _, err := net.SplitHostPort(c.Tracing.Endpoint); err != nil {
			errs = append(errs, fmt.Errorf("tracing.endpoint %q: want host:port", c.Tracing.Endpoint))
		}
	}
	if err := c.Inventory.Validate(); err != nil {
		errs = append(errs, err)
	}
	if h := c.Health; h.MaxClockSkew <= 0 || h.CertificateDays < 0 || h.MaxWait <= 0 || h.MaxRunning <= 0 {
		errs = append(errs, errors.New("health: want maxClockSkew, maxWait and maxRunning > 0 and certificateDays >= 0"))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return policy, nil
}

func (l LimitsConfig) validate() []error {
	var errs []error
	if l.BufferedBytes < 1<<20 {
		errs = append(errs, fmt.Errorf("limits.bufferedBytes %d: want at least 1 MiB", l.BufferedBytes))
	}
	if l.Connections <= 0 || l.ConnectionsPerIdentity <= 0 {
		errs = append(errs, errors.New("limits.connections and limits.connectionsPerIdentity must be positive"))
	}
	for _, w := range []struct {
		name string
		size ByteSize
	}{{"streamWindow", l.StreamWindow}, {"connectionWindow", l.ConnectionWindow}} {
		// gRPC ignores windows under the HTTP/2 default of 64 KiB.
		if w.size < 64<<10 || w.size > 1<<30 {
			errs = append(errs, fmt.Errorf("limits.%s %d: want 64 KiB to 1 GiB", w.name, w.size))
		}
	}
	if l.NodeBuffer < 1<<10 {
		errs = append(errs, fmt.Errorf("limits.nodeBuffer %d: want at least 1 KiB", l.NodeBuffer))
	}
	if l.ConcurrentCallsPerIdentity <= 0 || l.CallsPerSecondPerIdentity <= 0 || l.CallBurstPerIdentity <= 0 {
		errs = append(errs, errors.New("limits.concurrentCallsPerIdentity, limits.callsPerSecondPerIdentity and limits.callBurstPerIdentity must be positive"))
	}
	return errs
}
