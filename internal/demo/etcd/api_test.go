package etcd_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	talosclient "github.com/siderolabs/talos/pkg/machinery/client"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/apid/apid/internal/demo/etcd"
	"github.com/apid/apid/internal/demo/node"
	"github.com/apid/apid/internal/demo/nodetest"
	"github.com/apid/apid/internal/testkit"
)

// etcdCluster starts a real three-member etcd cluster on loopback, as the
// demo's control-plane nodes run it, and an agent in front of each member.
func etcdCluster(t *testing.T) []*talosclient.Client {
	t.Helper()
	dir := t.TempDir()
	ips := []string{"127.0.95.1", "127.0.95.2", "127.0.95.3"}
	var initial []string
	for i, ip := range ips {
		initial = append(initial, fmt.Sprintf("m%d=http://%s:2380", i+1, ip))
	}
	var members []*etcd.Member
	for i, ip := range ips {
		e, err := etcd.Start(etcd.MemberConfig{Name: fmt.Sprintf("m%d", i+1), DataDir: filepath.Join(dir, fmt.Sprint(i)),
			ClientURL: "http://" + ip + ":2379", PeerURL: "http://" + ip + ":2380", InitialCluster: strings.Join(initial, ",")})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(e.Stop)
		members = append(members, e)
	}
	ctx, cancel := context.WithTimeout(testkit.Context(t), time.Minute)
	defer cancel()
	var clients []*talosclient.Client
	for i, e := range members {
		if err := e.Ready(ctx); err != nil {
			t.Fatal(err)
		}
		c, _ := nodetest.OfficialClient(t, node.Config{Hostname: fmt.Sprintf("m%d", i+1), Etcd: e})
		clients = append(clients, c)
	}
	return clients
}

// TestEtcd: the etcd API against a real etcd cluster, as talosctl etcd
// members, status, alarm, defrag, snapshot, forfeit-leadership, leave and
// remove-member use it; a node without a member answers in Talos's words.
func TestEtcd(t *testing.T) {
	nodes := etcdCluster(t)
	ctx := testkit.Context(t)

	list, err := nodes[0].EtcdMemberList(ctx, &machine.EtcdMemberListRequest{})
	if err != nil || len(list.GetMessages()[0].GetMembers()) != 3 {
		t.Fatalf("members: %v, %v", list, err)
	}
	ids := map[string]uint64{}
	for _, m := range list.GetMessages()[0].GetMembers() {
		ids[m.GetHostname()] = m.GetId()
		if len(m.GetClientUrls()) != 1 || len(m.GetPeerUrls()) != 1 {
			t.Errorf("member %v", m)
		}
	}

	var leader uint64
	for i, n := range nodes {
		st, err := n.EtcdStatus(ctx)
		if err != nil {
			t.Fatal(err)
		}
		ms := st.GetMessages()[0].GetMemberStatus()
		if ms.GetMemberId() != ids[fmt.Sprintf("m%d", i+1)] || ms.GetLeader() == 0 || ms.GetProtocolVersion() == "" {
			t.Errorf("status of m%d: %v", i+1, ms)
		}
		leader = ms.GetLeader()
	}
	if _, err := nodes[1].EtcdAlarmList(ctx); err != nil {
		t.Errorf("alarm list: %v", err)
	}
	if _, err := nodes[1].EtcdAlarmDisarm(ctx); err != nil {
		t.Errorf("alarm disarm: %v", err)
	}
	if _, err := nodes[2].EtcdDefragment(ctx); err != nil {
		t.Errorf("defragment: %v", err)
	}

	// Something to find in a snapshot.
	ec, err := clientv3.New(clientv3.Config{Endpoints: []string{"http://127.0.95.1:2379"}, DialTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 3 {
		if _, err := ec.Put(ctx, fmt.Sprintf("/demo/key-%d", i), "value"); err != nil {
			t.Fatal(err)
		}
	}
	ec.Close()

	// A snapshot is a bbolt database of the member.
	rd, err := nodes[0].EtcdSnapshot(ctx, &machine.EtcdSnapshotRequest{})
	if err != nil {
		t.Fatal(err)
	}
	var snap bytes.Buffer
	if _, err := io.Copy(&snap, rd); err != nil {
		t.Fatal(err)
	}
	rd.Close()
	if snap.Len() < 16<<10 {
		t.Errorf("snapshot of %d bytes", snap.Len())
	}

	// Recovering from it: the member keeps it and finds etcd's database in
	// it; bytes that are not a snapshot are kept too, as Talos keeps them,
	// and the trailer says why they would not restore.
	var trailer metadata.MD
	if _, err := nodes[1].EtcdRecover(ctx, bytes.NewReader(snap.Bytes()), grpc.Trailer(&trailer)); err != nil {
		t.Fatalf("recover: %v", err)
	}
	if keys, rev := trailer.Get(etcd.TrailerSnapshotKeys), trailer.Get(etcd.TrailerSnapshotRevision); len(keys) != 1 || keys[0] != "3" || len(rev) != 1 || rev[0] != "4" {
		t.Errorf("recover from a real snapshot: trailer %q", fmt.Sprint(map[string][]string(trailer)))
	}
	trailer = nil
	if _, err := nodes[1].EtcdRecover(ctx, bytes.NewReader(snap.Bytes()[:snap.Len()-100]), grpc.Trailer(&trailer)); err != nil {
		t.Fatalf("recover: %v", err)
	}
	if why := trailer.Get(etcd.TrailerSnapshotInvalid); len(why) != 1 || !strings.Contains(why[0], "not a snapshot") {
		t.Errorf("recover from a cut snapshot: trailer %v", trailer)
	}

	// The leader forfeits: another member leads.
	var leaderNode *talosclient.Client
	for name, id := range ids {
		if id == leader {
			leaderNode = nodes[name[1]-'1']
		}
	}
	resp, err := leaderNode.EtcdForfeitLeadership(ctx, &machine.EtcdForfeitLeadershipRequest{})
	if err != nil || resp.GetMessages()[0].GetMember() == "" {
		t.Fatalf("forfeit: %v, %v", resp, err)
	}
	if st, err := leaderNode.EtcdStatus(ctx); err != nil || st.GetMessages()[0].GetMemberStatus().GetLeader() == leader {
		t.Errorf("leadership did not move: %v, %v", st, err)
	}

	// Removing a member nobody has is NotFound; m3 leaves: two remain, and
	// m3's etcd is gone.
	err = nodes[0].EtcdRemoveMemberByID(ctx, &machine.EtcdRemoveMemberByIDRequest{MemberId: 12345})
	nodetest.WantCode(t, err, codes.NotFound)
	if err := nodes[2].EtcdLeaveCluster(ctx, &machine.EtcdLeaveClusterRequest{}); err != nil {
		t.Fatalf("leave: %v", err)
	}
	if list, err := nodes[0].EtcdMemberList(ctx, &machine.EtcdMemberListRequest{}); err != nil || len(list.GetMessages()[0].GetMembers()) != 2 {
		t.Errorf("members after a leave: %v, %v", list, err)
	}
	_, err = nodes[2].EtcdStatus(ctx)
	nodetest.WantCode(t, err, codes.FailedPrecondition)

	// A worker runs no etcd.
	worker, _ := nodetest.OfficialClient(t, node.Config{})
	_, err = worker.MachineClient.EtcdStatus(ctx, &emptypb.Empty{})
	nodetest.WantCode(t, err, codes.Unimplemented)
	if err != nil && !strings.Contains(err.Error(), "etcd status is only available on control plane nodes") {
		t.Errorf("worker: %v", err)
	}
}
