package clientconfig_test

import (
	"crypto/x509"
	"encoding/pem"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
	"github.com/apid/apid/pki"
)

// TestGenerateClientConfiguration checks what the agent itself refuses,
// whatever apid's policy let through: roles beyond the caller's own
// (unless it is an admin), unknown roles, os:impersonator, bad TTLs; and
// that each issued client has a subject of its own.
func TestGenerateClientConfiguration(t *testing.T) {
	ca, err := pki.NewCA("test CA", 24*time.Hour*400, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	cfg := node.Config{Endpoints: []string{"gw.example:50000"}, ClusterName: "c1"}
	cfg.ClientCA.Cert, cfg.ClientCA.Key = ca.CertPEM, ca.KeyPEM
	mc, _, _ := nodetest.Start(t, cfg, "unix")
	call := func(held []string, roles []string, ttl time.Duration) (*machine.GenerateClientConfiguration, error) {
		ctx := testkit.Context(t)
		for _, r := range held {
			ctx = metadata.AppendToOutgoingContext(ctx, "talos-role", r)
		}
		resp, err := mc.GenerateClientConfiguration(ctx, &machine.GenerateClientConfigurationRequest{Roles: roles, CrtTtl: durationpb.New(ttl)})
		if err != nil {
			return nil, err
		}
		return resp.GetMessages()[0], nil
	}
	subject := func(g *machine.GenerateClientConfiguration) (string, []string) {
		block, _ := pem.Decode(g.GetCrt())
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		roots := x509.NewCertPool()
		roots.AddCert(ca.Cert)
		if _, err := c.Verify(x509.VerifyOptions{Roots: roots, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
			t.Fatalf("issued certificate does not verify: %v", err)
		}
		return c.Subject.CommonName, c.Subject.Organization
	}

	a, err := call([]string{"os:admin"}, []string{"os:reader", "os:operator", "os:reader"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	b, err := call([]string{"os:admin"}, []string{"os:reader", "os:operator"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cnA, orgA := subject(a)
	cnB, _ := subject(b)
	if !slices.Equal(orgA, []string{"os:reader", "os:operator"}) || cnA == cnB || !strings.HasPrefix(cnA, "generated-reader+operator-") {
		t.Errorf("subjects %q %v and %q", cnA, orgA, cnB)
	}
	if !strings.Contains(string(a.GetTalosconfig()), "gw.example:50000") || !strings.Contains(string(a.GetTalosconfig()), "context: c1") {
		t.Errorf("talosconfig:\n%s", a.GetTalosconfig())
	}

	// Any validity within the CA's, as Talos grants; an operator's bound,
	// when set, on top.
	if _, err := call([]string{"os:admin"}, []string{"os:reader"}, 390*24*time.Hour); err != nil {
		t.Errorf("390 days from a CA valid 400: %v", err)
	}
	bounded := cfg
	bounded.MaxClientTTL = 24 * time.Hour
	bmc, _, _ := nodetest.Start(t, bounded, "unix")
	_, err = bmc.GenerateClientConfiguration(metadata.AppendToOutgoingContext(testkit.Context(t), "talos-role", "os:admin"),
		&machine.GenerateClientConfigurationRequest{Roles: []string{"os:reader"}, CrtTtl: durationpb.New(48 * time.Hour)})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "longer than the 24h0m0s this agent grants (-max-client-ttl)") {
		t.Errorf("48h from an agent bounded at 24h: %v", err)
	}

	// An operator (were a policy to let it call this) issues operators or
	// readers, never admins.
	if _, err := call([]string{"os:operator", "os:reader"}, []string{"os:operator"}, time.Hour); err != nil {
		t.Errorf("operator issuing an operator: %v", err)
	}
	for _, tc := range []struct {
		held, roles []string
		ttl         time.Duration
		code        codes.Code
		words       string
	}{
		{[]string{"os:operator"}, []string{"os:admin"}, time.Hour, codes.PermissionDenied, "needs that role or os:admin; the caller has os:operator"},
		{nil, []string{"os:reader"}, time.Hour, codes.PermissionDenied, "the caller has no roles"},
		{[]string{"os:admin"}, []string{"os:impersonator"}, time.Hour, codes.InvalidArgument, "for apid nodes"},
		{[]string{"os:admin"}, []string{"os:raeder"}, time.Hour, codes.InvalidArgument, `unknown role "os:raeder"`},
		{[]string{"os:admin"}, nil, time.Hour, codes.InvalidArgument, "no roles"},
		{[]string{"os:admin"}, []string{"os:reader"}, 0, codes.InvalidArgument, "crt_ttl should be positive"},
		// The CA is valid 400 days: 2 years (Talos's own test asks that
		// much of a real cluster's CA) cannot be granted here.
		{[]string{"os:admin"}, []string{"os:reader"}, 2 * 365 * 24 * time.Hour, codes.InvalidArgument, "longer than the client CA's remaining validity"},
	} {
		_, err := call(tc.held, tc.roles, tc.ttl)
		if status.Code(err) != tc.code || !strings.Contains(err.Error(), tc.words) {
			t.Errorf("held %v asking %v for %s: %v, want %s %q", tc.held, tc.roles, tc.ttl, err, tc.code, tc.words)
		}
	}

	// Without a CA the agent is a worker: FailedPrecondition.
	worker, _, _ := nodetest.Start(t, node.Config{}, "unix")
	_, err = worker.GenerateClientConfiguration(metadata.AppendToOutgoingContext(testkit.Context(t), "talos-role", "os:admin"),
		&machine.GenerateClientConfigurationRequest{Roles: []string{"os:reader"}, CrtTtl: durationpb.New(time.Hour)})
	nodetest.WantCode(t, err, codes.FailedPrecondition)
}
