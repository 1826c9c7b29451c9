package main

import (
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// version is set at build time: go build -ldflags "-X main.version=v1.2.3".
var version = ""

type versionInfo struct{ version, commit, goVersion string }

// buildVersion reads the version from the linker flag, else from the module
// version go install records; the commit from the VCS stamp go build adds.
func buildVersion() versionInfo {
	v := versionInfo{version: version, commit: "unknown", goVersion: runtime.Version()}
	info, ok := debug.ReadBuildInfo()
	if !ok {
		return v
	}
	if v.version == "" && info.Main.Version != "" && info.Main.Version != "(devel)" {
		v.version = info.Main.Version
	}
	var dirty bool
	for _, s := range info.Settings {
		switch s.Key {
		case "vcs.revision":
			v.commit = s.Value
		case "vcs.modified":
			dirty = s.Value == "true"
		}
	}
	if dirty {
		v.commit += "-dirty"
	}
	if v.version == "" {
		v.version = "devel"
	}
	return v
}

func runVersion(stdout io.Writer) error {
	v := buildVersion()
	fmt.Fprintf(stdout, "apid %s\ncommit %s\ngo %s %s/%s\n", v.version, v.commit, v.goVersion, runtime.GOOS, runtime.GOARCH)
	return nil
}
