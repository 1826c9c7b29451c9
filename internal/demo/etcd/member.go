package etcd

import (
	"context"
	"crypto/tls"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"time"

	"go.etcd.io/etcd/client/pkg/v3/transport"
	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
)

// MemberConfig configures one member of a real etcd cluster that a
// control-plane demo node runs in-process (etcd's embed package): what a
// Talos control-plane node runs as its etcd service.
type MemberConfig struct {
	// Name is the member's name: the node's hostname, as Talos names it.
	Name string
	// DataDir holds the member's data; an existing one is reused.
	DataDir string
	// ClientURL and PeerURL are where it serves clients and peers
	// (http://IP:2379, http://IP:2380 on a Talos node).
	ClientURL, PeerURL string
	// InitialCluster names every member's peer URL (name=url,...), for a
	// new cluster's first start.
	InitialCluster string
	// TLS, if set, is how the member serves clients (ClientURL https://):
	// as Talos's etcd does, with its certificate, and only to clients
	// with a certificate from the CA; its own clients (the node's etcd
	// API) present ClientCert.
	TLS *TLSFiles
}

// TLSFiles are a member's certificate files: its serving pair, the CA its
// clients' certificates come from, and the client pair the node's own
// etcd API presents.
type TLSFiles struct {
	CA, Cert, Key         string
	ClientCert, ClientKey string
}

// Member is a running member.
type Member struct {
	cfg  MemberConfig
	mu   sync.Mutex
	e    *embed.Etcd // nil once stopped
	done chan struct{}
}

// RecoveryPath is where a snapshot uploaded to recover etcd from is kept:
// beside the member's data directory.
func (e *Member) RecoveryPath() string { return filepath.Clean(e.cfg.DataDir) + ".recovery.snapshot" }

// Start starts a member. The members of a new cluster must start
// together: each waits for the others (for a quorum) until ctx ends; use
// Ready to wait for that.
func Start(m MemberConfig) (*Member, error) {
	client, err := url.Parse(m.ClientURL)
	if err != nil {
		return nil, fmt.Errorf("etcd client URL: %w", err)
	}
	peer, err := url.Parse(m.PeerURL)
	if err != nil {
		return nil, fmt.Errorf("etcd peer URL: %w", err)
	}
	if err := os.MkdirAll(m.DataDir, 0o700); err != nil {
		return nil, err
	}
	e, err := start(m, client, peer)
	if err != nil {
		return nil, err
	}
	return &Member{cfg: m, e: e, done: make(chan struct{})}, nil
}

// start starts etcd for m: a new cluster's member, or, with data in its
// directory already, the member that data belongs to.
func start(m MemberConfig, client, peer *url.URL) (*embed.Etcd, error) {
	cfg := embed.NewConfig()
	cfg.Name, cfg.Dir = m.Name, m.DataDir
	cfg.ListenClientUrls, cfg.AdvertiseClientUrls = []url.URL{*client}, []url.URL{*client}
	cfg.ListenPeerUrls, cfg.AdvertisePeerUrls = []url.URL{*peer}, []url.URL{*peer}
	cfg.InitialCluster, cfg.InitialClusterToken = m.InitialCluster, "apid-demo"
	if m.TLS != nil {
		cfg.ClientTLSInfo = transport.TLSInfo{CertFile: m.TLS.Cert, KeyFile: m.TLS.Key, TrustedCAFile: m.TLS.CA, ClientCertAuth: true}
	}
	cfg.ClusterState = embed.ClusterStateFlagNew
	// Slower than etcd's defaults (100 ms, 1 s): the demo shares a laptop's
	// or a test machine's cores, and a missed heartbeat should not start
	// an election.
	cfg.TickMs, cfg.ElectionMs = 200, 2000
	// etcd's own log goes beside its data, errors only.
	cfg.LogLevel, cfg.LogOutputs = "error", []string{filepath.Join(m.DataDir, "etcd.log")}
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("etcd member %s: %w", m.Name, err)
	}
	return e, nil
}

// Restart starts a stopped member again from its data, as a rebooted node
// starts its etcd: it rejoins its cluster. A running member is left alone.
func (e *Member) Restart() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.e != nil {
		return nil
	}
	if _, err := os.Stat(filepath.Join(e.cfg.DataDir, "member")); err != nil {
		return fmt.Errorf("etcd member %s: no data to restart from (it left the cluster): %w", e.cfg.Name, err)
	}
	client, err := url.Parse(e.cfg.ClientURL)
	if err != nil {
		return err
	}
	peer, err := url.Parse(e.cfg.PeerURL)
	if err != nil {
		return err
	}
	srv, err := start(e.cfg, client, peer)
	if err != nil {
		return err
	}
	e.e = srv
	return nil
}

// Ready waits until the member serves (it has joined a quorum), or ctx
// ends.
func (e *Member) Ready(ctx context.Context) error {
	e.mu.Lock()
	srv := e.e
	e.mu.Unlock()
	if srv == nil {
		return fmt.Errorf("etcd member %s is stopped", e.cfg.Name)
	}
	select {
	case <-srv.Server.ReadyNotify():
		return nil
	case err := <-srv.Err():
		return fmt.Errorf("etcd member %s: %w", e.cfg.Name, err)
	case <-ctx.Done():
		return fmt.Errorf("etcd member %s not ready: %w", e.cfg.Name, ctx.Err())
	}
}

// ClientURL is where the member serves clients.
func (e *Member) ClientURL() string { return e.cfg.ClientURL }

// ClientTLS is what a client of the member presents and trusts; nil when
// the member serves clients without TLS.
func (e *Member) ClientTLS() (*tls.Config, error) {
	if e.cfg.TLS == nil {
		return nil, nil
	}
	return transport.TLSInfo{CertFile: e.cfg.TLS.ClientCert, KeyFile: e.cfg.TLS.ClientKey, TrustedCAFile: e.cfg.TLS.CA}.ClientConfig()
}

// Name is the member's name.
func (e *Member) Name() string { return e.cfg.Name }

// Running reports whether the member has not been stopped.
func (e *Member) Running() bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.e != nil
}

// Stop stops the member (within 10 s); it may be called more than once.
func (e *Member) Stop() {
	e.mu.Lock()
	srv := e.e
	e.e = nil
	e.mu.Unlock()
	if srv == nil {
		return
	}
	stopped := make(chan struct{})
	go func() { srv.Close(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
	}
}

// forget stops the member and removes its data: after it left the
// cluster, its data is no longer valid (Talos removes it too).
func (e *Member) forget() error {
	e.Stop()
	return os.RemoveAll(e.cfg.DataDir)
}

// etcdClientLogger keeps etcd's client quiet: its errors reach the caller.
var etcdClientLogger = zap.NewNop()
