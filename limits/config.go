package limits

import (
	"errors"
	"fmt"
	"strconv"
	"strings"

	"gopkg.in/yaml.v3"
)

// Config is the limits section of apid's configuration: what callers can
// make apid hold. Sizes are bytes, or a number with KiB, MiB or GiB. The
// reload tag says whether a reload applies a key to new calls (live) or a
// restart is needed.
type Config struct {
	// BufferedBytes is the budget of bytes held for calls in flight
	// (messages being relayed, requests kept for several nodes, replies kept
	// for a merge, messages queued for a slow client); past it new calls
	// get RESOURCE_EXHAUSTED and running ones go on. Default: an eighth of
	// the memory of the machine or cgroup, at least 64 MiB.
	BufferedBytes ByteSize `yaml:"bufferedBytes" reload:"live"`
	// Connections bounds the authenticated client connections open at
	// once. Default 4096.
	Connections int `yaml:"connections" reload:"live"`
	// Handshakes bounds the connections still in their TLS handshake, apart
	// from the authenticated ones: when full, the oldest unfinished one is
	// closed. HandshakesPerSource bounds those of one source address (the
	// PROXY header's, behind a balancer), and ConnectionsPerSourcePerSecond
	// the new connections one source opens a second (bursts of twice
	// that). Defaults 1024, 64 and 100.
	Handshakes                    int     `yaml:"handshakes" reload:"live"`
	HandshakesPerSource           int     `yaml:"handshakesPerSource" reload:"live"`
	ConnectionsPerSourcePerSecond float64 `yaml:"connectionsPerSourcePerSecond" reload:"live"`
	// ConnectionsPerIdentity bounds the connections open at once with one
	// client certificate subject. Default 256.
	ConnectionsPerIdentity int `yaml:"connectionsPerIdentity" reload:"live"`
	// StreamWindow is the HTTP/2 receive window of each stream, towards
	// clients and towards nodes: what one stream whose reader stalls can
	// make a hop hold. Default 256 KiB.
	StreamWindow ByteSize `yaml:"streamWindow" reload:"restart"`
	// ConnectionWindow is the HTTP/2 receive window of each connection,
	// shared by its streams. Default 1 MiB.
	ConnectionWindow ByteSize `yaml:"connectionWindow" reload:"restart"`
	// NodeBuffer is what a streamed fan-out queues of one node's messages
	// for a client that reads slower than the nodes send. Default 64 KiB.
	NodeBuffer ByteSize `yaml:"nodeBuffer" reload:"restart"`
	// ConcurrentCallsPerIdentity bounds the calls one client certificate
	// subject has in flight at once on this apid, over all its
	// connections. Calls another apid forwarded were counted there and are
	// not counted again. Default 1000.
	ConcurrentCallsPerIdentity int `yaml:"concurrentCallsPerIdentity" reload:"live"`
	// CallsPerSecondPerIdentity and CallBurstPerIdentity are a token
	// bucket per client certificate subject: calls start at most this many
	// a second on average, and bursts of up to CallBurstPerIdentity.
	// Defaults 500 and 1000.
	CallsPerSecondPerIdentity float64 `yaml:"callsPerSecondPerIdentity" reload:"live"`
	CallBurstPerIdentity      int     `yaml:"callBurstPerIdentity" reload:"live"`
	// CallsPerIdentityPerNode and StreamsPerIdentityPerNode bound what one
	// client certificate subject has in flight to one node at once, short
	// calls and streams apart: all calls to a node share its connection
	// and its stream limit. Defaults 250 and 125 (a quarter and an eighth
	// of the 1,000 streams an apid node allows one connection).
	CallsPerIdentityPerNode   int `yaml:"callsPerIdentityPerNode" reload:"live"`
	StreamsPerIdentityPerNode int `yaml:"streamsPerIdentityPerNode" reload:"live"`
	// ClientCertificatesPerHour bounds the client certificates one
	// subject may have issued an hour (GenerateClientConfiguration, talosctl
	// config new): each has a subject, and so limits, of its own. Default 20.
	ClientCertificatesPerHour int `yaml:"clientCertificatesPerHour" reload:"live"`
	// RapidResets is how many calls one connection may cancel within
	// 100 ms of starting them, in 10 s, before apid closes it (HTTP/2
	// Rapid Reset: each reset call may already have reached a node).
	// Default 500.
	RapidResets int `yaml:"rapidResets" reload:"live"`
}

// DefaultConfig returns the limits with every default filled in.
func DefaultConfig() Config {
	return Config{
		BufferedBytes:                 ByteSize(DefaultMemory()),
		Connections:                   4096,
		Handshakes:                    1024,
		HandshakesPerSource:           64,
		ConnectionsPerSourcePerSecond: 100,
		ConnectionsPerIdentity:        256,
		StreamWindow:                  256 << 10,
		ConnectionWindow:              1 << 20,
		NodeBuffer:                    64 << 10,
		ConcurrentCallsPerIdentity:    1000,
		CallsPerSecondPerIdentity:     500,
		CallBurstPerIdentity:          1000,
		CallsPerIdentityPerNode:       250,
		StreamsPerIdentityPerNode:     125,
		ClientCertificatesPerHour:     20,
		RapidResets:                   500,
	}
}

// Validate lists every bad key of the section, each by its full path.
func (c Config) Validate() error {
	var errs []error
	if c.BufferedBytes < 1<<20 {
		errs = append(errs, fmt.Errorf("limits.bufferedBytes %d: want at least 1MiB", c.BufferedBytes))
	}
	positive := func(key string, v float64) {
		if v <= 0 {
			errs = append(errs, fmt.Errorf("limits.%s %g: must be positive", key, v))
		}
	}
	positive("connections", float64(c.Connections))
	positive("connectionsPerIdentity", float64(c.ConnectionsPerIdentity))
	positive("handshakes", float64(c.Handshakes))
	positive("handshakesPerSource", float64(c.HandshakesPerSource))
	positive("connectionsPerSourcePerSecond", c.ConnectionsPerSourcePerSecond)
	for _, w := range []struct {
		key  string
		size ByteSize
	}{{"streamWindow", c.StreamWindow}, {"connectionWindow", c.ConnectionWindow}} {
		// gRPC ignores windows under the HTTP/2 default of 64 KiB.
		if w.size < 64<<10 || w.size > 1<<30 {
			errs = append(errs, fmt.Errorf("limits.%s %d: want 64KiB to 1GiB", w.key, w.size))
		}
	}
	if c.NodeBuffer < 1<<10 {
		errs = append(errs, fmt.Errorf("limits.nodeBuffer %d: want at least 1KiB", c.NodeBuffer))
	}
	positive("concurrentCallsPerIdentity", float64(c.ConcurrentCallsPerIdentity))
	positive("callsPerSecondPerIdentity", c.CallsPerSecondPerIdentity)
	positive("callBurstPerIdentity", float64(c.CallBurstPerIdentity))
	positive("callsPerIdentityPerNode", float64(c.CallsPerIdentityPerNode))
	positive("streamsPerIdentityPerNode", float64(c.StreamsPerIdentityPerNode))
	positive("clientCertificatesPerHour", float64(c.ClientCertificatesPerHour))
	positive("rapidResets", float64(c.RapidResets))
	return errors.Join(errs...)
}

// ByteSize is a number of bytes, written in YAML as an integer or as a
// number followed by B, KiB, MiB or GiB ("256KiB").
type ByteSize int64

// UnmarshalYAML accepts an integer or a number with a binary unit.
func (b *ByteSize) UnmarshalYAML(n *yaml.Node) error {
	v, err := ParseByteSize(n.Value)
	if err != nil {
		// A TypeError lets the decoder go on and report the file's other
		// bad values with this one.
		return &yaml.TypeError{Errors: []string{fmt.Sprintf("line %d: %v", n.Line, err)}}
	}
	*b = v
	return nil
}

// ParseByteSize reads an integer or a number with a binary unit.
func ParseByteSize(s string) (ByteSize, error) {
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
