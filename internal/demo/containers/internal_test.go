package containers

import (
	"testing"
)

func TestNormalizeImage(t *testing.T) {
	for in, want := range map[string]string{
		"alpine":                               "docker.io/library/alpine:latest",
		"alpine:3.20":                          "docker.io/library/alpine:3.20",
		"siderolabs/installer":                 "docker.io/siderolabs/installer:latest",
		"ghcr.io/siderolabs/installer:v1.13.9": "ghcr.io/siderolabs/installer:v1.13.9",
		"localhost/x":                          "localhost/x:latest",
		"registry:5000/x":                      "registry:5000/x:latest",
		"ghcr.io/a/b@sha256:00":                "ghcr.io/a/b@sha256:00",
	} {
		if got, err := normalizeImage(in); err != nil || got != want {
			t.Errorf("normalizeImage(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
