package disruption

import (
	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/protobuf/proto"
)

// effect is what a call does to the node it reaches.
type effect uint8

const (
	// none: the call leaves the node up (a mode that does not reboot).
	none effect = iota
	// reboots: the node goes down and comes back with a new boot (or,
	// shut down, stays down until someone starts it).
	reboots
	// maybeReboots: the node's reply says whether it did (ApplyConfiguration
	// in AUTO mode); counted as a reboot until then.
	maybeReboots
	// degrades: the node stays up, but a part the readiness gates read
	// (its etcd member) goes away until it is put back.
	degrades
)

// Talos's method names; the API is machine.MachineService's.
const (
	mReboot         = "/machine.MachineService/Reboot"
	mShutdown       = "/machine.MachineService/Shutdown"
	mReset          = "/machine.MachineService/Reset"
	mUpgrade        = "/machine.MachineService/Upgrade"
	mRollback       = "/machine.MachineService/Rollback"
	mApply          = "/machine.MachineService/ApplyConfiguration"
	mEtcdLeave      = "/machine.MachineService/EtcdLeaveCluster"
	mEtcdRemove     = "/machine.MachineService/EtcdRemoveMemberByID"
	mServiceStop    = "/machine.MachineService/ServiceStop"
	mServiceRestart = "/machine.MachineService/ServiceRestart"
)

// methods are the calls that may take a node down, each with what it does
// whatever its request says. LifecycleService/Upgrade is not one: it only
// installs, and the Reboot talosctl sends after it is (holding the install
// would deadlock talosctl, which reboots only once every install ended).
var methods = map[string]effect{
	mReboot:         reboots,
	mShutdown:       reboots,
	mReset:          reboots,
	mUpgrade:        reboots, // the legacy upgrade reboots by itself
	mRollback:       reboots, // reverts the boot entry, then reboots
	mApply:          maybeReboots,
	mEtcdLeave:      degrades,
	mEtcdRemove:     degrades,
	mServiceStop:    degrades,
	mServiceRestart: degrades,
}

// Disruptive reports whether calls of fullMethod may take their node down,
// before their request is read.
func Disruptive(fullMethod string) bool {
	_, ok := methods[fullMethod]
	return ok
}

// classify reads what a call of fullMethod with request does. A request
// that does not parse is counted as the method's worst: the node decides
// what it means, and the budget must not be talked past.
func classify(fullMethod string, request []byte) effect {
	e, ok := methods[fullMethod]
	if !ok {
		return none
	}
	switch fullMethod {
	case mApply:
		var req machine.ApplyConfigurationRequest
		if proto.Unmarshal(request, &req) != nil {
			return reboots
		}
		if req.GetDryRun() {
			return none
		}
		switch req.GetMode() {
		case machine.ApplyConfigurationRequest_REBOOT:
			return reboots
		case machine.ApplyConfigurationRequest_AUTO:
			return maybeReboots
		}
		return none
	case mServiceStop, mServiceRestart:
		// Only etcd's: it takes the member away; other services are the
		// readiness gates' to judge, not a budget's.
		var req machine.ServiceStopRequest // ServiceRestartRequest has the same field 1
		if proto.Unmarshal(request, &req) != nil || req.GetId() == "etcd" {
			return degrades
		}
		return none
	}
	return e
}

// rebootedPerReply reads an ApplyConfiguration reply: whether the node said
// it reboots. A reply that does not parse counts as a reboot.
func rebootedPerReply(reply []byte) bool {
	var resp machine.ApplyConfigurationResponse
	if proto.Unmarshal(reply, &resp) != nil || len(resp.GetMessages()) == 0 {
		return true
	}
	for _, m := range resp.GetMessages() {
		if m.GetMode() == machine.ApplyConfigurationRequest_REBOOT {
			return true
		}
	}
	return false
}

// removedMember reads the member an EtcdRemoveMemberByID call removes.
func removedMember(request []byte) (uint64, bool) {
	var req machine.EtcdRemoveMemberByIDRequest
	if proto.Unmarshal(request, &req) != nil {
		return 0, false
	}
	return req.GetMemberId(), true
}
