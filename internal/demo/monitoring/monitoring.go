package monitoring

import "time"

// DefaultMeminfoPath is the file Memory parses unless told otherwise.
const DefaultMeminfoPath = "/proc/meminfo"

// Monitor serves the monitoring methods.
type Monitor struct {
	meminfoPath string           // parsed by Memory
	bootTime    func() time.Time // nil: the host's
}

// Option configures New.
type Option func(*Monitor)

// WithBootTime reports bootTime as SystemStat's boot time: the simulated
// machine's, which its simulated reboots move, rather than the host's.
func WithBootTime(bootTime func() time.Time) Option {
	return func(m *Monitor) { m.bootTime = bootTime }
}

// New returns a monitor whose Memory parses meminfoPath
// (DefaultMeminfoPath if empty).
func New(meminfoPath string, opts ...Option) *Monitor {
	if meminfoPath == "" {
		meminfoPath = DefaultMeminfoPath
	}
	m := &Monitor{meminfoPath: meminfoPath}
	for _, o := range opts {
		o(m)
	}
	return m
}
