package certs_test

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/apid/apid/certs"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
)

// Example wires a Source into a gRPC server that keeps its certificates
// current, and reads the caller's roles in an interceptor.
func Example() {
	src, err := certs.NewSource(certs.Files{
		CA:   "/system/secrets/ca.crt",
		Cert: "/system/secrets/apid.crt",
		Key:  "/system/secrets/apid.key",
	})
	if err != nil {
		slog.Error("load certificates", "err", err)

		return
	}

	ctx, cancel := context.WithCancel(context.Background())

	var wg sync.WaitGroup

	wg.Go(func() {
		src.Watch(ctx, 30*time.Second,
			func() { slog.Info("certificates reloaded", "generation", src.Generation()) },
			func(err error) { slog.Warn("certificates not reloaded", "err", err) })
	})

	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(certs.ServerConfig(src, certs.ServerOptions{}))),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			cert, ok := certs.PeerCertificate(ctx)
			if !ok || !slices.Contains(certs.Roles(cert), certs.RoleAdmin) {
				return nil, status.Error(codes.PermissionDenied, "admin role required")
			}

			return handler(ctx, req)
		}),
	)

	// ... register services and Serve; on shutdown:
	srv.GracefulStop()
	cancel()
	wg.Wait()
}
