package files

import (
	"path/filepath"
	"slices"
)

// DefaultReadRoots are the directories the file methods serve from when no
// roots are given: what a Talos node's users read most (its /etc holds the
// machine's own configuration files). Everything is served read-only, and
// Read and Copy are os:admin's alone in the policy, as in Talos.
var DefaultReadRoots = []string{"/proc", "/sys", "/etc"}

// Roots serves Read, List, DiskUsage and Copy, confined to its read roots.
type Roots struct {
	allowed  []string // read roots, cleaned as configured
	resolved []string // read roots, symlink-resolved
	bootID   func() string
}

// Option configures New.
type Option func(*Roots)

// WithBootID serves the kernel's boot ID (Read of
// /proc/sys/kernel/random/boot_id) from bootID: the simulated machine's,
// which changes at each of its simulated boots, so that talosctl's wait for
// a reboot sees it happen. Without it, the boot ID is refused: the host's
// would never change.
func WithBootID(bootID func() string) Option { return func(rs *Roots) { rs.bootID = bootID } }

// New returns the file methods confined to roots (DefaultReadRoots if
// none). Each root is made absolute, cleaned and symlink-resolved once,
// here; empty entries are ignored. A request for anything that is not
// (after cleaning and symlink resolution) inside one of them is refused
// with PermissionDenied.
func New(roots []string, opts ...Option) *Roots {
	if len(roots) == 0 {
		roots = slices.Clone(DefaultReadRoots)
	}
	allowed, resolved := resolveRoots(roots)
	rs := &Roots{allowed: allowed, resolved: resolved}
	for _, o := range opts {
		o(rs)
	}
	return rs
}

// Resolved are the read roots, symlink-resolved.
func (rs *Roots) Resolved() []string { return rs.resolved }

// resolveRoots makes each root absolute and clean and, when it exists,
// resolves its symlinks, so that containment checks compare real paths.
// It returns the cleaned roots as configured and their resolved forms.
func resolveRoots(roots []string) (cleaned, resolved []string) {
	for _, r := range roots {
		if r == "" {
			continue
		}
		abs, err := filepath.Abs(r)
		if err != nil {
			continue
		}
		cleaned = append(cleaned, abs)
		if real, err := filepath.EvalSymlinks(abs); err == nil {
			abs = real
		}
		resolved = append(resolved, abs)
	}
	return cleaned, resolved
}
