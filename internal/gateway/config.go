package gateway

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"reflect"
	"regexp"
	"strconv"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/apid/apid/auth"
	"github.com/apid/apid/certs"
	"github.com/apid/apid/clusterhealth"
	"github.com/apid/apid/director"
	"github.com/apid/apid/disruption"
	"github.com/apid/apid/inventory"
	"github.com/apid/apid/limits"
)

// Config is everything a gateway needs. It composes the sections each
// package owns (their keys, defaults, validation and reload rules live
// there) with the gateway's own keys: its listeners, its server transport,
// its drain and its logs. Defaults come from Default; a YAML file (Decode)
// overrides them, and apid serve's flags the file. Every key carries a
// reload tag: live keys apply, on a reload, to calls that start after it;
// restart keys need a restart.
type Config struct {
	// Listen is the gateway's address. Default ":50000".
	Listen string `yaml:"listen" reload:"restart"`
	// Backend is the local node agent: unix:///path.sock or host:port
	// (plaintext; keep it on loopback).
	Backend string `yaml:"backend" reload:"restart"`
	// TLS is this node's key material: ca, cert, key, allowTLS12,
	// reloadInterval.
	TLS certs.Config `yaml:",inline"`
	// Routing is which nodes a call may name and how it fans out:
	// selfNames, maxNodes, nodeTimeout, forwardMetadata, the streaming
	// method lists and ejection.
	Routing director.Config `yaml:",inline"`
	// Nodes are the connections to other nodes' apid: remotePort,
	// idleTimeout, maxConnections, maxDials, tcpUserTimeout.
	Nodes director.PoolConfig `yaml:",inline"`
	// ProxyProtocol lists the balancers (CIDRs) whose connections begin
	// with a PROXY protocol header (v1 or v2, as HAProxy's send-proxy-v2
	// sends it), naming the client's own address: per-source limits and
	// the audit log then see clients, not the balancer. A header from any
	// other address is refused. Empty: none expected.
	ProxyProtocol []string `yaml:"proxyProtocol" reload:"restart"`
	// MaxMessageSize bounds one gRPC message either way. Default 32 MiB.
	MaxMessageSize int `yaml:"maxMessageSize" reload:"restart"`
	// HandshakeTimeout closes connections whose TLS handshake has not
	// finished in time. Default 10s.
	HandshakeTimeout time.Duration `yaml:"handshakeTimeout" reload:"restart"`
	// MaxConcurrentStreams bounds the calls open at once on one client
	// connection (HTTP/2 Rapid Reset). Default 1000.
	MaxConcurrentStreams uint32 `yaml:"maxConcurrentStreams" reload:"restart"`
	// MaxConnectionIdle closes a client connection that has carried no call
	// for this long (a GOAWAY first, so the client reconnects cleanly when
	// it needs to). Default 5m.
	MaxConnectionIdle time.Duration `yaml:"maxConnectionIdle" reload:"restart"`
	// MaxConnectionAge sends a client connection older than this a GOAWAY:
	// the client opens a new one for its next calls, so that long-lived
	// clients spread again over the gateways behind a balancer. Running
	// calls go on. Default 1h. Zero: never.
	MaxConnectionAge time.Duration `yaml:"maxConnectionAge" reload:"restart"`
	// MaxConnectionAgeGrace is how long calls may still run on a connection
	// past MaxConnectionAge before it is closed. Zero (the default): as
	// long as they need.
	MaxConnectionAgeGrace time.Duration `yaml:"maxConnectionAgeGrace" reload:"restart"`
	// Limits bound what clients can make apid hold.
	Limits limits.Config `yaml:"limits"`
	// AdminListen serves /healthz (alive), /readyz (ready for calls) and
	// /metrics (Prometheus) over plain HTTP at this address: keep it on
	// loopback or a private interface. Default 127.0.0.1:50001. Empty: off.
	AdminListen string `yaml:"adminListen" reload:"restart"`
	// AdminPublic allows an adminListen address other than loopback: the
	// admin endpoint has no authentication, and its pages name every node
	// and caller activity. Off by default.
	AdminPublic bool `yaml:"adminPublic" reload:"restart"`
	// AdminHosts are the names (besides IP addresses, localhost and a
	// request with no Host) the admin endpoint answers to: a page served
	// to any Host could be read by a web page through DNS rebinding from
	// an operator's browser. Empty: none.
	AdminHosts []string `yaml:"adminHosts" reload:"live"`
	// DrainDelay is how long apid, told to stop, goes on accepting calls
	// with readiness already failing, so that balancers notice before
	// connections are refused. Default 5s.
	DrainDelay time.Duration `yaml:"drainDelay" reload:"live"`
	// ShutdownTimeout is how long running calls get to finish once apid
	// stops accepting; then they end with UNAVAILABLE. Default 30s.
	ShutdownTimeout time.Duration `yaml:"shutdownTimeout" reload:"live"`
	// LogLevel is debug, info, warn or error. Default info.
	LogLevel string `yaml:"logLevel" reload:"live"`
	// LogFormat is json (the default: one object per line, for log
	// pipelines) or text.
	LogFormat string `yaml:"logFormat" reload:"restart"`
	// Tracing exports OpenTelemetry traces; off unless an endpoint is set
	// here or in the environment.
	Tracing TracingConfig `yaml:"tracing" reload:"restart"`
	// Policy replaces or extends the built-in role policy.
	Policy auth.Config `yaml:"policy"`
	// Inventory lists the nodes callers may name, and the groups
	// (@controlplane, @workers, @all, @key=value) they form. Without one,
	// nodes are named by address or DNS name only.
	Inventory inventory.Config `yaml:"inventory" reload:"live"`
	// Health configures the cluster health check apid serves itself
	// (cluster.ClusterService/HealthCheck, talosctl health).
	Health clusterhealth.Config `yaml:"health"`
	// Disruption is the disruption budget: how many nodes of each group
	// callers may take down at once (reboots, shutdowns, upgrades, etcd
	// membership); calls over it wait their turn.
	Disruption disruption.Config `yaml:"disruption"`
}

// Default returns the configuration with every default filled in; a YAML
// file (Decode) and flags override it.
func Default() Config {
	return Config{
		Listen:               ":50000",
		Backend:              "unix:///system/run/machined/machine.sock",
		TLS:                  certs.DefaultConfig(),
		Routing:              director.DefaultConfig(),
		Nodes:                director.DefaultPoolConfig(),
		MaxMessageSize:       32 << 20,
		HandshakeTimeout:     10 * time.Second,
		MaxConcurrentStreams: 1000,
		MaxConnectionIdle:    5 * time.Minute,
		MaxConnectionAge:     time.Hour,
		Limits:               limits.DefaultConfig(),
		AdminListen:          "127.0.0.1:50001",
		DrainDelay:           5 * time.Second,
		ShutdownTimeout:      30 * time.Second,
		LogLevel:             "info",
		LogFormat:            "json",
		Tracing:              TracingConfig{SampleRatio: 1},
		Health:               clusterhealth.DefaultConfig(),
		Disruption:           disruption.DefaultConfig(),
	}
}

// Decode overrides cfg with the YAML document data. Unknown keys are
// errors, each named by its full path with the nearest valid key, so a
// typo is never silently ignored.
func Decode(data []byte, cfg *Config) error {
	var doc yaml.Node
	if err := yaml.Unmarshal(data, &doc); err != nil {
		return err
	}
	errs := unknownKeys(&doc, reflect.TypeFor[Config](), "")
	if errs = append(errs, emptyValues(&doc, "")...); len(errs) > 0 {
		return errors.Join(errs...)
	}
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(cfg); err != nil && err != io.EOF {
		return typeErrors(err, valueKeys(&doc, ""))
	}
	return nil
}

// DecodeError lists the values of a configuration file that are not of
// their key's type, one line each with its key. The keys decoded around
// them keep their values (the others their defaults), so a caller may
// validate the rest and report every problem at once.
type DecodeError struct{ Problems []error }

func (e *DecodeError) Error() string { return errors.Join(e.Problems...).Error() }

// Unwrap returns the problems, one per value.
func (e *DecodeError) Unwrap() []error { return e.Problems }

var typeProblem = regexp.MustCompile("^line (\\d+): cannot unmarshal !!(\\w+) `(.*)` into (.+)$")

// typeErrors words the decoder's errors by key: what the value is not,
// and how to write it.
func typeErrors(err error, keys map[int]string) error {
	var te *yaml.TypeError
	if !errors.As(err, &te) {
		if line, rest, ok := cutLine(err.Error()); ok && keys[line] != "" {
			return &DecodeError{[]error{fmt.Errorf("line %d: %s: %s", line, keys[line], rest)}}
		}
		return err
	}
	out := &DecodeError{}
	for _, msg := range te.Errors {
		m := typeProblem.FindStringSubmatch(msg)
		if m == nil {
			if line, rest, ok := cutLine(msg); ok && keys[line] != "" {
				msg = fmt.Sprintf("line %d: %s: %s", line, keys[line], rest)
			}
			out.Problems = append(out.Problems, errors.New(msg))
			continue
		}
		line, _ := strconv.Atoi(m[1])
		key := keys[line]
		if key == "" {
			key = "a value"
		}
		out.Problems = append(out.Problems, fmt.Errorf("line %d: %s: %s %s", line, key, m[3], want(m[2], m[3], m[4])))
	}
	return out
}

// want says what a value of the decoder's target type looks like.
func want(tag, value, target string) string {
	switch {
	case target == "time.Duration":
		if tag == "int" || tag == "float" {
			return fmt.Sprintf("is not a duration: write %ss (or ms, m, h)", value)
		}
		return "is not a duration: write it as 500ms, 30s, 5m or 1h"
	case strings.HasPrefix(target, "int") || strings.HasPrefix(target, "uint"):
		return "is not a whole number"
	case strings.HasPrefix(target, "float"):
		return "is not a number"
	case target == "bool":
		return "is not true or false"
	case strings.HasPrefix(target, "[]"):
		return "is not a list: write [a, b] or one item a line, each after -"
	case strings.HasPrefix(target, "map["):
		return "is not a mapping: write {key: value}"
	case target == "string":
		return "is not a single value"
	}
	return "is not a section of keys (" + target + ")"
}

// cutLine splits "line N: rest" (a custom type's error).
func cutLine(msg string) (int, string, bool) {
	rest, ok := strings.CutPrefix(msg, "line ")
	if !ok {
		return 0, "", false
	}
	num, rest, ok := strings.Cut(rest, ": ")
	n, err := strconv.Atoi(num)
	return n, rest, ok && err == nil
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
	add := func(err error) {
		if err != nil {
			errs = append(errs, unjoin(err)...)
		}
	}
	if _, _, err := net.SplitHostPort(c.Listen); err != nil {
		add(fmt.Errorf("listen %q: want host:port, such as :50000", c.Listen))
	}
	if c.Backend == "" {
		add(errors.New("backend: an address is required: unix:///path.sock or host:port"))
	} else if !strings.HasPrefix(c.Backend, "unix://") {
		if _, _, err := net.SplitHostPort(c.Backend); err != nil {
			add(fmt.Errorf("backend %q: want unix:///path.sock or host:port", c.Backend))
		}
	}
	for i, n := range c.ProxyProtocol {
		if _, err := netip.ParsePrefix(n); err != nil {
			add(fmt.Errorf("proxyProtocol[%d] %q: want the balancers' CIDR, such as 10.0.0.5/32", i, n))
		}
	}
	add(c.TLS.Validate())
	add(c.Routing.Validate())
	add(c.Nodes.Validate())
	if c.MaxMessageSize < 1024 {
		add(fmt.Errorf("maxMessageSize %d: want at least 1024", c.MaxMessageSize))
	}
	if c.HandshakeTimeout <= 0 {
		add(fmt.Errorf("handshakeTimeout %s: must be positive", c.HandshakeTimeout))
	}
	if c.MaxConcurrentStreams == 0 {
		add(errors.New("maxConcurrentStreams 0: must be positive"))
	}
	if c.MaxConnectionIdle <= 0 {
		add(fmt.Errorf("maxConnectionIdle %s: must be positive", c.MaxConnectionIdle))
	}
	for _, d := range []struct {
		key string
		d   time.Duration
	}{{"maxConnectionAge", c.MaxConnectionAge}, {"maxConnectionAgeGrace", c.MaxConnectionAgeGrace}, {"drainDelay", c.DrainDelay}, {"shutdownTimeout", c.ShutdownTimeout}} {
		if d.d < 0 {
			add(fmt.Errorf("%s %s: want 0 or more", d.key, d.d))
		}
	}
	add(c.Limits.Validate())
	if c.AdminListen != "" {
		if _, _, err := net.SplitHostPort(c.AdminListen); err != nil {
			add(fmt.Errorf("adminListen %q: want host:port, such as 127.0.0.1:50001, or empty for none", c.AdminListen))
		} else if c.AdminListen == c.Listen {
			add(fmt.Errorf("adminListen %q: the same address as listen", c.AdminListen))
		} else if !c.AdminPublic && !loopback(c.AdminListen) {
			add(fmt.Errorf("adminListen %q is not a loopback address: the admin endpoint has no authentication and names every node; keep it on 127.0.0.1, or set adminPublic: true on a network only operators reach", c.AdminListen))
		}
	}
	for i, h := range c.AdminHosts {
		if !inventory.ValidDNSName(h) || net.ParseIP(h) != nil {
			add(fmt.Errorf("adminHosts[%d] %q: want a DNS name without a port, such as apid.example.internal (IP addresses and localhost are always accepted)", i, h))
		}
	}
	switch c.LogLevel {
	case "debug", "info", "warn", "error":
	default:
		add(fmt.Errorf("logLevel %q: want debug, info, warn or error", c.LogLevel))
	}
	if c.LogFormat != "json" && c.LogFormat != "text" {
		add(fmt.Errorf("logFormat %q: want json or text", c.LogFormat))
	}
	add(c.Tracing.Validate())
	policy, err := c.Policy.Policy()
	add(err)
	add(c.Inventory.Validate())
	add(c.Health.Validate())
	add(c.Disruption.Validate())
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return policy, nil
}

// loopback reports whether the host of addr (host:port) is a loopback
// address or localhost.
func loopback(addr string) bool {
	host, _, _ := net.SplitHostPort(addr)
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
