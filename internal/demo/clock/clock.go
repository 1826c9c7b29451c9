package clock

import (
	"context"

	timeapi "github.com/siderolabs/talos/pkg/machinery/api/time"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// LocalClockServer is the server name Time reports: the node has no NTP
// client, so it cannot say what any time server thinks the time is.
const LocalClockServer = "local clock (the example agent has no NTP client)"

// Local serves time.TimeService from the local clock.
type Local struct {
	timeapi.UnimplementedTimeServiceServer
}

// Time reports the host's clock. Talos reports its configured NTP server
// and the time that server gave; the node names [LocalClockServer] instead
// and, having no remote time, reports the local time for both.
func (Local) Time(ctx context.Context, _ *emptypb.Empty) (_ *timeapi.TimeResponse, err error) {
	return localTime(LocalClockServer), nil
}

// TimeCheck is Time for a named server, which is not queried: the reply
// names the server, says that it was not asked, and reports the local time
// for both times.
func (Local) TimeCheck(ctx context.Context, req *timeapi.TimeRequest) (_ *timeapi.TimeResponse, err error) {
	if req.GetServer() == "" {
		return nil, status.Error(codes.InvalidArgument, "server is required")
	}
	return localTime(req.GetServer() + " (not queried: the example agent has no NTP client; both times are the local clock)"), nil
}

func localTime(server string) *timeapi.TimeResponse {
	now := timestamppb.Now()
	return &timeapi.TimeResponse{Messages: []*timeapi.Time{{Server: server, Localtime: now, Remotetime: now}}}
}
