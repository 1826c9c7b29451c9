package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	"github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/apid/apid/internal/gateway"
	"github.com/apid/apid/internal/logbuf"
	"github.com/apid/apid/internal/version"
)

// howToStart answers apid serve given nothing to serve with.
const howToStart = `apid serve needs a configuration: apid serve -config apid.yaml (deploy/apid.yaml lists every key),
or flags (-ca, -cert, -key, -client-cert, -client-key, -backend; apid serve -h).
No certificates yet? apid gen ca, then apid gen node -name NAME -ip IP.
Just looking? apid demo runs a whole cluster on this machine`

func runServe(ctx context.Context, args []string, stderr io.Writer) error {
	if len(args) == 0 {
		return errors.New(howToStart)
	}
	// Signals are caught from the start: a SIGHUP while apid loads must
	// not kill it (its default action), and the first stop signal drains
	// whatever context the caller passed.
	signals := make(chan os.Signal, 4)
	signal.Notify(signals, syscall.SIGHUP, syscall.SIGTERM, os.Interrupt)
	defer signal.Ignore(syscall.SIGHUP) // a late reload request is not a reason to die
	defer signal.Stop(signals)
	ctx, drain := context.WithCancel(ctx)
	defer drain()

	cfg, err := loadConfig("serve", args, stderr)
	if err != nil {
		return err
	}
	// The log (a line per call) goes out in batches: see logbuf. What is
	// held is written before apid exits, error or not.
	logOut := logbuf.New(stderr, logbuf.DefaultInterval, 64<<10)
	defer logOut.Close()
	stderr = logOut
	level := new(slog.LevelVar)
	log := gateway.NewLogger(stderr, level, cfg.LogFormat)
	gw, err := gateway.New(cfg, log, gateway.WithLogLevel(level))
	if err != nil {
		return err
	}
	defer gw.Close()

	lis, err := net.Listen("tcp", cfg.Listen)
	if err != nil {
		return err
	}
	v := version.Get()
	log.Info("apid serving", "listen", lis.Addr().String(), "admin", cfg.AdminListen, "backend", cfg.Backend,
		"remote_port", cfg.Nodes.Port, "version", v.Version, "commit", v.Commit, "go", v.Go)

	served := make(chan struct{})
	defer close(served)
	go func() {
		select {
		case <-gw.Serving():
			notify(log, daemon.SdNotifyReady)
		case <-served:
			return
		}
		stopping := false
		for {
			select {
			case <-served:
				return
			case sig := <-signals:
				switch {
				case sig == syscall.SIGHUP:
					notify(log, daemon.SdNotifyReloading+"\n"+monotonic())
					reload(gw, args, log, stderr)
					notify(log, daemon.SdNotifyReady)
				case !stopping:
					stopping = true
					notify(log, daemon.SdNotifyStopping)
					log.Info("stop requested; a second signal stops at once", "signal", sig.String())
					drain()
				default:
					log.Warn("second stop signal: ending running calls now", "signal", sig.String())
					gw.StopNow()
				}
			}
		}
	}()
	return gw.Serve(ctx, lis)
}

// reload re-reads the whole configuration (file and flags, as at start)
// and applies it; a configuration that does not load or validate is
// refused and the running one stays.
func reload(gw *gateway.Gateway, args []string, log *slog.Logger, stderr io.Writer) {
	log.Info("SIGHUP: reloading the configuration")
	next, err := loadConfig("serve", args, stderr)
	if err != nil {
		gw.ReloadFailed(err)
		return
	}
	_ = gw.Reload(next) // logged and counted by the gateway
}

// notify tells systemd (Type=notify) about the service's state; without
// NOTIFY_SOCKET it does nothing.
func notify(log *slog.Logger, state string) {
	if _, err := daemon.SdNotify(false, state); err != nil {
		log.Warn("systemd notification failed", "state", state, "err", err)
	}
}

// monotonic is the MONOTONIC_USEC field systemd wants with RELOADING=1.
func monotonic() string {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return fmt.Sprintf("MONOTONIC_USEC=%d", ts.Nano()/1000)
}
