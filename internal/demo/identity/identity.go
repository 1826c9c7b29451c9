package identity

import (
	"context"
	"runtime"
	"runtime/debug"
	"strings"

	"github.com/siderolabs/talos/pkg/machinery/api/machine"
	"google.golang.org/protobuf/types/known/emptypb"
)

// VersionTag is the tag reported by the Version method: the version of the
// Talos machinery module whose API the node serves, read from the build
// information (fallbackMachineryVersion when there is none), with the build
// metadata "+apid-example", e.g. "v1.13.9+apid-example". talosctl warns when
// a node's tag is older, by semantic versioning, than its own version;
// build metadata, unlike a pre-release suffix, does not make the tag older
// than the release it names. It is set at start-up and not meant to change.
var VersionTag = MachineryVersion() + "+apid-example"

const (
	// machineryModule is the module of the generated Talos types the node
	// serves.
	machineryModule = "github.com/siderolabs/talos/pkg/machinery"
	// fallbackMachineryVersion is the version of machineryModule in go.mod,
	// for binaries built without module information (a test keeps the two
	// equal).
	fallbackMachineryVersion = "v1.13.9"

	// PlatformName is the platform name reported by the Version method.
	PlatformName = "apid-example-agent"
	// PlatformMode is the platform mode reported by the Version method: the
	// node runs as an ordinary process and manages no machine.
	PlatformMode = "container"
)

// Identity serves Version and Hostname.
type Identity struct {
	hostname string
}

// New returns the identity of a node named hostname.
func New(hostname string) *Identity { return &Identity{hostname: hostname} }

// Version reports the node's build.
func (*Identity) Version(ctx context.Context, _ *emptypb.Empty) (_ *machine.VersionResponse, err error) {
	sha, built := buildVCS()
	return &machine.VersionResponse{Messages: []*machine.Version{{
		Version: &machine.VersionInfo{
			Tag:       VersionTag,
			Sha:       sha,
			Built:     built,
			GoVersion: runtime.Version(),
			Os:        runtime.GOOS,
			Arch:      runtime.GOARCH,
		},
		Platform: &machine.PlatformInfo{Name: PlatformName, Mode: PlatformMode},
		// apid enforces roles on every call, as Talos does with RBAC on.
		Features: &machine.FeaturesInfo{Rbac: true},
	}}}, nil
}

// Hostname reports the configured hostname.
func (i *Identity) Hostname(ctx context.Context, _ *emptypb.Empty) (_ *machine.HostnameResponse, err error) {
	return &machine.HostnameResponse{Messages: []*machine.Hostname{{Hostname: i.hostname}}}, nil
}

// buildVCS returns the commit and commit time embedded by the Go toolchain,
// or "unknown" and "" when the binary was built without VCS information.
func buildVCS() (sha, built string) {
	sha = "unknown"
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return sha, built
	}
	for _, kv := range info.Settings {
		switch kv.Key {
		case "vcs.revision":
			sha = kv.Value
		case "vcs.time":
			built = kv.Value
		}
	}
	return sha, built
}

// MachineryVersion returns the version of the Talos machinery module linked
// into the binary (the replacement's, if it is replaced by another
// version): the Talos API the node follows.
func MachineryVersion() string {
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return fallbackMachineryVersion
	}
	for _, dep := range info.Deps {
		if dep.Path != machineryModule {
			continue
		}
		v := dep.Version
		if dep.Replace != nil && dep.Replace.Version != "" {
			v = dep.Replace.Version
		}
		if strings.HasPrefix(v, "v") {
			return v
		}
	}
	return fallbackMachineryVersion
}
