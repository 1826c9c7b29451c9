package disruption

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
	"go.uber.org/zap"
)

// EtcdConfig shares one budget between the gateways of a cluster: the
// calls each admitted are leases in the cluster's etcd. Without
// endpoints, each gateway keeps a budget of its own.
type EtcdConfig struct {
	// Endpoints are the etcd members' client URLs (https://IP:2379 on a
	// Talos control-plane node).
	Endpoints []string `yaml:"endpoints"`
	// CA verifies the members; Cert and Key are the client certificate
	// etcd authenticates apid by. Talos's etcd has no roles: this
	// certificate reads every Kubernetes secret, so Key must be a file of
	// its own, mode 0600, apart from apid's other keys.
	CA   string `yaml:"ca"`
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
	// Prefix is where the leases live. Default DefaultPrefix.
	Prefix string `yaml:"prefix"`
	// LeaseTTL is how long the leases of a gateway that died outlive it.
	// Default 10s; at least 5s.
	LeaseTTL time.Duration `yaml:"leaseTTL"`
}

// DefaultPrefix is where gateways keep the disruptions they admitted: one
// key per admitted call, PREFIX<node>/<gateway>/<call>.
const DefaultPrefix = "/apid/disruptions/"

// Configured reports whether the budget is shared through etcd.
func (c EtcdConfig) Configured() bool { return len(c.Endpoints) > 0 }

func (c EtcdConfig) withDefaults() EtcdConfig {
	if c.Prefix == "" {
		c.Prefix = DefaultPrefix
	}
	if c.LeaseTTL == 0 {
		c.LeaseTTL = 10 * time.Second
	}
	return c
}

// validate lists the section's bad etcd keys.
func (c EtcdConfig) validate() []error {
	if !c.Configured() {
		if c.CA != "" || c.Cert != "" || c.Key != "" {
			return []error{errors.New("disruption.etcd: ca, cert and key are set but no endpoints")}
		}
		return nil
	}
	var errs []error
	for _, e := range c.Endpoints {
		u, err := url.Parse(e)
		if err != nil || u.Scheme != "https" || u.Host == "" {
			errs = append(errs, fmt.Errorf("disruption.etcd.endpoints %q: want https://host:2379 (Talos's etcd serves TLS with client certificates)", e))
		}
	}
	for key, v := range map[string]string{"ca": c.CA, "cert": c.Cert, "key": c.Key} {
		if v == "" {
			errs = append(errs, fmt.Errorf("disruption.etcd.%s: required with endpoints", key))
		}
	}
	if c.Prefix != "" && (!strings.HasPrefix(c.Prefix, "/") || !strings.HasSuffix(c.Prefix, "/")) {
		errs = append(errs, fmt.Errorf("disruption.etcd.prefix %q: want a path that starts and ends with /", c.Prefix))
	}
	if c.LeaseTTL != 0 && c.LeaseTTL < 5*time.Second {
		errs = append(errs, fmt.Errorf("disruption.etcd.leaseTTL %s: at least 5s", c.LeaseTTL))
	}
	return errs
}

// record is one disruption a gateway admitted, as etcd keeps it.
type record struct {
	Node    string    `json:"node"`
	Gateway string    `json:"gateway"`
	Method  string    `json:"method"`
	Caller  string    `json:"caller"`
	Since   time.Time `json:"since"`
	Forced  bool      `json:"forced,omitempty"`
	// Lease is the writer's lease: a gateway knows its own records by it,
	// not by its name, which two gateways may share.
	Lease int64 `json:"lease"`
}

// what describes r for a person, as slot.what does.
func (r record) what() string {
	s := slot{method: r.Method, caller: r.Caller, since: r.Since, forced: r.Forced, reason: "see its gateway's log"}
	return s.what() + " through " + r.Gateway
}

// etcdTimeout bounds each conversation with etcd.
const etcdTimeout = 3 * time.Second

// shared is the budget's records in etcd.
type shared struct {
	cfg     EtcdConfig
	gateway string // this gateway's name in the records
	tls     *tls.Config

	mu     sync.Mutex
	cli    *clientv3.Client     // replaced when steered
	sess   *concurrency.Session // nil until needed, or once lost or idle
	claims int                  // claims running on sess
	keys   int                  // records written on sess and not deleted
	closed bool
	avoid  []string // endpoints left out (their members' nodes are down)
}

// errNoLease wraps the failure to get a lease: etcd cannot be asked at
// all (no quorum, unreachable), unlike a lock that is merely busy.
var errNoLease = errors.New("no lease from etcd")

// steer keeps this gateway's etcd client off the members of the nodes in
// hosts (addresses), while others serve: a lease's keep-alive stream on a
// member that goes down holds its shutdown back, and the client would
// only move to another member after a timeout.
func (s *shared) steer(hosts []string) {
	var keep, avoid []string
	for _, e := range s.cfg.Endpoints {
		u, err := url.Parse(e)
		if err == nil && slices.Contains(hosts, u.Hostname()) {
			avoid = append(avoid, e)
		} else {
			keep = append(keep, e)
		}
	}
	if len(keep) == 0 {
		keep, avoid = s.cfg.Endpoints, nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if slices.Equal(avoid, s.avoid) || s.claims > 0 || s.closed {
		return // the same, or later: a claim uses the client now
	}
	// A new client on the members kept, the lease carried over to it;
	// closing the old one ends its streams at once (moving its endpoints
	// would leave them running on the old connections).
	cli, err := clientv3.New(clientv3.Config{Endpoints: keep, DialTimeout: etcdTimeout, Logger: zap.NewNop(), TLS: s.tls})
	if err != nil {
		return
	}
	if s.sess != nil {
		sess, err := concurrency.NewSession(cli, concurrency.WithLease(s.sess.Lease()))
		if err != nil {
			_ = cli.Close()
			return
		}
		s.sess = sess // the old one ends with its client, its lease kept
	}
	old := s.cli
	s.cli, s.avoid = cli, avoid
	go old.Close()
}

// client is the etcd client now.
func (s *shared) client() *clientv3.Client {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cli
}

// idle ends this gateway's lease session once it holds no record and no
// claim runs: a session keeps a stream open on one member, for nothing.
func (s *shared) idle() {
	s.mu.Lock()
	var sess *concurrency.Session
	if s.sess != nil && s.claims == 0 && s.keys == 0 {
		sess, s.sess = s.sess, nil
	}
	s.mu.Unlock()
	if sess != nil {
		ctx, cancel := context.WithTimeout(context.Background(), etcdTimeout)
		defer cancel()
		_, _ = sess.Client().Revoke(ctx, sess.Lease())
		sess.Orphan()
	}
}

// CheckFiles reads the etcd client's files as the gateway would and says
// what is wrong with them: the key readable by others (an etcd client
// certificate reads every Kubernetes secret), a pair that does not load,
// a CA file without a certificate. others are the key files of apid's own
// identities, which the etcd key must not be.
func (c EtcdConfig) CheckFiles(others ...string) error {
	if !c.Configured() {
		return nil
	}
	for _, o := range others {
		if o != "" && filepath.Clean(o) == filepath.Clean(c.Key) {
			return fmt.Errorf("disruption.etcd.key %s is also apid's own key: the etcd client certificate must be an identity of its own, in a file of its own", c.Key)
		}
	}
	_, _, err := c.load()
	return err
}

// load reads the client's pair and the CA.
func (c EtcdConfig) load() (tls.Certificate, *x509.CertPool, error) {
	fi, err := os.Stat(c.Key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("disruption.etcd.key: %w", err)
	}
	if fi.Mode().Perm()&0o077 != 0 {
		return tls.Certificate{}, nil, fmt.Errorf("disruption.etcd.key %s: mode %04o: an etcd client certificate reads every Kubernetes secret, so its key must be readable by apid alone (chmod 600)", c.Key, fi.Mode().Perm())
	}
	pair, err := tls.LoadX509KeyPair(c.Cert, c.Key)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("disruption.etcd: %w", err)
	}
	caPEM, err := os.ReadFile(c.CA)
	if err != nil {
		return tls.Certificate{}, nil, fmt.Errorf("disruption.etcd.ca: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(caPEM) {
		return tls.Certificate{}, nil, fmt.Errorf("disruption.etcd.ca %s: no certificate in it", c.CA)
	}
	return pair, roots, nil
}

// newShared connects to etcd (lazily: nothing is asked until a disruption
// is). The key file must be this client's alone.
func newShared(cfg EtcdConfig, gateway string) (*shared, error) {
	cfg = cfg.withDefaults()
	pair, roots, err := cfg.load()
	if err != nil {
		return nil, err
	}
	tlsConfig := &tls.Config{RootCAs: roots, Certificates: []tls.Certificate{pair}, MinVersion: tls.VersionTLS12}
	cli, err := clientv3.New(clientv3.Config{Endpoints: cfg.Endpoints, DialTimeout: etcdTimeout, Logger: zap.NewNop(), TLS: tlsConfig})
	if err != nil {
		return nil, fmt.Errorf("disruption.etcd: %w", err)
	}
	return &shared{cfg: cfg, gateway: gateway, tls: tlsConfig, cli: cli}, nil
}

// session returns this gateway's lease session, made anew when lost.
func (s *shared) session(ctx context.Context) (*concurrency.Session, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.claims++ // the caller ends its claim (record: at once)
	if s.sess != nil {
		select {
		case <-s.sess.Done():
			s.sess = nil // the lease expired (etcd unreachable for its TTL)
		default:
			return s.sess, nil
		}
	}
	grant, err := s.cli.Grant(ctx, int64(s.cfg.LeaseTTL/time.Second))
	if err != nil {
		s.claims--
		return nil, fmt.Errorf("%w: %w", errNoLease, err)
	}
	sess, err := concurrency.NewSession(s.cli, concurrency.WithLease(grant.ID))
	if err != nil {
		s.claims--
		return nil, fmt.Errorf("%w: %w", errNoLease, err)
	}
	s.sess = sess
	return sess, nil
}

// list reads every gateway's records, by node, without this gateway's.
func (s *shared) list(ctx context.Context) (map[string][]record, error) {
	s.mu.Lock()
	cli, own := s.cli, clientv3.NoLease
	if s.sess != nil {
		own = s.sess.Lease()
	}
	s.mu.Unlock()
	resp, err := cli.Get(ctx, s.cfg.Prefix, clientv3.WithPrefix())
	if err != nil {
		return nil, err
	}
	out := map[string][]record{}
	for _, kv := range resp.Kvs {
		var r record
		if json.Unmarshal(kv.Value, &r) != nil || r.Node == "" || (own != clientv3.NoLease && clientv3.LeaseID(r.Lease) == own) {
			continue
		}
		out[r.Node] = append(out[r.Node], r)
	}
	return out, nil
}

// key is where a record of this gateway's call id lives, on lease.
func (s *shared) key(node string, lease clientv3.LeaseID, id uint64) string {
	return fmt.Sprintf("%s%s/%s-%x/%d", s.cfg.Prefix, node, s.gateway, int64(lease), id)
}

// claim takes the cluster-wide lock of the budget, reads the others'
// records, asks decide whether the call fits, and if so writes its record
// under this gateway's lease, all before the lock is let go: two gateways
// never both admit "the one" disruption a group allows.
func (s *shared) claim(ctx context.Context, r record, id uint64, decide func(others map[string][]record) bool, commit func(key string)) (ok bool, err error) {
	sess, err := s.session(ctx)
	if err != nil {
		return false, err
	}
	defer func() {
		s.mu.Lock()
		s.claims--
		s.mu.Unlock()
	}()
	m := concurrency.NewMutex(sess, strings.TrimSuffix(s.cfg.Prefix, "/")+".lock/")
	if err := m.Lock(ctx); err != nil {
		return false, err
	}
	defer func() {
		unlock, cancel := context.WithTimeout(context.Background(), etcdTimeout)
		defer cancel()
		_ = m.Unlock(unlock)
	}()
	others, err := s.list(ctx)
	if err != nil {
		return false, err
	}
	if !decide(others) {
		return false, nil
	}
	key, _, err := s.put(ctx, sess, r, id)
	if err != nil {
		return false, err
	}
	commit(key) // counted here before another gateway may decide
	return true, nil
}

// record writes a forced call's record, which no budget decides.
func (s *shared) record(ctx context.Context, r record, id uint64) (string, error) {
	sess, err := s.session(ctx)
	if err != nil {
		return "", err
	}
	defer func() {
		s.mu.Lock()
		s.claims--
		s.mu.Unlock()
	}()
	key, _, err := s.put(ctx, sess, r, id)
	return key, err
}

func (s *shared) put(ctx context.Context, sess *concurrency.Session, r record, id uint64) (string, bool, error) {
	r.Lease = int64(sess.Lease())
	v, err := json.Marshal(r)
	if err != nil {
		return "", false, err
	}
	key := s.key(r.Node, sess.Lease(), id)
	if _, err := sess.Client().Put(ctx, key, string(v), clientv3.WithLease(sess.Lease())); err != nil {
		return "", false, err
	}
	s.mu.Lock()
	s.keys++
	s.mu.Unlock()
	return key, true, nil
}

// drop deletes a record once its disruption is over (trying again once
// on the client of the moment, if steer replaced the one it began with).
func (s *shared) drop(key string) error {
	defer func() {
		s.mu.Lock()
		s.keys--
		s.mu.Unlock()
	}()
	var err error
	for range 2 {
		ctx, cancel := context.WithTimeout(context.Background(), etcdTimeout)
		_, err = s.client().Delete(ctx, key)
		cancel()
		if err == nil {
			return nil
		}
	}
	return err
}

// close revokes this gateway's lease (its records go with it) and
// disconnects.
func (s *shared) close() {
	s.mu.Lock()
	s.closed = true
	if s.sess != nil {
		_ = s.sess.Close()
	}
	cli := s.cli
	s.mu.Unlock()
	_ = cli.Close()
}

// claim asks the budget shared in etcd to admit w, which this gateway's
// view admits: under the cluster-wide lock, with every gateway's records,
// w is judged again and, if it still fits, recorded and admitted. When
// etcd cannot be asked (no quorum, unreachable), a worker's disruption is
// admitted on this gateway's view alone, and says so; a control-plane
// node's waits (etcd without quorum is when it must not go down anyway).
func (b *Budget) claim(ctx context.Context, w *waiter) bool {
	cctx, cancel := context.WithTimeout(ctx, etcdTimeout)
	defer cancel()
	rec := record{Node: w.node, Gateway: b.o.Gateway, Method: w.method, Caller: w.caller, Since: b.o.Now()}
	ok, err := b.shared.claim(cctx, rec, w.seq, func(others map[string][]record) bool {
		b.mu.Lock()
		defer b.mu.Unlock()
		b.remote = others
		if w.slot != nil || w.err != nil || !slices.Contains(b.queue, w) {
			return false
		}
		w.candidate = false
		if w.why = b.rejudge(w); w.why != "" {
			return false
		}
		return true
	}, func(key string) {
		b.mu.Lock()
		defer b.mu.Unlock()
		if w.slot != nil || w.err != nil {
			// Refused meanwhile (a drain): the record goes again.
			go func() { _ = b.shared.drop(key) }()
			return
		}
		b.admitFromQueue(w).key = key
		b.syncShared()
	})
	if ok {
		b.mu.Lock()
		b.syncShared() // again, now that the claim no longer uses the client
		b.mu.Unlock()
		return true
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if err == nil || w.slot != nil || w.err != nil {
		return w.slot != nil
	}
	w.candidate = false
	if ctx.Err() != nil {
		return false
	}
	if !errors.Is(err, errNoLease) {
		// The lock is busy or etcd slow: asked again at the next turn.
		w.why = "held: the budget shared in etcd did not answer in time (" + describe(err) + "); asking again"
		return false
	}
	if !slices.Contains(b.view(b.Applied()).cp, w.node) {
		if w.why = b.rejudge(w); w.why == "" {
			b.admitFromQueue(w)
			b.o.Log.Warn("disruption admitted on this gateway's own view: the budget shared in etcd cannot be asked",
				"node", w.node, "method", w.method, "caller", w.caller, "error", describe(err))
			return true
		}
		return false
	}
	w.why = "held: the budget shared in etcd cannot be asked (" + describe(err) + "); a control-plane node waits for it"
	return false
}

// rejudge judges w again where it stands in the queue (b.mu held).
func (b *Budget) rejudge(w *waiter) string {
	var blocked []*waiter
	for _, o := range b.queue {
		if o == w {
			break
		}
		if o.slot == nil && o.err == nil {
			blocked = append(blocked, o)
		}
	}
	return b.judge(b.view(b.Applied()), w, blocked, b.queue)
}

// admitFromQueue takes w out of the queue and admits it (b.mu held).
func (b *Budget) admitFromQueue(w *waiter) *slot {
	if i := slices.Index(b.queue, w); i >= 0 {
		b.queue = slices.Delete(b.queue, i, i+1)
	}
	return b.admit(w)
}

// refreshRemote reads the other gateways' records, when shared.
func (b *Budget) refreshRemote(ctx context.Context) {
	if b.shared == nil {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, etcdTimeout)
	defer cancel()
	others, err := b.shared.list(cctx)
	if err != nil {
		return // judged on the last records read; claims read them anew
	}
	b.mu.Lock()
	b.remote = others
	b.mu.Unlock()
}

// recordForced writes a forced call's record, so that every gateway counts
// it.
func (b *Budget) recordForced(ctx context.Context, s *slot, node string) {
	cctx, cancel := context.WithTimeout(ctx, etcdTimeout)
	defer cancel()
	key, err := b.shared.record(cctx, record{Node: node, Gateway: b.o.Gateway, Method: s.method, Caller: s.caller, Since: s.since, Forced: true}, s.id)
	if err != nil {
		b.o.Log.Warn("forced disruption not recorded in etcd: other gateways see it only as the node's state", "node", node, "error", describe(err))
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if n := b.nodes[node]; n != nil && slices.Contains(n.slots, s) {
		s.key = key
		b.syncShared()
		return
	}
	go func() { _ = b.shared.drop(key) }() // over already
}

// syncShared steers the etcd client off the members of the nodes this
// gateway has taken down, and ends its lease session when it holds no
// record (b.mu held; the etcd client is told in the background).
func (b *Budget) syncShared() {
	if b.shared == nil {
		return
	}
	set := b.o.Inventory()
	var hosts []string
	keyed := false
	for name, n := range b.nodes {
		for _, s := range n.slots {
			keyed = keyed || s.key != ""
		}
		if len(n.slots) == 0 {
			continue
		}
		if node, ok := set.Lookup(name); ok {
			hosts = append(hosts, node.Address)
		}
	}
	go func() {
		b.shared.steer(hosts)
		if !keyed {
			b.shared.idle()
		}
	}()
}
