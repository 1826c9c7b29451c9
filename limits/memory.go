package limits

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Memory is a budget of bytes held for calls in flight. New calls are
// refused while the bytes held exceed it; calls already running go on (each
// is bounded on its own by flow control and message size limits), so a
// spent budget stops growth without breaking anyone's call.
type Memory struct {
	limit   atomic.Int64
	held    atomic.Int64
	refused atomic.Int64
}

// NewMemory returns a budget of limit bytes; limit <= 0 means no limit.
func NewMemory(limit int64) *Memory {
	m := &Memory{}
	m.limit.Store(limit)
	return m
}

// SetLimit changes the budget for calls that start from now on.
func (m *Memory) SetLimit(limit int64) { m.limit.Store(limit) }

// Admit returns ResourceExhausted, naming the limit, while the budget is
// spent.
func (m *Memory) Admit() error {
	limit := m.limit.Load()
	if limit <= 0 {
		return nil
	}
	if held := m.held.Load(); held > limit {
		m.refused.Add(1)
		return status.Errorf(codes.ResourceExhausted,
			"apid holds %d bytes for calls in flight, over limits.bufferedBytes (%d): try again shortly", held, limit)
	}
	return nil
}

// Hold adds n bytes (negative: releases them).
func (m *Memory) Hold(n int64) { m.held.Add(n) }

// Held returns the bytes held now.
func (m *Memory) Held() int64 { return m.held.Load() }

// Limit returns the budget; 0 means none.
func (m *Memory) Limit() int64 { return max(m.limit.Load(), 0) }

// Refused returns how many calls the budget has refused.
func (m *Memory) Refused() int64 { return m.refused.Load() }

// DefaultMemory is the default budget: an eighth of the memory this process
// may use (its cgroup's limit, else the machine's), and at least 64 MiB.
// On a machine or cgroup of 4 GiB that is 512 MiB.
func DefaultMemory() int64 {
	total := cgroupMemory()
	if total <= 0 {
		total = machineMemory()
	}
	if total <= 0 {
		total = 8 << 30
	}
	return max(total/8, 64<<20)
}

// cgroupMemory reads the cgroup v2 memory limit, or 0 when there is none.
func cgroupMemory() int64 {
	b, err := os.ReadFile("/sys/fs/cgroup/memory.max")
	if err != nil {
		return 0
	}
	n, err := strconv.ParseInt(string(bytes.TrimSpace(b)), 10, 64)
	if err != nil { // "max"
		return 0
	}
	return n
}

// machineMemory reads MemTotal from /proc/meminfo, or 0.
func machineMemory() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "MemTotal:"); ok {
			var kb int64
			if _, err := fmt.Sscanf(strings.TrimSpace(v), "%d kB", &kb); err == nil {
				return kb << 10
			}
		}
	}
	return 0
}
