package main

import (
	"context"
	"io"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/apid/apid/internal/gateway"
)

func runServe(ctx context.Context, args []string, stderr io.Writer) error {
	cfg, err := loadConfig(args, stderr)
	if err != nil {
		return err
	}
	log := gateway.NewLogger(stderr, cfg.LogLevel)
	gw, err := gateway.New(cfg, log)
	if err != nil {
		return err
	}
	defer gw.Close()

	hup := make(chan os.Signal, 1)
	signal.Notify(hup, syscall.SIGHUP)
	defer signal.Stop(hup)
	go func() {
		for {
			select {
			case <-ctx.Done():
				return
			case <-hup:
				gw.Reload()
			}
		}
	}()

	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	log.Info("apid serving", "listen", lis.Addr().String(), "backend", cfg.Backend, "remote_port", cfg.RemotePort)
	return gw.Serve(ctx, lis)
}
