// Command apid is a gateway that gives a whole cluster one gRPC API
// endpoint: it terminates mutual TLS, routes each call by its node/nodes
// metadata to the local node agent or to other nodes' apid, and merges the
// replies of fanned-out calls.
//
// Subcommands:
//
//	apid serve   run the gateway (the production command)
//	apid demo    run a local demo cluster of N gateways and example agents
//	apid agent   run the example node agent alone
//	apid gen     generate a CA, node and client certificates
//	apid check   validate a configuration and the files it names
//	apid version print the version, commit and Go version
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/signal"
	"runtime"
	"syscall"

	"github.com/apid/apid/internal/gateway"
	"github.com/apid/apid/internal/version"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil && !errors.Is(err, flag.ErrHelp) {
		fmt.Fprintln(os.Stderr, "apid:", err)
		os.Exit(1)
	}
}

const usage = `usage: apid <command> [flags]

commands:
  serve   run the gateway (listens on :50000 with mutual TLS)
  demo    run a demo cluster on this machine (127.0.0.11, .12, .13 …)
  agent   run the example node agent
  gen     generate certificates: gen ca | gen node | gen client
  check   validate a configuration file: check -config FILE
  version print the version, commit and Go version

Run 'apid <command> -h' for a command's flags.
`

func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return errors.New("no command given")
	}
	cmd, rest := args[0], args[1:]
	switch cmd {
	case "serve":
		return runServe(ctx, rest, stderr)
	case "demo":
		return runDemo(ctx, rest, stdout, stderr)
	case "agent":
		return runAgent(ctx, rest, stderr)
	case "gen":
		return runGen(rest, stdout, stderr)
	case "check":
		return runCheck(rest, stdout, stderr)
	case "version", "-version", "--version":
		v := version.Get()
		fmt.Fprintf(stdout, "apid %s\ncommit %s\ngo %s %s/%s\n", v.Version, v.Commit, v.Go, runtime.GOOS, runtime.GOARCH)
		return nil
	case "help", "-h", "--help":
		fmt.Fprint(stdout, usage)
		return nil
	}
	fmt.Fprint(stderr, usage)
	return fmt.Errorf("unknown command %q", cmd)
}

// newLogger is a logger at a fixed level, for commands that never reload.
func newLogger(w io.Writer, level, format string) *slog.Logger {
	v := new(slog.LevelVar)
	v.Set(gateway.ParseLevel(level))
	return gateway.NewLogger(w, v, format)
}
