package certs_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"net"
	"slices"
	"testing"

	"github.com/apid/apid/certs"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

func TestRoles(t *testing.T) {
	t.Parallel()

	tests := []struct {
		name string
		orgs []string
		want []string
	}{
		{"none", nil, nil},
		{"one", []string{certs.RoleAdmin}, []string{certs.RoleAdmin}},
		{"order kept", []string{certs.RoleReader, certs.RoleEtcdBackup}, []string{certs.RoleReader, certs.RoleEtcdBackup}},
		{"duplicates dropped", []string{certs.RoleReader, certs.RoleAdmin, certs.RoleReader}, []string{certs.RoleReader, certs.RoleAdmin}},
		{"unknown kept", []string{"os:future", certs.RoleReader}, []string{"os:future", certs.RoleReader}},
		{"empty dropped", []string{"", certs.RoleImpersonator, ""}, []string{certs.RoleImpersonator}},
		{"only empty", []string{""}, nil},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			cert := &x509.Certificate{Subject: pkix.Name{Organization: tt.orgs}}
			if got := certs.Roles(cert); !slices.Equal(got, tt.want) {
				t.Errorf("Roles(%q) = %q, want %q", tt.orgs, got, tt.want)
			}
		})
	}

	if got := certs.Roles(nil); got != nil {
		t.Errorf("Roles(nil) = %q", got)
	}
}

func TestPeerCertificate(t *testing.T) {
	t.Parallel()

	leaf := &x509.Certificate{Subject: pkix.Name{CommonName: "leaf"}}
	verified := tls.ConnectionState{
		PeerCertificates: []*x509.Certificate{leaf},
		VerifiedChains:   [][]*x509.Certificate{{leaf}},
	}
	unverified := tls.ConnectionState{PeerCertificates: []*x509.Certificate{leaf}}
	addr := &net.TCPAddr{IP: net.IPv4(127, 0, 0, 1), Port: 1}

	tests := []struct {
		name string
		ctx  context.Context
		want bool
	}{
		{"no peer", context.Background(), false},
		{"no auth info", peer.NewContext(context.Background(), &peer.Peer{Addr: addr}), false},
		{"unverified", peer.NewContext(context.Background(), &peer.Peer{Addr: addr, AuthInfo: credentials.TLSInfo{State: unverified}}), false},
		{"verified", peer.NewContext(context.Background(), &peer.Peer{Addr: addr, AuthInfo: credentials.TLSInfo{State: verified}}), true},
		{"verified pointer", peer.NewContext(context.Background(), &peer.Peer{Addr: addr, AuthInfo: &credentials.TLSInfo{State: verified}}), true},
	}

	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()

			got, ok := certs.PeerCertificate(tt.ctx)
			if ok != tt.want || (ok && got != leaf) || (!ok && got != nil) {
				t.Errorf("PeerCertificate = %v, %v; want ok=%v", got, ok, tt.want)
			}
		})
	}
}
