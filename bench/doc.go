// Package bench measures what a call costs through apid's proxy core compared
// with calling the node agent directly and with the two proxies apid replaces:
// github.com/mwitkow/grpc-proxy (one-to-one) and github.com/siderolabs/grpc-proxy
// (one-to-one and one-to-many, the core of Talos's own apid).
//
// Every variant serves the same test MachineService (internal/testbackend) on
// 127.0.0.1 over plain-text gRPC, so the numbers are the proxies' cost and not
// TLS's. The package holds only benchmarks and a test of its own harness; run
// it with `make bench` and compare the via= variants with benchstat.
package bench
