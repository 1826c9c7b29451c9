// Package deps pins the modules the tree is about to use so that go.mod and
// go.sum stay complete while packages are being written. It is removed once
// every dependency is imported by real code.
package deps

import (
	_ "github.com/hashicorp/go-multierror"
	_ "github.com/mwitkow/grpc-proxy/proxy"
	_ "github.com/prometheus/client_golang/prometheus"
	_ "github.com/siderolabs/grpc-proxy/proxy"
	_ "github.com/siderolabs/talos/pkg/machinery/api/machine"
	_ "github.com/siderolabs/talos/pkg/machinery/client"
	_ "go.uber.org/goleak"
	_ "golang.org/x/sync/errgroup"
	_ "golang.org/x/sync/singleflight"
	_ "google.golang.org/grpc/reflection"
	_ "gopkg.in/yaml.v3"
)
