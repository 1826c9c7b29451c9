// Package version says which apid this is: the version set at build time
// (or recorded by go install), the VCS commit and the Go version.
package version

import (
	"runtime"
	"runtime/debug"
)

// Version is set at build time: go build -ldflags "-X github.com/apid/apid/internal/version.Version=v1.2.3".
var Version = ""

// Info is this build's identity.
type Info struct {
	Version, Commit, Go string
}

// Get reads the version from the linker flag, else from the module version
// go install records; the commit from the VCS stamp go build adds.
func Get() Info {
	v := Info{Version: Version, Commit: "unknown", Go: runtime.Version()}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if v.Version == "" && info.Main.Version != "" && info.Main.Version != "(devel)" {
		v.Version = info.Main.Version
	}
	var dirty bool
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Commit = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if dirty {
		v.Commit += "-dirty"
	}
	if v.Version == "" {
		v.Version = "devel"
	}
	return v
}
