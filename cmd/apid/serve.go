package main

import (
	"context"
	"errors"
	"io"

	"github.com/apid/apid/internal/daemon"
	"github.com/apid/apid/internal/gateway"
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
	signals := daemon.Catch() // from the start: a SIGHUP while loading must not kill apid
	defer signals.Release()
	cfg, err := loadConfig("serve", args, stderr)
	if err != nil {
		return err
	}
	return signals.Serve(ctx, cfg, stderr, func(stderr io.Writer) (gateway.Config, error) {
		return loadConfig("serve", args, stderr)
	})
}
