package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/apid/apid/internal/gateway"
)

// loadConfig builds the configuration from defaults, the optional YAML
// file and the flags: the file overrides defaults and flags override the
// file, which is done by parsing the flags again over the file's values.
// The gateway validates the result.
func loadConfig(command string, args []string, stderr io.Writer) (gateway.Config, error) {
	parse := func(cfg *gateway.Config) (file string, err error) {
		fs := flag.NewFlagSet(command, flag.ContinueOnError)
		fs.SetOutput(stderr)
		fs.StringVar(&file, "config", "", "YAML configuration `file` (flags override it)")
		bindConfigFlags(fs, cfg)
		return file, fs.Parse(args)
	}
	cfg := gateway.Default()
	file, err := parse(&cfg)
	if err != nil || file == "" {
		return cfg, err
	}
	data, err := os.ReadFile(file)
	if err != nil {
		return cfg, err
	}
	cfg = gateway.Default()
	decodeErr := gateway.Decode(data, &cfg)
	var wrongTypes *gateway.DecodeError
	if decodeErr != nil && !errors.As(decodeErr, &wrongTypes) {
		return cfg, fmt.Errorf("%s: %w", file, decodeErr)
	}
	if _, err = parse(&cfg); err != nil {
		return cfg, err
	}
	if wrongTypes != nil {
		// Every problem in one run: the values of the wrong type, and
		// what validation finds in the rest of the file.
		return cfg, fmt.Errorf("%s: %w", file, errors.Join(wrongTypes, cfg.Validate()))
	}
	return cfg, nil
}

// bindConfigFlags binds the flags to c, whose current values are the defaults
// shown and kept when a flag is not given. -self adds to the names.
func bindConfigFlags(fs *flag.FlagSet, c *gateway.Config) {
	def := *c
	fs.StringVar(&c.Listen, "listen", def.Listen, "gateway listen `address`")
	fs.StringVar(&c.TLS.CA, "ca", def.TLS.CA, "CA bundle `file` (PEM)")
	fs.StringVar(&c.TLS.Cert, "cert", def.TLS.Cert, "node certificate `file` (PEM)")
	fs.StringVar(&c.TLS.Key, "key", def.TLS.Key, "node key `file` (PEM)")
	fs.StringVar(&c.TLS.ClientCert, "client-cert", def.TLS.ClientCert, "forwarding certificate `file` presented to other nodes (PEM; apid gen node writes NAME-client.crt)")
	fs.StringVar(&c.TLS.ClientKey, "client-key", def.TLS.ClientKey, "forwarding key `file` (PEM)")
	fs.StringVar(&c.Backend, "backend", def.Backend, "local node agent `address`: unix:///path.sock or host:port")
	fs.IntVar(&c.Nodes.Port, "remote-port", def.Nodes.Port, "`port` of other nodes' apid")
	fs.Func("self", "a `name` or address of this node (repeatable or comma-separated)", func(s string) error {
		for _, n := range strings.Split(s, ",") {
			if n = strings.TrimSpace(n); n != "" {
				c.Routing.SelfNames = append(c.Routing.SelfNames, n)
			}
		}
		return nil
	})
	fs.IntVar(&c.Routing.MaxNodes, "max-nodes", def.Routing.MaxNodes, "most nodes one request may name")
	fs.DurationVar(&c.Routing.NodeTimeout, "node-timeout", def.Routing.NodeTimeout, "per-node deadline of fan-out unary calls (0: none)")
	fs.BoolVar(&c.TLS.AllowTLS12, "allow-tls12", def.TLS.AllowTLS12, "also accept TLS 1.2 clients (AEAD suites only)")
	fs.StringVar(&c.AdminListen, "admin-listen", def.AdminListen, "serve /healthz, /readyz and /metrics over plain HTTP on this `address` (off when empty)")
	fs.DurationVar(&c.DrainDelay, "drain-delay", def.DrainDelay, "on SIGTERM, keep accepting calls this long with readiness failing")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", def.ShutdownTimeout, "then give running calls this long before they end with UNAVAILABLE")
	fs.StringVar(&c.LogLevel, "log-level", def.LogLevel, "debug, info, warn or error")
	fs.StringVar(&c.LogFormat, "log-format", def.LogFormat, "json (one object a line) or text")
	fs.StringVar(&c.Tracing.Endpoint, "tracing-endpoint", def.Tracing.Endpoint, "export OpenTelemetry traces to this OTLP/gRPC `host:port` (off when empty and no OTEL_EXPORTER_OTLP_ENDPOINT)")
	fs.BoolVar(&c.Tracing.Insecure, "tracing-insecure", def.Tracing.Insecure, "send traces without TLS")
}
