package monitoring

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// sockTable is one of the kernel's socket tables in /proc/net.
type sockTable struct {
	proto   string // the file name, reported as ConnectRecord.l4proto
	v6      bool
	enabled func(*machine.NetstatRequest_L4Proto) bool
}

var sockTables = []sockTable{
	{"tcp", false, (*machine.NetstatRequest_L4Proto).GetTcp},
	{"tcp6", true, (*machine.NetstatRequest_L4Proto).GetTcp6},
	{"udp", false, (*machine.NetstatRequest_L4Proto).GetUdp},
	{"udp6", true, (*machine.NetstatRequest_L4Proto).GetUdp6},
	{"udplite", false, (*machine.NetstatRequest_L4Proto).GetUdplite},
	{"udplite6", true, (*machine.NetstatRequest_L4Proto).GetUdplite6},
	{"raw", false, (*machine.NetstatRequest_L4Proto).GetRaw},
	{"raw6", true, (*machine.NetstatRequest_L4Proto).GetRaw6},
}

// Netstat lists the sockets of the agent's network namespace from the
// /proc/net tables the request's l4proto flags select; with none selected
// it reads tcp, tcp6, udp and udp6, talosctl's default. The filter keeps
// what talosctl netstat expects: LISTENING sockets have no remote end
// (unspecified address and port 0, which includes unconnected UDP and raw
// sockets), CONNECTED ones have both, ALL keeps every socket. A table the
// kernel does not provide (IPv6 disabled, no UDP-Lite) is skipped.
//
// The pid feature is honoured: the owner of each socket is found by
// scanning /proc/<pid>/fd, so only sockets of processes the agent may
// inspect get one; the others keep an empty Process, which talosctl shows
// as "-". Other network namespaces (netns, allnetns) are not supported.
func (*Monitor) Netstat(ctx context.Context, req *machine.NetstatRequest) (_ *machine.NetstatResponse, err error) {
	if ns := req.GetNetns(); ns.GetAllnetns() || len(ns.GetNetns()) > 0 {
		return nil, status.Error(codes.Unimplemented,
			"the example agent reports only its own network namespace: netns and allnetns are not supported")
	}
	l4 := req.GetL4Proto()
	selected := false
	for _, t := range sockTables {
		selected = selected || t.enabled(l4)
	}
	if !selected {
		l4 = &machine.NetstatRequest_L4Proto{Tcp: true, Tcp6: true, Udp: true, Udp6: true}
	}
	keep := func(*machine.ConnectRecord) bool { return true }
	switch req.GetFilter() {
	case machine.NetstatRequest_LISTENING:
		keep = func(r *machine.ConnectRecord) bool { return !hasRemote(r) }
	case machine.NetstatRequest_CONNECTED:
		keep = hasRemote
	}

	records := []*machine.ConnectRecord{}
	for _, t := range sockTables {
		if !t.enabled(l4) {
			continue
		}
		data, err := os.ReadFile(filepath.Join(procPath, "net", t.proto))
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "read %s sockets: %v", t.proto, err)
		}
		recs, err := parseSockTable(data, t.proto, t.v6)
		if err != nil {
			return nil, status.Errorf(codes.Unavailable, "parse %s/net/%s: %v", procPath, t.proto, err)
		}
		for _, r := range recs {
			if keep(r) {
				records = append(records, r)
			}
		}
	}
	if req.GetFeature().GetPid() {
		owners, err := socketOwners(ctx)
		if err != nil {
			return nil, err
		}
		for _, r := range records {
			if p, ok := owners[r.GetInode()]; ok && r.GetInode() != 0 {
				r.Process = p
			}
		}
	}
	return &machine.NetstatResponse{Messages: []*machine.Netstat{{Connectrecord: records}}}, nil
}

// hasRemote reports whether a socket has a remote end, as talosctl's
// CONNECTED filter means it.
func hasRemote(r *machine.ConnectRecord) bool {
	addr, err := netip.ParseAddr(r.GetRemoteip())
	return err == nil && !addr.IsUnspecified() && r.GetRemoteport() != 0
}

// parseSockTable reads a /proc/net/{tcp,udp,udplite,raw}[6] table. Every
// line after the header is
//
//	sl local rem st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode [ref pointer ...]
//
// with addresses and the numbers up to retrnsmt in hexadecimal and the rest
// in decimal, except the pointer.
func parseSockTable(data []byte, proto string, v6 bool) ([]*machine.ConnectRecord, error) {
	var out []*machine.ConnectRecord
	sc := bufio.NewScanner(bytes.NewReader(data))
	for line := 1; sc.Scan(); line++ {
		f := strings.Fields(sc.Text())
		if line == 1 || len(f) == 0 {
			continue // the header
		}
		r, err := parseSocket(f, proto, v6)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		out = append(out, r)
	}
	return out, sc.Err()
}

func parseSocket(f []string, proto string, v6 bool) (*machine.ConnectRecord, error) {
	if len(f) < 10 {
		return nil, fmt.Errorf("%d fields, want at least 10", len(f))
	}
	local, lport, err := parseSockAddr(f[1], v6)
	if err != nil {
		return nil, fmt.Errorf("local address: %w", err)
	}
	remote, rport, err := parseSockAddr(f[2], v6)
	if err != nil {
		return nil, fmt.Errorf("remote address: %w", err)
	}
	var errs []error
	num := func(s string, base int) uint64 {
		n, err := strconv.ParseUint(s, base, 64)
		if err != nil {
			errs = append(errs, err)
		}
		return n
	}
	pair := func(s string) (a, b uint64) {
		x, y, ok := strings.Cut(s, ":")
		if !ok {
			errs = append(errs, fmt.Errorf("%q is not a pair", s))
		}
		return num(x, 16), num(y, 16)
	}
	r := &machine.ConnectRecord{
		L4Proto:    proto,
		Localip:    local.String(),
		Localport:  lport,
		Remoteip:   remote.String(),
		Remoteport: rport,
		// The kernel's TCP states (1 ESTABLISHED ... 11 CLOSING) are the
		// enum's values; UDP and raw sockets are 7 (CLOSE) unless connected.
		State:    machine.ConnectRecord_State(num(f[3], 16)),
		Retrnsmt: num(f[6], 16),
		Uid:      uint32(num(f[7], 10)),
		Timeout:  num(f[8], 10),
		Inode:    num(f[9], 10),
		Process:  &machine.ConnectRecord_Process{}, // talosctl -p reads it unchecked
	}
	r.Txqueue, r.Rxqueue = pair(f[4])
	tr, when := pair(f[5])
	r.Tr, r.Timerwhen = machine.ConnectRecord_TimerActive(tr), when
	if len(f) > 11 {
		r.Ref = num(f[10], 10)
		r.Pointer = num(f[11], 16)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return r, nil
}

// parseSockAddr decodes "ADDR:PORT" from a socket table. The address is
// printed as 32-bit words in host byte order, so each word is turned back
// into the bytes it was in memory, which are in network order.
func parseSockAddr(s string, v6 bool) (netip.Addr, uint32, error) {
	addrHex, portHex, ok := strings.Cut(s, ":")
	size := 4
	if v6 {
		size = 16
	}
	if !ok || len(addrHex) != 2*size {
		return netip.Addr{}, 0, fmt.Errorf("malformed address %q", s)
	}
	raw, err := hex.DecodeString(addrHex)
	if err != nil {
		return netip.Addr{}, 0, fmt.Errorf("address %q: %w", s, err)
	}
	var b [16]byte
	for i := 0; i < size; i += 4 {
		binary.NativeEndian.PutUint32(b[i:], binary.BigEndian.Uint32(raw[i:]))
	}
	port, err := strconv.ParseUint(portHex, 16, 16)
	if err != nil {
		return netip.Addr{}, 0, fmt.Errorf("port %q: %w", s, err)
	}
	if v6 {
		return netip.AddrFrom16(b), uint32(port), nil
	}
	return netip.AddrFrom4([4]byte(b[:4])), uint32(port), nil
}

// socketOwners maps socket inodes to the process holding them, found by
// reading the /proc/<pid>/fd links ("socket:[inode]") of every process the
// agent may inspect. A socket shared by several processes (after fork) is
// attributed to the lowest pid. Processes that exit meanwhile are skipped.
func socketOwners(ctx context.Context) (map[uint64]*machine.ConnectRecord_Process, error) {
	procs, err := allProcs()
	if err != nil {
		return nil, err
	}
	owners := map[uint64]*machine.ConnectRecord_Process{}
	for _, p := range procs {
		if err := ctx.Err(); err != nil {
			return nil, status.FromContextError(err).Err()
		}
		targets, err := p.FileDescriptorTargets()
		if err != nil {
			continue // gone, or not ours to inspect
		}
		var proc *machine.ConnectRecord_Process
		for _, t := range targets {
			n, ok := strings.CutPrefix(t, "socket:[")
			if !ok {
				continue
			}
			inode, err := strconv.ParseUint(strings.TrimSuffix(n, "]"), 10, 64)
			if err != nil {
				continue
			}
			if old, ok := owners[inode]; ok && old.GetPid() < uint32(p.PID) {
				continue
			}
			if proc == nil {
				comm, _ := p.Comm()
				proc = &machine.ConnectRecord_Process{Pid: uint32(p.PID), Name: comm}
			}
			owners[inode] = proc
		}
	}
	return owners, nil
}
