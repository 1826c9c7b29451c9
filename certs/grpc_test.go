package certs_test

import (
	"context"
	"crypto/tls"
	"errors"
	"github.com/apid/apid/internal/testpki"
	"net"
	"slices"
	"sync"
	"testing"

	"github.com/apid/apid/certs"
	"github.com/apid/apid/pki"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// TestNodeToNode dials a gRPC server built on ServerConfig with ClientConfig
// and a second node's certificate, as one apid forwards to another.
func TestNodeToNode(t *testing.T) {
	t.Parallel()

	ca := testpki.NewCA(t, "cluster")
	server := testpki.Must[*certs.Source](t)(certs.NewSource(writeFiles(t, t.TempDir(), ca.CertPEM, issueNode(t, ca, pki.KeyECDSA))))
	client := testpki.Must[*certs.Source](t)(certs.NewSource(writeFiles(t, t.TempDir(), ca.CertPEM, issueNode(t, ca, pki.KeyEd25519))))

	var (
		mu    sync.Mutex
		roles []string
	)

	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(certs.ServerConfig(server, certs.ServerOptions{}))),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
			if cert, ok := certs.PeerCertificate(ctx); ok {
				mu.Lock()
				roles = certs.Roles(cert)
				mu.Unlock()
			}

			return handler(ctx, req)
		}),
	)
	healthpb.RegisterHealthServer(srv, health.NewServer())

	lis := testpki.Must[net.Listener](t)(net.Listen("tcp", "127.0.0.1:0"))

	var wg sync.WaitGroup

	wg.Go(func() { _ = srv.Serve(lis) })
	t.Cleanup(func() {
		srv.Stop()
		wg.Wait()
	})

	conn := testpki.Must[*grpc.ClientConn](t)(grpc.NewClient(lis.Addr().String(),
		grpc.WithTransportCredentials(credentials.NewTLS(certs.ClientConfig(client, "127.0.0.1")))))
	t.Cleanup(func() { _ = conn.Close() })

	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	defer cancel()

	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}

	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("status %v", resp.GetStatus())
	}

	mu.Lock()
	defer mu.Unlock()

	if !slices.Equal(roles, []string{certs.RoleImpersonator}) {
		t.Fatalf("server saw roles %q, want [%s]", roles, certs.RoleImpersonator)
	}
}

func TestClientConfigVerifiesServer(t *testing.T) {
	t.Parallel()

	dir := t.TempDir()
	ca, other := testpki.NewCA(t, "cluster"), testpki.NewCA(t, "other")
	server := testpki.Must[*certs.Source](t)(certs.NewSource(writeFiles(t, t.TempDir(), ca.CertPEM, issueNode(t, ca, pki.KeyECDSA))))
	srv := startTLSServer(t, certs.ServerConfig(server, certs.ServerOptions{}))

	// The dialling node trusts only another CA at first.
	node := issueNode(t, ca, pki.KeyECDSA)
	files := writeFiles(t, dir, other.CertPEM, node)
	client := testpki.Must[*certs.Source](t)(certs.NewSource(files))

	try := func(name string) error {
		_, err := dial(t, srv.addr, certs.ClientConfig(client, name))
		srv.next(t)

		return err
	}

	if err := try("127.0.0.1"); err == nil {
		t.Fatal("server of an untrusted CA accepted")
	}

	// After a reload the dialling node trusts the server's CA.
	writeFiles(t, dir, slices.Concat(other.CertPEM, ca.CertPEM), node)

	if _, err := client.Reload(); err != nil {
		t.Fatal(err)
	}

	if err := try("127.0.0.1"); err != nil {
		t.Fatalf("server refused after reload: %v", err)
	}

	if err := try("[127.0.0.1]"); err != nil {
		t.Fatalf("bracketed name: %v", err)
	}

	var verr *tls.CertificateVerificationError

	for _, name := range []string{"10.0.0.9", "other.test", ""} {
		if err := try(name); err == nil {
			t.Fatalf("server accepted under the name %q it does not carry", name)
		} else if name != "" && !errors.As(err, &verr) {
			t.Fatalf("name %q: error %v is not a CertificateVerificationError", name, err)
		}
	}
}
