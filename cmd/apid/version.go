package main

import (
	"fmt"
	"io"
	"runtime"

	"github.com/apid/apid/internal/version"
)

func runVersion(stdout io.Writer) error {
	v := version.Get()
	fmt.Fprintf(stdout, "apid %s\ncommit %s\ngo %s %s/%s\n", v.Version, v.Commit, v.Go, runtime.GOOS, runtime.GOARCH)
	return nil
}
