package main

import (
	"context"
	"flag"
	"io"
	"log/slog"
	"net"

	"google.golang.org/grpc"

	"github.com/apid/apid/agent"
)

func runAgent(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("agent", flag.ContinueOnError)
	fs.SetOutput(stderr)
	listen := fs.String("listen", "unix:///tmp/apid-agent.sock", "`address` to serve on: unix:///path.sock or host:port")
	hostname := fs.String("hostname", "", "hostname to report (default: this machine's)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	var roots []string
	fs.Func("read-root", "a `directory` Read, List and Copy may serve files from (repeatable; default /proc and /sys)", func(s string) error {
		roots = append(roots, s)
		return nil
	})
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := newLogger(stderr, *level, "text")
	lis, err := agent.Listen(*listen)
	if err != nil {
		return err
	}
	srv := grpc.NewServer()
	agent.New(agent.Config{Hostname: *hostname, ReadRoots: roots, Logger: log}).Register(srv)
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
