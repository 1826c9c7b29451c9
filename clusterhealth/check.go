// Package clusterhealth is the cluster health check apid serves itself
// (cluster.ClusterService/HealthCheck, what `talosctl health` calls): the
// gateway is what can see every node. For the nodes the request names, or
// the inventory's when it names none, it checks, streaming a line per step,
// that each node answers through apid within the request's wait timeout,
// that they report the same version, that their clocks agree, and that
// no node certificate expires soon.
//
// It calls the nodes through a Dialer (the router) on behalf of the
// caller, with the caller's roles: the check can learn nothing the caller
// could not ask itself.
package clusterhealth

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/siderolabs/talos/pkg/machinery/api/cluster"
	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	timeapi "github.com/siderolabs/talos/pkg/machinery/api/time"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Dialer connects to one node as a call naming it with `node` would be
// routed, on behalf of the caller in ctx, and checks the node or nodes a
// call names. release (nil for the local agent) is told how the call ended,
// so that a node that keeps failing is ejected as in any fan-out.
type Dialer interface {
	Dial(ctx context.Context, target string) (context.Context, grpc.ClientConnInterface, func(err error), error)
	// CheckTargets returns the status a call with ctx's routing metadata
	// would fail with (an unknown group, a name nobody knows), or nil.
	CheckTargets(ctx context.Context) error
}

// Config is the health section of apid's configuration: what the check
// accepts and costs. Every key applies to checks that start after a reload.
type Config struct {
	// MaxClockSkew is how far a node's clock may be from apid's. Default 2s.
	MaxClockSkew time.Duration `yaml:"maxClockSkew" reload:"live"`
	// CertificateDays fails the check for a node certificate that expires
	// within this many days. Default 30.
	CertificateDays int `yaml:"certificateDays" reload:"live"`
	// MaxWait caps the wait a request asks for (talosctl's default is
	// 20 minutes, and so is this one's): a check keeps asking its pending
	// nodes once a second until then.
	MaxWait time.Duration `yaml:"maxWait" reload:"live"`
	// MaxRunning bounds the checks running at once on this apid; more get
	// RESOURCE_EXHAUSTED. Default 8.
	MaxRunning int `yaml:"maxRunning" reload:"live"`
	// MaxRunningPerIdentity bounds the checks one client certificate
	// subject runs at once, so that one caller cannot take every check
	// for the whole of its wait. Default 2.
	MaxRunningPerIdentity int `yaml:"maxRunningPerIdentity" reload:"live"`
	// MaxNodes bounds the nodes one check covers: apid's maxNodes, set by
	// whoever assembles the server.
	MaxNodes int `yaml:"-"`
}

// DefaultConfig returns the health section with every default filled in.
func DefaultConfig() Config {
	return Config{MaxClockSkew: 2 * time.Second, CertificateDays: 30, MaxWait: 20 * time.Minute, MaxRunning: 8, MaxRunningPerIdentity: 2}
}

// Validate lists every bad key of the section, each by its full path.
func (c Config) Validate() error {
	var errs []error
	if c.MaxClockSkew <= 0 {
		errs = append(errs, fmt.Errorf("health.maxClockSkew %s: must be positive", c.MaxClockSkew))
	}
	if c.CertificateDays < 0 {
		errs = append(errs, fmt.Errorf("health.certificateDays %d: want 0 (no check) or more", c.CertificateDays))
	}
	if c.MaxWait <= 0 {
		errs = append(errs, fmt.Errorf("health.maxWait %s: must be positive", c.MaxWait))
	}
	if c.MaxRunning <= 0 {
		errs = append(errs, fmt.Errorf("health.maxRunning %d: must be positive", c.MaxRunning))
	}
	if c.MaxRunningPerIdentity <= 0 || (c.MaxRunning > 0 && c.MaxRunningPerIdentity > c.MaxRunning) {
		errs = append(errs, fmt.Errorf("health.maxRunningPerIdentity %d: want 1 to health.maxRunning (%d)", c.MaxRunningPerIdentity, c.MaxRunning))
	}
	return errors.Join(errs...)
}

// Defaults of a request.
const (
	// DefaultWaitTimeout applies when the request sets none.
	DefaultWaitTimeout = time.Minute
	// parallel bounds the nodes asked at once.
	parallel = 32
	// attemptTimeout bounds one call to one node.
	attemptTimeout = 5 * time.Second
	// retryEvery is the pause between two rounds of a check that failed.
	retryEvery = time.Second
)

// Options is what a Server needs of the gateway that assembles it. Only
// Dialer is required.
type Options struct {
	// Dialer reaches the nodes (the router).
	Dialer Dialer
	// Nodes lists the control-plane and worker nodes to check when the
	// request names none (the inventory).
	Nodes func() (controlPlane, workers []string)
	// Self is the certificate this apid serves: the local node's.
	Self func() *x509.Certificate
	// Authorize says whether the caller in ctx may call a method: the
	// local node's agent is reached without apid's authorizer in between
	// (other nodes' apid apply their own), so the check asks first. Nil:
	// every call allowed (tests).
	Authorize func(ctx context.Context, fullMethod string) error
	// Admission decides whether a check may start and whether each call
	// it makes may, as the caller's own; nil: always.
	Admission Admission
	// Checking is told the nodes a check covers (for the call's audit
	// line).
	Checking func(ctx context.Context, nodes []string)
}

// Admission is what the check asks of the limits before it spends.
type Admission interface {
	// AdmitCheck admits a check of the caller in ctx, at most maxRunning
	// on this apid and perIdentity of one caller (this section's keys).
	AdmitCheck(ctx context.Context, maxRunning, perIdentity int) (release func(), err error)
	// AdmitCall counts one call the check makes to a node against its
	// caller's call limits, as if the caller had made it.
	AdmitCall(ctx context.Context) (release func(), err error)
}

// Server serves cluster.ClusterService. It is the health section: built
// from its Config, given the next one on a reload (Apply).
type Server struct {
	cluster.UnimplementedClusterServiceServer

	o       Options
	cfg     atomic.Pointer[Config]
	now     func() time.Time
	running atomic.Int64 // checks running now
}

// New returns a Server checking by cfg (already validated).
func New(cfg Config, o Options) *Server {
	s := &Server{o: o, now: time.Now}
	s.cfg.Store(&cfg)
	return s
}

// Apply makes checks that start from now on run by cfg.
func (s *Server) Apply(cfg Config) error {
	s.cfg.Store(&cfg)
	return nil
}

// Applied returns the configuration checks start with now.
func (s *Server) Applied() Config { return *s.cfg.Load() }

// Loosens lists the keys of next that let checks cost more than the
// configuration applied now: more of them at once, or a longer wait.
func (s *Server) Loosens(next Config) []string {
	cur := s.Applied()
	var keys []string
	for _, k := range []struct {
		key       string
		cur, next int64
	}{
		{"health.maxRunning", int64(cur.MaxRunning), int64(next.MaxRunning)},
		{"health.maxRunningPerIdentity", int64(cur.MaxRunningPerIdentity), int64(next.MaxRunningPerIdentity)},
		{"health.maxWait", int64(cur.MaxWait), int64(next.MaxWait)},
	} {
		if k.next > k.cur {
			keys = append(keys, k.key)
		}
	}
	return keys
}

// Running returns the checks running now.
func (s *Server) Running() int64 { return s.running.Load() }

// Describe implements prometheus.Collector: the checks refused are the
// limits section's series.
func (s *Server) Describe(chan<- *prometheus.Desc) {}

// Collect implements prometheus.Collector.
func (s *Server) Collect(chan<- prometheus.Metric) {}

// Close ends nothing: running checks end with their calls.
func (s *Server) Close() error { return nil }

// admitCheck asks the limits whether a check may start.
func (s *Server) admitCheck(ctx context.Context, cfg Config) (release func(), err error) {
	admitted := func() {}
	if s.o.Admission != nil {
		if admitted, err = s.o.Admission.AdmitCheck(ctx, cfg.MaxRunning, cfg.MaxRunningPerIdentity); err != nil {
			return nil, err
		}
	}
	s.running.Add(1)
	return func() { s.running.Add(-1); admitted() }, nil
}

// Methods the check calls on every node.
const (
	methodVersion = "/machine.MachineService/Version"
	methodTime    = "/time.TimeService/Time"
)

// Register adds the service to g.
func (s *Server) Register(g *grpc.Server) { cluster.RegisterClusterServiceServer(g, s) }

// answer is what one node said when asked its version.
type answer struct {
	version string
	cert    *x509.Certificate
	err     error
}

// HealthCheck implements cluster.ClusterServiceServer.
func (s *Server) HealthCheck(req *cluster.HealthCheckRequest, stream cluster.ClusterService_HealthCheckServer) error {
	cfg := s.Applied()
	done, err := s.admitCheck(stream.Context(), cfg)
	if err != nil {
		return err
	}
	defer done()
	// The check is this apid's whatever node the caller named, but a name
	// that routes nowhere is still the caller's mistake to hear about.
	if err := s.o.Dialer.CheckTargets(stream.Context()); err != nil {
		return err
	}
	wait := req.GetWaitTimeout().AsDuration()
	if wait <= 0 {
		wait = DefaultWaitTimeout
	}
	capped := cfg.MaxWait > 0 && wait > cfg.MaxWait
	if capped {
		wait = cfg.MaxWait
	}
	ctx, cancel := context.WithTimeout(stream.Context(), wait)
	defer cancel()
	r := &run{s: s, cfg: cfg, stream: stream, ctx: ctx, wait: wait}

	nodes, err := r.nodesOf(req.GetClusterInfo())
	if err != nil {
		return r.fail(err.Error())
	}
	if s.o.Checking != nil {
		s.o.Checking(stream.Context(), nodes)
	}
	plural := "s"
	if len(nodes) == 1 {
		plural = ""
	}
	r.say("checking %d node%s through apid: %s", len(nodes), plural, strings.Join(nodes, ", "))
	if capped {
		r.say("waiting at most %s (this apid's health.maxWait), not the %s asked for", wait, req.GetWaitTimeout().AsDuration())
	}
	if _, err := r.reachable(nodes); err != nil {
		return r.fail(err.Error())
	}
	// Each round asks the nodes again: a cluster that converges (an
	// upgrade finishing, a certificate renewed) passes within the wait.
	versions := func() (map[string]answer, error) {
		answers := each(nodes, r.version)
		for _, n := range nodes {
			if a := answers[n]; a.err != nil {
				err := fmt.Errorf("node %s stopped answering through apid (check: reachability): %s", n, describe(a.err))
				if status.Code(a.err) == codes.PermissionDenied {
					return nil, final{err}
				}
				return nil, err
			}
		}
		return answers, nil
	}
	for _, step := range []struct {
		what  string
		check func() error
	}{
		{"all nodes to report the same version", func() error {
			answers, err := versions()
			if err != nil {
				return err
			}
			return sameVersion(nodes, answers)
		}},
		{fmt.Sprintf("node clocks to agree within %s", cfg.MaxClockSkew), func() error { return r.clocks(nodes) }},
		{fmt.Sprintf("node certificates to be valid for %d more days", cfg.CertificateDays), func() error {
			answers, err := versions()
			if err != nil {
				return err
			}
			return r.certificates(nodes, answers)
		}},
	} {
		if err := r.retry(step.what, step.check); err != nil {
			return r.fail(err.Error())
		}
	}
	r.say("all checks passed")
	return nil
}

// run is one health check in progress.
type run struct {
	s      *Server
	cfg    Config
	stream cluster.ClusterService_HealthCheckServer
	ctx    context.Context
	wait   time.Duration
	failed bool   // the stream broke: say nothing more
	last   string // the line said last: a round that changes nothing is not repeated
}

// say streams one progress line, unless it is the one said last.
func (r *run) say(format string, args ...any) {
	line := fmt.Sprintf(format, args...)
	if r.failed || line == r.last {
		return
	}
	r.last = line
	if err := r.stream.Send(&cluster.HealthCheckProgress{Message: line}); err != nil {
		r.failed = true
	}
}

// fail ends the check as Talos does: a last message whose metadata carries
// the error, which talosctl prints and exits non-zero on.
func (r *run) fail(msg string) error {
	if r.failed {
		return r.stream.Context().Err()
	}
	return r.stream.Send(&cluster.HealthCheckProgress{Metadata: &common.Metadata{Error: msg}, Message: msg})
}

// nodesOf is the request's nodes, control plane first, or the inventory's.
func (r *run) nodesOf(info *cluster.ClusterInfo) ([]string, error) {
	cp, workers := info.GetControlPlaneNodes(), info.GetWorkerNodes()
	from := "the request"
	if len(cp)+len(workers) == 0 && r.s.o.Nodes != nil {
		cp, workers = r.s.o.Nodes()
		from = "the inventory"
	}
	var out []string
	seen := map[string]bool{}
	for _, n := range slices.Concat(cp, workers) {
		n = strings.TrimSpace(n)
		if n == "" || seen[strings.ToLower(n)] {
			continue
		}
		seen[strings.ToLower(n)] = true
		out = append(out, n)
	}
	switch {
	case len(out) == 0:
		return nil, fmt.Errorf("no nodes to check: name them (talosctl health --control-plane-nodes, --worker-nodes) or give apid an inventory")
	case r.cfg.MaxNodes > 0 && len(out) > r.cfg.MaxNodes:
		return nil, fmt.Errorf("%d nodes from %s: at most %d (maxNodes) are checked at once", len(out), from, r.cfg.MaxNodes)
	}
	return out, nil
}

// reachable asks every node its version until each has answered or the
// wait is over, saying which nodes it still waits for.
func (r *run) reachable(nodes []string) (map[string]answer, error) {
	const what = "all nodes to answer through apid"
	got := map[string]answer{}
	var last map[string]answer
	for {
		pending := slices.DeleteFunc(slices.Clone(nodes), func(n string) bool { return got[n].err == nil && got[n].version != "" })
		results := each(pending, r.version)
		for n, a := range results {
			if a.err == nil {
				got[n] = a
			}
			// An attempt the end of the wait cut short says nothing
			// about the node: what the round before found stands.
			if prev, ok := last[n]; ok && r.cutOff(a.err) && prev.err != nil {
				results[n] = prev
			}
		}
		last = results
		var waiting []string
		for _, n := range nodes {
			if a, ok := got[n]; !ok || a.err != nil || a.version == "" {
				waiting = append(waiting, n)
			}
		}
		if len(waiting) == 0 {
			r.say("waiting for %s: OK", what)
			return got, nil
		}
		first := waiting[0]
		// A caller that may not ask will not be allowed by waiting.
		if err := last[first].err; status.Code(err) == codes.PermissionDenied {
			return nil, fmt.Errorf("node %s (check: reachability): %s", first, describe(err))
		}
		r.say("waiting for %s: %d of %d answered; %s: %s", what, len(nodes)-len(waiting), len(nodes), first, describe(last[first].err))
		if !r.pause() {
			return nil, fmt.Errorf("node %s does not answer through apid within %s (check: reachability): %s", first, r.wait, describe(last[first].err))
		}
	}
}

// final marks an error that waiting cannot change (the caller may not
// make a call): the check ends at once.
type final struct{ error }

func (f final) Unwrap() error { return f.error }

// retry runs check until it passes or the wait is over; the error of an
// attempt the end of the wait cut short does not replace the finding of
// the one before.
func (r *run) retry(what string, check func() error) error {
	var prev error
	for {
		err := check()
		if err == nil {
			r.say("waiting for %s: OK", what)
			return nil
		}
		if prev != nil && r.cutOff(err) {
			err = prev
		}
		prev = err
		r.say("waiting for %s: %v", what, err)
		if errors.As(err, new(final)) || !r.pause() {
			return err
		}
	}
}

// cutOff reports whether err is what the end of the wait made of an
// attempt, rather than a finding about a node. The node's side of the
// call may see the deadline first (grpc-timeout is sent rounded down), so
// an attempt that ended within cutOffMargin of the wait's end counts too.
func (r *run) cutOff(err error) bool {
	if err == nil {
		return false
	}
	if end, ok := r.ctx.Deadline(); r.ctx.Err() == nil && (!ok || time.Until(end) > cutOffMargin) {
		return false
	}
	switch status.Code(err) {
	case codes.DeadlineExceeded, codes.Canceled:
		return true
	}
	return errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled)
}

const cutOffMargin = 100 * time.Millisecond

// pause waits before the next round; false when the wait is over.
func (r *run) pause() bool {
	t := time.NewTimer(retryEvery)
	defer t.Stop()
	select {
	case <-r.ctx.Done():
		return false
	case <-t.C:
		return r.ctx.Err() == nil
	}
}

// each calls ask for every node, at most parallel at once.
func each[T any](nodes []string, ask func(node string) T) map[string]T {
	out := make(map[string]T, len(nodes))
	var mu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, parallel)
	for _, n := range nodes {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			a := ask(n)
			mu.Lock()
			out[n] = a
			mu.Unlock()
		}()
	}
	wg.Wait()
	return out
}

// call runs fn, a call of method, on a connection to node, with one
// attempt's deadline, if the caller may call method.
func (r *run) call(node, method string, fn func(ctx context.Context, cc grpc.ClientConnInterface) error) error {
	if r.s.o.Authorize != nil {
		if err := r.s.o.Authorize(r.ctx, method); err != nil {
			return err
		}
	}
	if r.s.o.Admission != nil {
		done, err := r.s.o.Admission.AdmitCall(r.ctx)
		if err != nil {
			return err
		}
		defer done()
	}
	ctx, cancel := context.WithTimeout(r.ctx, attemptTimeout)
	defer cancel()
	callCtx, cc, release, err := r.s.o.Dialer.Dial(ctx, node)
	if err != nil {
		return err
	}
	err = fn(callCtx, cc)
	if release != nil {
		if r.cutOff(err) {
			// The end of the caller's wait says nothing about the node.
			release(context.Canceled)
		} else {
			release(err)
		}
	}
	return err
}

// version asks node its version, and notes the certificate it presented.
func (r *run) version(node string) answer {
	var a answer
	a.err = r.call(node, methodVersion, func(ctx context.Context, cc grpc.ClientConnInterface) error {
		var p peer.Peer
		resp, err := machine.NewMachineServiceClient(cc).Version(ctx, &emptypb.Empty{}, grpc.Peer(&p))
		if err != nil {
			return err
		}
		if len(resp.GetMessages()) == 0 {
			return fmt.Errorf("empty reply")
		}
		m := resp.GetMessages()[0]
		if e := m.GetMetadata().GetError(); e != "" {
			return fmt.Errorf("%s", e)
		}
		a.version = m.GetVersion().GetTag()
		if a.version == "" {
			a.version = "(none)"
		}
		if info, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(info.State.PeerCertificates) > 0 {
			a.cert = info.State.PeerCertificates[0]
		} else if r.s.o.Self != nil {
			a.cert = r.s.o.Self() // the local agent, reached without TLS: this apid's own
		}
		return nil
	})
	return a
}

// sameVersion names the nodes whose version differs from the most
// common one.
func sameVersion(nodes []string, answers map[string]answer) error {
	count := map[string]int{}
	for _, n := range nodes {
		count[answers[n].version]++
	}
	if len(count) <= 1 {
		return nil
	}
	versions := make([]string, 0, len(count))
	for v := range count {
		versions = append(versions, v)
	}
	sort.Slice(versions, func(i, j int) bool {
		return count[versions[i]] > count[versions[j]] || count[versions[i]] == count[versions[j]] && versions[i] < versions[j]
	})
	var odd []string
	for _, n := range nodes {
		if v := answers[n].version; v != versions[0] {
			odd = append(odd, fmt.Sprintf("%s runs %s", n, v))
		}
	}
	return fmt.Errorf("nodes report different versions (check: version): most run %s; %s", versions[0], strings.Join(odd, ", "))
}

// clocks compares each node's clock with apid's, allowing for the time the
// call took.
func (r *run) clocks(nodes []string) error {
	type skew struct {
		d   time.Duration
		err error
	}
	skews := each(nodes, func(node string) skew {
		var sk skew
		sk.err = r.call(node, methodTime, func(ctx context.Context, cc grpc.ClientConnInterface) error {
			before := r.s.now()
			resp, err := timeapi.NewTimeServiceClient(cc).Time(ctx, &emptypb.Empty{})
			after := r.s.now()
			if err != nil {
				return err
			}
			if len(resp.GetMessages()) == 0 || resp.GetMessages()[0].GetLocaltime() == nil {
				return fmt.Errorf("no time in the reply")
			}
			mid := before.Add(after.Sub(before) / 2)
			sk.d = resp.GetMessages()[0].GetLocaltime().AsTime().Sub(mid)
			return nil
		})
		return sk
	})
	for _, n := range nodes {
		sk := skews[n]
		if sk.err != nil {
			err := fmt.Errorf("node %s: cannot read its clock (check: clock): %s", n, describe(sk.err))
			if status.Code(sk.err) == codes.PermissionDenied {
				return final{err}
			}
			return err
		}
		if sk.d > r.cfg.MaxClockSkew || -sk.d > r.cfg.MaxClockSkew {
			return fmt.Errorf("node %s: clock is %s off apid's, more than %s (check: clock)", n, sk.d.Round(time.Millisecond), r.cfg.MaxClockSkew)
		}
	}
	return nil
}

// certificates fails for a node whose certificate expires too soon.
func (r *run) certificates(nodes []string, answers map[string]answer) error {
	limit := r.s.now().Add(time.Duration(r.cfg.CertificateDays) * 24 * time.Hour)
	for _, n := range nodes {
		c := answers[n].cert
		if c == nil {
			return fmt.Errorf("node %s: no certificate seen (check: certificate)", n)
		}
		if c.NotAfter.Before(limit) {
			return fmt.Errorf("node %s: certificate %q expires %s, within %d days (check: certificate)",
				n, c.Subject.CommonName, c.NotAfter.UTC().Format(time.RFC3339), r.cfg.CertificateDays)
		}
	}
	return nil
}

// describe is an error as one line: a gRPC status as code and message.
func describe(err error) string {
	if err == nil {
		return "no answer yet"
	}
	if s, ok := status.FromError(err); ok {
		return fmt.Sprintf("%s: %s", s.Code(), s.Message())
	}
	return err.Error()
}
