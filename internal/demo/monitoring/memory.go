package monitoring

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"os"
	"strconv"
	"strings"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/emptypb"
)

// Memory reports the statistics in the monitor's meminfo file
// (/proc/meminfo by default), or Unavailable when they cannot be read.
// Values are in kB as the kernel prints them (the HugePages_ counters are
// page counts), which is what Talos returns.
func (m *Monitor) Memory(ctx context.Context, _ *emptypb.Empty) (_ *machine.MemoryResponse, err error) {
	data, err := os.ReadFile(m.meminfoPath)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "read memory statistics: %v", err)
	}
	info, err := parseMeminfo(data)
	if err != nil {
		return nil, status.Errorf(codes.Unavailable, "parse %s: %v", m.meminfoPath, err)
	}
	return &machine.MemoryResponse{Messages: []*machine.Memory{{Meminfo: info}}}, nil
}

// parseMeminfo reads lines of the form "Key:   value [kB]". MemInfo's field
// names are the kernel's keys lower-cased with punctuation dropped
// ("Active(anon)" -> activeanon, "HugePages_Total" -> hugepagestotal), so a
// key is matched to its field through the message descriptor instead of a
// hand-written table. Unknown keys and malformed lines are skipped; it is an
// error only when nothing is recognised.
func parseMeminfo(data []byte) (*machine.MemInfo, error) {
	info := &machine.MemInfo{}
	m := info.ProtoReflect()
	fields := m.Descriptor().Fields()
	found := 0
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		key, rest, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		value, _, _ := strings.Cut(strings.TrimSpace(rest), " ")
		n, err := strconv.ParseUint(value, 10, 64)
		if err != nil {
			continue
		}
		fd := fields.ByName(protoreflect.Name(meminfoFieldName(key)))
		if fd == nil || fd.Kind() != protoreflect.Uint64Kind {
			continue
		}
		m.Set(fd, protoreflect.ValueOfUint64(n))
		found++
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if found == 0 {
		return nil, errors.New("no known fields")
	}
	return info, nil
}

// meminfoFieldName maps a /proc/meminfo key to the MemInfo field name.
func meminfoFieldName(key string) string {
	var b strings.Builder
	for _, c := range key {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9':
			b.WriteRune(c)
		case c >= 'A' && c <= 'Z':
			b.WriteRune(c + 'a' - 'A')
		}
	}
	return b.String()
}
