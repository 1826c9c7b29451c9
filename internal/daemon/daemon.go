package daemon

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"

	sd "github.com/coreos/go-systemd/v22/daemon"
	"golang.org/x/sys/unix"

	"github.com/apid/apid/internal/gateway"
	"github.com/apid/apid/internal/logbuf"
	"github.com/apid/apid/internal/version"
)

// Signals are the signals a running apid answers, caught from Catch on: a
// SIGHUP while apid loads must not kill it (its default action), and the
// first stop signal drains whatever context the caller passed.
type Signals struct{ ch chan os.Signal }

// Catch starts catching SIGHUP, SIGTERM and interrupts.
func Catch() *Signals {
	s := &Signals{ch: make(chan os.Signal, 4)}
	signal.Notify(s.ch, syscall.SIGHUP, syscall.SIGTERM, os.Interrupt)
	return s
}

// Release stops catching them; a SIGHUP that comes later is ignored: a late
// reload request is not a reason to die.
func (s *Signals) Release() {
	signal.Stop(s.ch)
	signal.Ignore(syscall.SIGHUP)
}

// Serve runs a gateway made from cfg on cfg.Listen until ctx ends or a stop
// signal comes, logging to stderr. On SIGHUP it applies what reload reads
// (the whole configuration, as at start; reload writes its complaints to
// the writer it is given); a configuration that does not load or validate
// is refused and the running one stays.
func (s *Signals) Serve(ctx context.Context, cfg gateway.Config, stderr io.Writer, reload func(stderr io.Writer) (gateway.Config, error)) error {
	ctx, drain := context.WithCancel(ctx)
	defer drain()
	// The log (a line per call) goes out in batches: see logbuf. What is
	// held is written before apid exits, error or not.
	logOut := logbuf.New(stderr, logbuf.DefaultInterval, 64<<10)
	defer logOut.Close()
	level := new(slog.LevelVar)
	log := gateway.NewLogger(logOut, level, cfg.LogFormat)
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
			notify(log, sd.SdNotifyReady)
		case <-served:
			return
		}
		stopping := false
		for {
			select {
			case <-served:
				return
			case sig := <-s.ch:
				switch {
				case sig == syscall.SIGHUP:
					notify(log, sd.SdNotifyReloading+"\n"+monotonic())
					log.Info("SIGHUP: reloading the configuration")
					if next, err := reload(logOut); err != nil {
						gw.ReloadFailed(err)
					} else {
						_ = gw.Reload(next) // logged and counted by the gateway
					}
					notify(log, sd.SdNotifyReady)
				case !stopping:
					stopping = true
					notify(log, sd.SdNotifyStopping)
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

// notify tells systemd (Type=notify) about the service's state; without
// NOTIFY_SOCKET it does nothing.
func notify(log *slog.Logger, state string) {
	if _, err := sd.SdNotify(false, state); err != nil {
		log.Warn("systemd notification failed", "state", state, "err", err)
	}
}

// monotonic is the MONOTONIC_USEC field systemd wants with RELOADING=1.
func monotonic() string {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return fmt.Sprintf("MONOTONIC_USEC=%d", ts.Nano()/1000)
}
