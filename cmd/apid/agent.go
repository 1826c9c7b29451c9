//go:build !nodemo

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/pki"
)

func runAgent(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "unix:///tmp/apid-agent.sock", "`address` to serve on: unix:///path.sock or host:port")
	hostname := fs.String("hostname", "", "hostname to report (default: this machine's)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	var roots []string
	fs.Func("read-root", "a `directory` Read, List and Copy may serve files from (repeatable; default /proc, /sys and /etc)", func(s string) error {
		roots = append(roots, s)
		return nil
	})
	caCert := fs.String("client-ca-cert", "", "PEM `file` of the CA that signs client certificates: with -client-ca-key, GenerateClientConfiguration (talosctl config new) issues clients")
	caKey := fs.String("client-ca-key", "", "PEM `file` of that CA's private key")
	endpoints := fs.String("endpoints", "", "comma-separated gateway `addresses` written into generated talosconfigs")
	maxTTL := fs.Duration("max-client-ttl", 0, "longest validity GenerateClientConfiguration grants (0: until the client CA expires, as Talos)")
	cluster := fs.String("cluster-name", node.DefaultClusterName, "`name` in generated talosconfig contexts (admin@NAME)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg := node.Config{Hostname: *hostname, ReadRoots: roots, MaxClientTTL: *maxTTL, ClusterName: *cluster}
	if (*caCert == "") != (*caKey == "") {
		return errors.New("-client-ca-cert and -client-ca-key go together")
	}
	if *caCert != "" {
		// The agent does not authenticate its callers (apid does, and
		// forwards their roles): a CA key behind a TCP port would issue
		// clients to anyone who can reach it.
		if !strings.HasPrefix(*listen, "unix:") {
			return fmt.Errorf("-client-ca-cert: the agent serves a client CA only on a unix socket (-listen unix:///path), not on %s", *listen)
		}
		var err error
		if cfg.ClientCA.Cert, err = os.ReadFile(*caCert); err != nil {
			return err
		}
		if cfg.ClientCA.Key, err = os.ReadFile(*caKey); err != nil {
			return err
		}
		if _, err := pki.LoadCA(cfg.ClientCA.Cert, cfg.ClientCA.Key); err != nil {
			return fmt.Errorf("-client-ca-cert/-client-ca-key: %w", err)
		}
	}
	if *endpoints != "" {
		cfg.Endpoints = strings.Split(*endpoints, ",")
	}
	log := newLogger(stderr, *level, "text")
	lis, err := node.Listen(*listen)
	if err != nil {
		return err
	}
	cfg.Logger = log
	a := node.New(cfg)
	defer a.Close() // after the server has stopped: ends a simulation in progress
	log.Info("example agent serving", "listen", *listen)
	return a.Serve(ctx, lis, log)
}
