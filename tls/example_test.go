package tls_test

import (
	"context"
	"log/slog"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	apidtls "github.com/apid/apid/tls"
)

// Example wires a Source into a gRPC server that keeps its certificates
// current, and reads the caller's roles in an interceptor.
func Example() {
	src, err := apidtls.NewSource(apidtls.Files{
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
		grpc.Creds(credentials.NewTLS(apidtls.ServerConfig(src, apidtls.ServerOptions{}))),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			cert, ok := apidtls.PeerCertificate(ctx)
			if !ok || !slices.Contains(apidtls.Roles(cert), apidtls.RoleAdmin) {
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
