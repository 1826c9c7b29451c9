package disruption

import (
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/protobuf/proto"
	"gopkg.in/yaml.v3"

	"github.com/apid/apid/inventory"
	"github.com/apid/apid/pki"
)

func marshal(t *testing.T, m proto.Message) []byte {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// TestClassify: what each disruptive call does to its node, read from
// its request as the node will read it.
func TestClassify(t *testing.T) {
	apply := func(m machine.ApplyConfigurationRequest_Mode, dry bool) []byte {
		return marshal(t, &machine.ApplyConfigurationRequest{Data: []byte("version: v1alpha1"), Mode: m, DryRun: dry})
	}
	for _, c := range []struct {
		name    string
		method  string
		request []byte
		want    effect
	}{
		{"reboot", mReboot, marshal(t, &machine.RebootRequest{}), reboots},
		{"shutdown", mShutdown, nil, reboots},
		{"reset", mReset, marshal(t, &machine.ResetRequest{Graceful: true}), reboots},
		{"rollback", mRollback, nil, reboots},
		{"legacy upgrade", mUpgrade, marshal(t, &machine.UpgradeRequest{Image: "x"}), reboots},
		{"apply, reboot mode", mApply, apply(machine.ApplyConfigurationRequest_REBOOT, false), reboots},
		{"apply, auto mode", mApply, apply(machine.ApplyConfigurationRequest_AUTO, false), maybeReboots},
		{"apply, no reboot", mApply, apply(machine.ApplyConfigurationRequest_NO_REBOOT, false), none},
		{"apply, staged", mApply, apply(machine.ApplyConfigurationRequest_STAGED, false), none},
		{"apply, try", mApply, apply(machine.ApplyConfigurationRequest_TRY, false), none},
		{"apply, dry run", mApply, apply(machine.ApplyConfigurationRequest_REBOOT, true), none},
		{"apply, garbage", mApply, []byte{0xff, 0xff, 0xff}, reboots},
		{"etcd leave", mEtcdLeave, nil, degrades},
		{"etcd remove", mEtcdRemove, marshal(t, &machine.EtcdRemoveMemberByIDRequest{MemberId: 7}), degrades},
		{"stop etcd", mServiceStop, marshal(t, &machine.ServiceStopRequest{Id: "etcd"}), degrades},
		{"restart etcd", mServiceRestart, marshal(t, &machine.ServiceRestartRequest{Id: "etcd"}), degrades},
		{"stop kubelet", mServiceStop, marshal(t, &machine.ServiceStopRequest{Id: "kubelet"}), none},
		{"lifecycle upgrade installs only", "/machine.LifecycleService/Upgrade", nil, none},
		{"version", "/machine.MachineService/Version", nil, none},
	} {
		if got := classify(c.method, c.request); got != c.want {
			t.Errorf("%s: %d, want %d", c.name, got, c.want)
		}
		if Disruptive(c.method) != (c.method != "/machine.LifecycleService/Upgrade" && c.method != "/machine.MachineService/Version") {
			t.Errorf("%s: Disruptive(%s) = %v", c.name, c.method, Disruptive(c.method))
		}
	}
	if id, ok := removedMember(marshal(t, &machine.EtcdRemoveMemberByIDRequest{MemberId: 0xabc})); !ok || id != 0xabc {
		t.Errorf("member %x, %v", id, ok)
	}
}

// TestRebootedPerReply: ApplyConfiguration in AUTO mode says in its reply
// what it did.
func TestRebootedPerReply(t *testing.T) {
	reply := func(m machine.ApplyConfigurationRequest_Mode) []byte {
		return marshal(t, &machine.ApplyConfigurationResponse{Messages: []*machine.ApplyConfiguration{{Mode: m}}})
	}
	if rebootedPerReply(reply(machine.ApplyConfigurationRequest_NO_REBOOT)) {
		t.Error("NO_REBOOT read as a reboot")
	}
	if !rebootedPerReply(reply(machine.ApplyConfigurationRequest_REBOOT)) {
		t.Error("REBOOT not read as a reboot")
	}
	if !rebootedPerReply(nil) || !rebootedPerReply([]byte{0xff}) {
		t.Error("a reply that says nothing must count as a reboot")
	}
}

func TestAmount(t *testing.T) {
	for _, c := range []struct {
		in   string
		n    int // of a group of 7
		fail bool
	}{{"1", 1, false}, {"0", 0, false}, {"25%", 2, false}, {"100%", 7, false}, {"1%", 1, false},
		{"-1", 0, true}, {"101%", 0, true}, {"x", 0, true}, {"", 0, true}} {
		a, err := ParseAmount(c.in)
		if (err != nil) != c.fail {
			t.Errorf("%q: %v", c.in, err)
			continue
		}
		if err == nil && a.Of(7) != c.n {
			t.Errorf("%q of 7 = %d, want %d", c.in, a.Of(7), c.n)
		}
	}
	var cfg Config
	if err := yaml.Unmarshal([]byte("maxUnavailable: {controlplane: 1, workers: 25%, zone=a: \"2\"}"), &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.MaxUnavailable["workers"] != (Amount{N: 25, Percent: true}) || cfg.MaxUnavailable["zone=a"].N != 2 {
		t.Errorf("decoded %v", cfg.MaxUnavailable)
	}
	err := yaml.Unmarshal([]byte("maxUnavailable: {workers: lots}"), &cfg)
	if err == nil || !strings.Contains(err.Error(), "line 1") || !strings.Contains(err.Error(), "25%") {
		t.Errorf("a bad amount: %v", err)
	}
}

func TestValidateAndLoosens(t *testing.T) {
	if err := DefaultConfig().Validate(); err != nil {
		t.Fatal(err)
	}
	bad := DefaultConfig()
	bad.MaxUnavailable = map[string]Amount{"masters": {N: 1}, "zone=": {N: 1}}
	bad.MaxWait, bad.MaxHeldPerIdentity, bad.ProbeInterval = 0, 0, time.Millisecond
	err := bad.Validate()
	for _, key := range []string{"disruption.maxUnavailable.masters", "disruption.maxUnavailable.zone=", "disruption.maxWait",
		"disruption.maxHeldPerIdentity", "disruption.probeInterval"} {
		if err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%s not named in %v", key, err)
		}
	}

	cur := DefaultConfig()
	next := DefaultConfig()
	next.Enabled = false
	next.MaxUnavailable = map[string]Amount{inventory.GroupControlPlane: {N: 50, Percent: true}}
	next.MaxWait *= 2
	got := Loosens(cur, next)
	want := []string{"disruption.enabled", "disruption.maxUnavailable.controlplane", "disruption.maxUnavailable.workers", "disruption.maxWait"}
	if !slices.Equal(got, want) {
		t.Errorf("loosens %v, want %v", got, want)
	}
	if l := Loosens(cur, DefaultConfig()); len(l) != 0 {
		t.Errorf("the same configuration loosens %v", l)
	}
}

// TestJudge: the rules a held call is judged by, on a budget whose nodes'
// states are set directly (what probes and admissions would set).
func TestJudge(t *testing.T) {
	set, err := inventory.NewSet([]inventory.Node{
		{Name: "cp-1", Role: inventory.RoleControlPlane}, {Name: "cp-2", Role: inventory.RoleControlPlane},
		{Name: "cp-3", Role: inventory.RoleControlPlane}, {Name: "w-1"}, {Name: "w-2"}, {Name: "w-3"},
	})
	if err != nil {
		t.Fatal(err)
	}
	b := &Budget{o: Options{Inventory: func() *inventory.Set { return set }, Now: time.Now}, nodes: map[string]*nodeState{}}
	cfg := DefaultConfig()
	cfg.MaxUnavailable[inventory.GroupControlPlane] = Amount{N: 2}
	b.applied.Store(&cfg)
	v := b.view(cfg)
	since := time.Now().Add(-time.Hour)
	at := func(node string, self bool) *waiter {
		return &waiter{node: node, self: self, since: since}
	}

	if why := b.judge(v, at("cp-2", false), nil, nil); why != "" {
		t.Errorf("nothing down, held: %s", why)
	}
	b.node("cp-1").slots = []*slot{{method: mReboot, caller: "CN=ops", since: since}}
	// maxUnavailable controlplane 2 would allow a second, but etcd's
	// quorum (2 of 3) would not.
	why := b.judge(v, at("cp-2", false), nil, nil)
	if !strings.Contains(why, "cp-1 is rebooting since") || !strings.Contains(why, "asked by CN=ops") || !strings.Contains(why, "below its quorum of 2") {
		t.Errorf("quorum: %q", why)
	}
	// The node already down may always be disrupted again.
	if why := b.judge(v, at("cp-1", false), nil, nil); why != "" {
		t.Errorf("the down node itself held: %s", why)
	}
	// A control-plane node seen down once counts as down for the others,
	// but is not let through itself on one probe: two in a row.
	b.node("cp-1").slots = nil
	b.node("cp-3").seen = observation{at: time.Now(), why: "down since 12:00:00 (Unavailable: no route)", streak: 1}
	b.node("cp-2").seen = observation{at: time.Now(), why: "down since 12:00:00 (Unavailable: no route)", streak: 1}
	if why := b.judge(v, at("cp-2", false), nil, nil); !strings.Contains(why, "below its quorum") {
		t.Errorf("a node down on one probe let through while another is down: %q", why)
	}
	b.node("cp-2").seen.streak = 2
	if why := b.judge(v, at("cp-2", false), nil, nil); why != "" {
		t.Errorf("a node down on two probes in a row held: %q", why)
	}
	b.node("cp-2").seen, b.node("cp-3").seen = observation{}, observation{}

	// Workers: one at a time, and a node seen down counts.
	b.node("w-1").seen = observation{at: time.Now(), why: "down since 12:00:00 (Unavailable: no route)"}
	why = b.judge(v, at("w-2", false), nil, nil)
	if !strings.Contains(why, "w-1 is down since") || !strings.Contains(why, "the second workers node down (maxUnavailable workers: 1)") {
		t.Errorf("workers: %q", why)
	}
	// Arrival order within a budget: behind a held call of its group.
	b.node("w-1").seen = observation{at: time.Now(), up: true, ready: true}
	first := at("w-3", false)
	first.why = "held: something"
	if why := b.judge(v, at("w-2", false), []*waiter{first}, nil); !strings.Contains(why, "behind w-3") {
		t.Errorf("arrival order: %q", why)
	}
	// The gateway's own node goes last: after its grace, and behind any
	// other call of its group; a held self call never blocks the others.
	own := at("w-1", true)
	other := at("w-2", false)
	if why := b.judge(v, own, nil, []*waiter{own, other}); !strings.Contains(why, "goes last") {
		t.Errorf("own node before another: %q", why)
	}
	own.why = "held: goes last"
	if why := b.judge(v, other, []*waiter{own}, []*waiter{own, other}); why != "" {
		t.Errorf("another node behind the held own node: %q", why)
	}
	fresh := &waiter{node: "w-1", self: true, since: time.Now()}
	if why := b.judge(v, fresh, nil, []*waiter{fresh}); !strings.Contains(why, "waiting 1s for calls sent with this one") {
		t.Errorf("own node alone, at once: %q", why)
	}
	// A node in no budget group is its own group of one.
	if why := b.judge(v, at("unlisted", false), nil, nil); why != "" {
		t.Errorf("a node in no group held: %s", why)
	}
}

// TestBack: when a disruption is over.
func TestBack(t *testing.T) {
	ended := time.Now()
	after := ended.Add(time.Second)
	reboot := &slot{effect: reboots, boot: 100, ended: ended}
	for _, c := range []struct {
		name string
		s    *slot
		seen observation
		back bool
	}{
		{"the call still runs", &slot{effect: reboots, boot: 100}, observation{at: after, up: true, ready: true, boot: 200}, false},
		{"seen before the call ended", reboot, observation{at: ended.Add(-time.Second), up: true, ready: true, boot: 200}, false},
		{"same boot", reboot, observation{at: after, up: true, ready: true, boot: 100}, false},
		{"new boot, not ready", reboot, observation{at: after, up: true, boot: 200}, false},
		{"down", reboot, observation{at: after}, false},
		{"new boot, ready", reboot, observation{at: after, up: true, ready: true, boot: 200}, true},
		{"boot unknown when admitted, not seen down since", &slot{effect: reboots, ended: ended}, observation{at: after, up: true, ready: true, boot: 100}, false},
		{"boot unknown when admitted, seen down since", &slot{effect: reboots, ended: ended, sawDown: true}, observation{at: after, up: true, ready: true, boot: 100}, true},
		{"boot unknown when admitted, a newer boot since", &slot{effect: reboots, ended: ended, postBoot: 90}, observation{at: after, up: true, ready: true, boot: 100}, true},
		{"failed, same boot a moment later", &slot{effect: reboots, boot: 100, ended: ended, failed: true}, observation{at: after, up: true, ready: true, boot: 100}, false},
		{"failed, same boot for the grace", &slot{effect: reboots, boot: 100, ended: ended, failed: true}, observation{at: ended.Add(ambiguousGrace), up: true, ready: true, boot: 100}, true},
		{"failed, rebooted all the same", &slot{effect: reboots, boot: 100, ended: ended, failed: true}, observation{at: after, up: true, ready: true, boot: 200}, true},
		{"etcd left, ready again", &slot{effect: degrades, boot: 100, ended: ended}, observation{at: after, up: true, ready: true, boot: 100}, true},
	} {
		if got := back(c.s, c.seen) != ""; got != c.back {
			t.Errorf("%s: back %v, want %v", c.name, got, c.back)
		}
	}
}

// TestReadiness: the gates a node passes to be back.
func TestReadiness(t *testing.T) {
	svc := func(id, state string, healthy, unknown bool) *machine.ServiceInfo {
		return &machine.ServiceInfo{Id: id, State: state, Health: &machine.ServiceHealth{Healthy: healthy, Unknown: unknown}}
	}
	list := func(s ...*machine.ServiceInfo) *machine.ServiceListResponse {
		return &machine.ServiceListResponse{Messages: []*machine.ServiceList{{Services: s}}}
	}
	if why := servicesNotReady(list(svc("apid", "Running", false, true), svc("etcd", "Running", true, false))); why != "" {
		t.Errorf("healthy services: %s", why)
	}
	if why := servicesNotReady(list(svc("apid", "Running", false, true), svc("etcd", "Preparing", false, false))); !strings.Contains(why, "etcd Preparing") {
		t.Errorf("a service starting: %q", why)
	}
	if why := servicesNotReady(list(svc("kubelet", "Running", false, false))); !strings.Contains(why, "kubelet unhealthy") {
		t.Errorf("an unhealthy service: %q", why)
	}
	if why := servicesNotReady(list()); why == "" {
		t.Error("no services read as ready")
	}
	status := func(leader uint64, learner bool, errs ...string) *machine.EtcdStatusResponse {
		return &machine.EtcdStatusResponse{Messages: []*machine.EtcdStatus{{MemberStatus: &machine.EtcdMemberStatus{Leader: leader, IsLearner: learner, Errors: errs}}}}
	}
	if why := etcdNotReady(status(5, false)); why != "" {
		t.Errorf("a healthy member: %s", why)
	}
	for _, bad := range []*machine.EtcdStatusResponse{status(0, false), status(5, true), status(5, false, "alarm: NOSPACE"), {}} {
		if etcdNotReady(bad) == "" {
			t.Errorf("%v read as ready", bad)
		}
	}
}

// TestEtcdConfig: the shared budget's keys and files, each problem named.
func TestEtcdConfig(t *testing.T) {
	cfg := DefaultConfig()
	cfg.Etcd = EtcdConfig{Endpoints: []string{"http://10.0.0.2:2379", "https://10.0.0.3:2379"}, Prefix: "apid", LeaseTTL: time.Second}
	err := cfg.Validate()
	for _, want := range []string{`endpoints "http://10.0.0.2:2379": want https://`, "disruption.etcd.ca: required", "disruption.etcd.cert: required",
		"disruption.etcd.key: required", `prefix "apid"`, "leaseTTL 1s: at least 5s"} {
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("%q not in %v", want, err)
		}
	}
	cfg.Etcd = EtcdConfig{Key: "/k"}
	if err := cfg.Validate(); err == nil || !strings.Contains(err.Error(), "no endpoints") {
		t.Errorf("files without endpoints: %v", err)
	}

	dir := t.TempDir()
	ca, err := pki.NewCA("etcd", time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	crt, key, err := ca.IssueClient("apid", []string{"etcd-client"}, time.Hour, pki.KeyECDSA)
	if err != nil {
		t.Fatal(err)
	}
	d := pki.Dir{Path: dir}
	caFile, _, err := d.WritePair("ca", ca.CertPEM, ca.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	crtFile, keyFile, err := d.WritePair("apid", crt, key)
	if err != nil {
		t.Fatal(err)
	}
	e := EtcdConfig{Endpoints: []string{"https://127.0.0.1:2379"}, CA: caFile, Cert: crtFile, Key: keyFile}
	if err := e.CheckFiles("/etc/apid/node.key"); err != nil {
		t.Fatalf("good files: %v", err)
	}
	if err := e.CheckFiles(keyFile); err == nil || !strings.Contains(err.Error(), "also apid's own key") {
		t.Errorf("the forwarding key as the etcd key: %v", err)
	}
	if err := os.Chmod(keyFile, 0o640); err != nil {
		t.Fatal(err)
	}
	if err := e.CheckFiles(); err == nil || !strings.Contains(err.Error(), "chmod 600") {
		t.Errorf("a key others may read: %v", err)
	}
	if _, err := New(Config{Etcd: e, ProbeInterval: time.Second}, Options{Gateway: "gw", Dial: nil}); err == nil {
		t.Error("a budget was made with a key others may read")
	}
}
