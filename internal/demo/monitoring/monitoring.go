package monitoring

// DefaultMeminfoPath is the file Memory parses unless told otherwise.
const DefaultMeminfoPath = "/proc/meminfo"

// Monitor serves the monitoring methods.
type Monitor struct {
	meminfoPath string // parsed by Memory
}

// New returns a monitor whose Memory parses meminfoPath
// (DefaultMeminfoPath if empty).
func New(meminfoPath string) *Monitor {
	if meminfoPath == "" {
		meminfoPath = DefaultMeminfoPath
	}
	return &Monitor{meminfoPath: meminfoPath}
}
