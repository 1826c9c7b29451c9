package etcd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"time"

	"github.com/siderolabs/talos/pkg/machinery/api/common"
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"go.etcd.io/etcd/api/v3/etcdserverpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
)

// API is the etcd API of a node, against the real etcd member it runs on a
// control plane, as Talos's machined serves it: through a client of the
// local member, the cluster's changes made by etcd itself. Without a member
// (a worker) its calls are Unimplemented in Talos's words.
type API struct {
	member *Member // nil on a worker
	log    *slog.Logger
}

// NewAPI returns the etcd API of a node running member (nil: none), which
// logs to log.
func NewAPI(member *Member, log *slog.Logger) *API {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &API{member: member, log: log}
}

// etcdClient returns a client of this node's member, or the status Talos
// answers on a node without one.
func (a *API) etcdClient(ctx context.Context, api string) (*clientv3.Client, error) {
	e := a.member
	if e == nil {
		return nil, status.Errorf(codes.Unimplemented, "%s is only available on control plane nodes", api)
	}
	if !e.Running() {
		return nil, status.Errorf(codes.FailedPrecondition, "%s: etcd is not running on this node (it left the cluster)", api)
	}
	tlsConfig, err := e.ClientTLS()
	if err != nil {
		return nil, fmt.Errorf("failed to create etcd client: %w", err)
	}
	c, err := clientv3.New(clientv3.Config{Endpoints: []string{e.ClientURL()}, TLS: tlsConfig, Context: ctx, DialTimeout: 5 * time.Second, Logger: etcdClientLogger})
	if err != nil {
		return nil, fmt.Errorf("failed to create etcd client: %w", err)
	}
	return c, nil
}

// EtcdMemberList lists the cluster's members.
func (a *API) EtcdMemberList(ctx context.Context, _ *machine.EtcdMemberListRequest) (*machine.EtcdMemberListResponse, error) {
	c, err := a.etcdClient(ctx, "member list")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	resp, err := c.MemberList(clientv3.WithRequireLeader(ctx))
	if err != nil {
		return nil, err
	}
	out := &machine.EtcdMembers{}
	for _, m := range resp.Members {
		out.LegacyMembers = append(out.LegacyMembers, m.GetName())
		out.Members = append(out.Members, &machine.EtcdMember{Id: m.GetID(), Hostname: m.GetName(), PeerUrls: m.GetPeerURLs(), ClientUrls: m.GetClientURLs(), IsLearner: m.GetIsLearner()})
	}
	return &machine.EtcdMemberListResponse{Messages: []*machine.EtcdMembers{out}}, nil
}

// EtcdStatus reports this node's member.
func (a *API) EtcdStatus(ctx context.Context, _ *emptypb.Empty) (*machine.EtcdStatusResponse, error) {
	c, err := a.etcdClient(ctx, "etcd status")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	resp, err := c.Status(ctx, a.member.ClientURL())
	if err != nil {
		return nil, fmt.Errorf("failed to query etcd status: %w", err)
	}
	return &machine.EtcdStatusResponse{Messages: []*machine.EtcdStatus{{MemberStatus: &machine.EtcdMemberStatus{
		MemberId: resp.Header.GetMemberId(), ProtocolVersion: resp.Version, DbSize: resp.DbSize, DbSizeInUse: resp.DbSizeInUse,
		Leader: resp.Leader, RaftIndex: resp.RaftIndex, RaftTerm: resp.RaftTerm, RaftAppliedIndex: resp.RaftAppliedIndex,
		StorageVersion: resp.StorageVersion, Errors: resp.Errors, IsLearner: resp.IsLearner,
	}}}}, nil
}

func mapAlarms(alarms []*etcdserverpb.AlarmMember) []*machine.EtcdMemberAlarm {
	out := make([]*machine.EtcdMemberAlarm, 0, len(alarms))
	for _, a := range alarms {
		kind := machine.EtcdMemberAlarm_NONE
		switch a.Alarm {
		case etcdserverpb.AlarmType_NOSPACE:
			kind = machine.EtcdMemberAlarm_NOSPACE
		case etcdserverpb.AlarmType_CORRUPT:
			kind = machine.EtcdMemberAlarm_CORRUPT
		}
		out = append(out, &machine.EtcdMemberAlarm{MemberId: a.MemberID, Alarm: kind})
	}
	return out
}

// EtcdAlarmList lists the cluster's alarms.
func (a *API) EtcdAlarmList(ctx context.Context, _ *emptypb.Empty) (*machine.EtcdAlarmListResponse, error) {
	c, err := a.etcdClient(ctx, "etcd alarm list")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	resp, err := c.AlarmList(ctx)
	if err != nil {
		return nil, fmt.Errorf("failed to list etcd alarms: %w", err)
	}
	return &machine.EtcdAlarmListResponse{Messages: []*machine.EtcdAlarm{{MemberAlarms: mapAlarms(resp.Alarms)}}}, nil
}

// EtcdAlarmDisarm disarms the alarms.
func (a *API) EtcdAlarmDisarm(ctx context.Context, _ *emptypb.Empty) (*machine.EtcdAlarmDisarmResponse, error) {
	c, err := a.etcdClient(ctx, "etcd alarm disarm")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	resp, err := c.AlarmDisarm(ctx, &clientv3.AlarmMember{})
	if err != nil {
		return nil, fmt.Errorf("failed to disarm etcd alarm: %w", err)
	}
	return &machine.EtcdAlarmDisarmResponse{Messages: []*machine.EtcdAlarmDisarm{{MemberAlarms: mapAlarms(resp.Alarms)}}}, nil
}

// EtcdDefragment defragments this node's member.
func (a *API) EtcdDefragment(ctx context.Context, _ *emptypb.Empty) (*machine.EtcdDefragmentResponse, error) {
	c, err := a.etcdClient(ctx, "etcd defragment")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if _, err := c.Defragment(ctx, a.member.ClientURL()); err != nil {
		return nil, fmt.Errorf("failed to defragment etcd: %w", err)
	}
	return &machine.EtcdDefragmentResponse{Messages: []*machine.EtcdDefragment{{}}}, nil
}

// localMemberID is this node's member ID.
func (a *API) localMemberID(ctx context.Context, c *clientv3.Client) (uint64, error) {
	resp, err := c.Status(ctx, a.member.ClientURL())
	if err != nil {
		return 0, fmt.Errorf("failed to query etcd status: %w", err)
	}
	return resp.Header.GetMemberId(), nil
}

// EtcdForfeitLeadership hands leadership to another member if this one
// leads, and names the new leader ("" when it did not lead).
func (a *API) EtcdForfeitLeadership(ctx context.Context, _ *machine.EtcdForfeitLeadershipRequest) (*machine.EtcdForfeitLeadershipResponse, error) {
	c, err := a.etcdClient(ctx, "etcd forfeit leadership")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ctx = clientv3.WithRequireLeader(ctx)
	resp, err := c.Status(ctx, a.member.ClientURL())
	if err != nil {
		return nil, fmt.Errorf("failed to forfeit leadership: %w", err)
	}
	self := resp.Header.GetMemberId()
	members, err := c.MemberList(ctx)
	if err != nil {
		return nil, fmt.Errorf("failed to list etcd members: %w", err)
	}
	if len(members.Members) == 1 {
		return nil, errors.New("failed to forfeit leadership: cannot forfeit leadership, only one member")
	}
	leader := ""
	if resp.Leader == self {
		for _, m := range members.Members {
			if m.GetID() == self || m.GetIsLearner() {
				continue
			}
			if _, err := c.MoveLeader(ctx, m.GetID()); err != nil && !errors.Is(err, rpctypes.ErrNotLeader) {
				return nil, fmt.Errorf("failed to forfeit leadership: %w", err)
			} else if err == nil {
				leader = m.GetName()
				a.log.Info("etcd leadership moved", "from", a.member.Name(), "to", leader)
			}
			break
		}
	}
	return &machine.EtcdForfeitLeadershipResponse{Messages: []*machine.EtcdForfeitLeadership{{Member: leader}}}, nil
}

// EtcdLeaveCluster removes this node's member from the cluster, then stops
// it and removes its data.
func (a *API) EtcdLeaveCluster(ctx context.Context, _ *machine.EtcdLeaveClusterRequest) (*machine.EtcdLeaveClusterResponse, error) {
	c, err := a.etcdClient(ctx, "etcd leave")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	ctx = clientv3.WithRequireLeader(ctx)
	id, err := a.localMemberID(ctx, c)
	if err != nil {
		return nil, fmt.Errorf("failed to leave cluster: %w", err)
	}
	// Ask the other members, as Talos asks the control plane: the member
	// that checks a removal is the one asked, and this one's own view of
	// its peers is the least settled.
	if others, err := a.otherMembers(ctx, c, id); err == nil && len(others) > 0 {
		tlsConfig, _ := a.member.ClientTLS() // made once already by etcdClient
		if oc, err := clientv3.New(clientv3.Config{Endpoints: others, TLS: tlsConfig, Context: ctx, DialTimeout: 5 * time.Second, Logger: etcdClientLogger}); err == nil {
			defer oc.Close()
			c = oc
		}
	}
	// As Talos does, retry while the cluster says it is unhealthy (a
	// member that has not heard from a quorum lately, as just after a
	// leadership change), within the call's deadline and at most a minute.
	retry, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	for {
		_, err := c.MemberRemove(retry, id)
		if err == nil || errors.Is(err, rpctypes.ErrMemberNotFound) {
			break
		}
		if !errors.Is(err, rpctypes.ErrUnhealthy) && !errors.Is(err, rpctypes.ErrStopped) {
			return nil, fmt.Errorf("failed to leave cluster: failed to remove member %d: %w", id, err)
		}
		select {
		case <-retry.Done():
			return nil, fmt.Errorf("failed to leave cluster: failed to remove member %d: %w", id, err)
		case <-time.After(500 * time.Millisecond):
		}
	}
	if err := a.member.forget(); err != nil {
		return nil, fmt.Errorf("failed to leave cluster: %w", err)
	}
	a.log.Info("left the etcd cluster: member stopped and its data removed", "member", id)
	return &machine.EtcdLeaveClusterResponse{Messages: []*machine.EtcdLeaveCluster{{}}}, nil
}

// otherMembers returns the client URLs of the members other than id.
func (a *API) otherMembers(ctx context.Context, c *clientv3.Client, id uint64) ([]string, error) {
	resp, err := c.MemberList(ctx)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, m := range resp.Members {
		if m.GetID() != id {
			out = append(out, m.GetClientURLs()...)
		}
	}
	return out, nil
}

// EtcdRemoveMemberByID removes a member from the cluster.
func (a *API) EtcdRemoveMemberByID(ctx context.Context, in *machine.EtcdRemoveMemberByIDRequest) (*machine.EtcdRemoveMemberByIDResponse, error) {
	c, err := a.etcdClient(ctx, "etcd remove member")
	if err != nil {
		return nil, err
	}
	defer c.Close()
	if _, err := c.MemberRemove(clientv3.WithRequireLeader(ctx), in.GetMemberId()); err != nil {
		if errors.Is(err, rpctypes.ErrMemberNotFound) {
			return nil, status.Error(codes.NotFound, fmt.Sprintf("failed to remove member %d: %v", in.GetMemberId(), err))
		}
		return nil, fmt.Errorf("failed to remove member: failed to remove member %d: %w", in.GetMemberId(), err)
	}
	return &machine.EtcdRemoveMemberByIDResponse{Messages: []*machine.EtcdRemoveMemberByID{{}}}, nil
}

// EtcdSnapshot streams a snapshot of this node's member.
func (a *API) EtcdSnapshot(_ *machine.EtcdSnapshotRequest, stream grpc.ServerStreamingServer[common.Data]) error {
	ctx := stream.Context()
	c, err := a.etcdClient(ctx, "etcd snapshot")
	if err != nil {
		return err
	}
	defer c.Close()
	rd, err := c.Snapshot(ctx)
	if err != nil {
		return fmt.Errorf("failed reading etcd snapshot: %w", err)
	}
	defer rd.Close()
	buf := make([]byte, 64<<10)
	for {
		n, err := rd.Read(buf)
		if n > 0 {
			if err := stream.Send(&common.Data{Bytes: append([]byte(nil), buf[:n]...)}); err != nil {
				return err
			}
		}
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("failed reading etcd snapshot: %w", err)
		}
	}
}

// Bootstrap refuses as Talos refuses a bootstrapped member: the demo's
// control plane runs its etcd cluster from the start.
func (a *API) Bootstrap(context.Context, *machine.BootstrapRequest) (*machine.BootstrapResponse, error) {
	if a.member == nil {
		return nil, status.Error(codes.Unimplemented, "bootstrap is only available on control plane nodes")
	}
	return nil, status.Error(codes.FailedPrecondition, "etcd is already bootstrapped: the demo's control plane runs one etcd cluster from the start")
}

// The etcd downgrade calls are not simulated.
func (*API) EtcdDowngradeValidate(context.Context, *machine.EtcdDowngradeValidateRequest) (*machine.EtcdDowngradeValidateResponse, error) {
	return nil, errNoDowngrade
}

func (*API) EtcdDowngradeEnable(context.Context, *machine.EtcdDowngradeEnableRequest) (*machine.EtcdDowngradeEnableResponse, error) {
	return nil, errNoDowngrade
}

func (*API) EtcdDowngradeCancel(context.Context, *emptypb.Empty) (*machine.EtcdDowngradeCancelResponse, error) {
	return nil, errNoDowngrade
}

var errNoDowngrade = status.Error(codes.Unimplemented, "the example agent does not downgrade its etcd cluster")
