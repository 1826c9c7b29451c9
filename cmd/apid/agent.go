//go:build !nodemo

package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"

	"google.golang.org/grpc"

	"github.com/apid/apid/agent"
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
	cluster := fs.String("cluster-name", agent.DefaultClusterName, "`name` in generated talosconfig contexts (admin@NAME)")
	if err := fs.Parse(args); err != nil {
		return err
	}
	cfg := agent.Config{Hostname: *hostname, ReadRoots: roots, MaxClientTTL: *maxTTL, ClusterName: *cluster}
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
	lis, err := agent.Listen(*listen)
	if err != nil {
		return err
	}
	cfg.Logger = log
	a := agent.New(cfg)
	defer a.Close() // after the server has stopped: ends a simulation in progress
	srv := grpc.NewServer(a.ServerOptions()...)
	a.Register(srv)
	log.Info("example agent serving", "listen", *listen)
	return serveUntil(ctx, srv, lis, log)
}

// serveUntil serves lis until ctx ends, then stops the server.
func serveUntil(ctx context.Context, srv *grpc.Server, lis net.Listener, log *slog.Logger) error {
	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	select {
	case err := <-done:
		return err
	case <-ctx.Done():
		log.Debug("stopping", "listen", lis.Addr().String())
		srv.Stop()
		<-done
		return nil
	}
}
