#!/usr/bin/env bash
# Talos's own integration suite (internal/integration of siderolabs/talos,
# suites api.* and cli.*) against `apid demo -nodes 5`, as the README's
# conformance section says. Usage (make conformance does this):
#
#   TALOS_SRC=/path/to/talos-at-v1.13.9 TALOS_DEPS=/path/to/deps test/conformance/run.sh [OUT]
#
# TALOS_SRC is the Talos tree at the tag (exported from the public
# repository); TALOS_DEPS holds the modules the Go module proxy refuses,
# exported at the versions the tag's go.mod names: go-kubernetes/
# (siderolabs/go-kubernetes v0.2.38), etcd/ (etcd-io/etcd v3.6.12) and
# containerd/ (containerd/containerd v2.2.4, for the tag's fork). Neither
# make test nor CI runs this: the source comes from outside the module
# proxy. Writes the results, one test a line, to OUT (default
# test/conformance/results.txt) and prints the counts.
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${TALOS_SRC:?TALOS_SRC: a Talos source tree at the tag}"
: "${TALOS_DEPS:?TALOS_DEPS: the modules the proxy refuses (see the header)}"
TALOS_VERSION=${TALOS_VERSION:-v1.13.9}
out=${1:-test/conformance/results.txt}
work=${CONFORMANCE_WORK:-$(mktemp -d)}
mkdir -p "$work/bin"

# The tag's go.mod, with the refused modules replaced by the exported trees.
modfile="$work/go.conformance.mod"
sed "s#^replace github.com/containerd/containerd/v2 => .*#replace github.com/containerd/containerd/v2 => $TALOS_DEPS/containerd#" "$TALOS_SRC/go.mod" > "$modfile"
cat >> "$modfile" <<MOD

replace (
	github.com/siderolabs/go-kubernetes => $TALOS_DEPS/go-kubernetes
	go.etcd.io/etcd/etcdutl/v3 => $TALOS_DEPS/etcd/etcdutl
)
MOD
cp "$TALOS_SRC/go.sum" "${modfile%.mod}.sum"
build() { (cd "$TALOS_SRC" && GOWORK=off GOFLAGS="-mod=mod -modfile=$modfile" go "$@"); }
[ -x "$work/bin/talosctl" ] || build build -o "$work/bin/talosctl" \
	-ldflags "-X github.com/siderolabs/talos/pkg/machinery/version.Tag=$TALOS_VERSION" ./cmd/talosctl
[ -x "$work/bin/integration.test" ] || build test -c -o "$work/bin/integration.test" \
	-tags integration,integration_api,integration_cli,integration_k8s \
	-ldflags "-X github.com/siderolabs/talos/pkg/machinery/version.Tag=$TALOS_VERSION" ./internal/integration
go build -o "$work/bin/apid" ./cmd/apid

# The demo, as the README runs it, from a fresh directory.
demo="$work/demo"
rm -rf "$demo" && mkdir -p "$demo"
(cd "$demo" && exec "$work/bin/apid" demo -nodes 5 > demo.log 2>&1) &
apid_pid=$!
trap 'kill $apid_pid 2>/dev/null; wait $apid_pid 2>/dev/null' EXIT
for _ in $(seq 1 300); do grep -q "nodes up" "$demo/demo.log" 2>/dev/null && break; sleep 0.1; done
grep -q "nodes up" "$demo/demo.log" || { cat "$demo/demo.log"; exit 1; }

# The suites find the nodes through a provisioner's saved state.
state="$work/state"
mkdir -p "$state/apid-demo"
{
	echo "provisionername: qemu"
	echo "clusterinfo:"
	echo "  clustername: apid-demo"
	echo "  network: {name: apid-demo, cidrs: [127.0.0.0/8], mtu: 65536}"
	echo "  nodes:"
	for i in 1 2 3 4 5; do
		type=controlplane; [ "$i" -gt 3 ] && type=worker
		echo "    - {id: node-$i, name: node-$i, type: $type, ips: [127.0.0.1$i], apiport: 50000}"
	done
} > "$state/apid-demo/state.yaml"

# Not run: tests that write configurations naming non-loopback addresses
# (TalosconfigSuite/TestMerge), image cache-create (it pulls images from
# registries, which this machine cannot reach), and client-side health
# checks, which wait talosctl's 20 minutes for resources (COSI,
# Kubernetes) the demo node does not serve yet, and the network
# configuration suite (each test patches the machine configuration, then
# waits minutes for the links and routes a Talos OS would make of it), and
# cli.RebootSuite (after each reboot it runs talosctl's client-side health
# check, which waits its 20 minutes for Kubernetes).
# ListSuite/TestDepth panics the binary when it fails: it runs alone.
skip='^TestIntegration$/^cli\.ImageSuite$/^TestCacheCreate|^TestIntegration$/^cli\.TalosconfigSuite$/^TestMerge$|^TestIntegration$/^cli\.HealthSuite$/^TestClientSide|^TestIntegration$/^cli\.ListSuite$/^TestDepth$|^TestIntegration$/^api\.NetworkConfigSuite$|^TestIntegration$/^cli\.RebootSuite$'
run() {
	"$work/bin/integration.test" -test.v -test.timeout 30m "$@" \
		-talos.config "$demo/apid-demo/talosconfig" -talos.talosctlpath "$work/bin/talosctl" \
		-talos.version "$TALOS_VERSION" -talos.provisioner qemu -talos.state "$state" -talos.name apid-demo \
		2>&1 || true
}
{
	run -test.run '^TestIntegration$/^(api|cli)\.' -test.skip "$skip"
	run -test.run '^TestIntegration$/^cli\.ListSuite$/^TestDepth$'
} > "$work/integration.log"
grep -E '^\s+--- (PASS|FAIL|SKIP): TestIntegration/(api|cli)\.[A-Za-z]+/' "$work/integration.log" |
	sed -E 's/^\s+--- (PASS|FAIL|SKIP): TestIntegration\/([^ ]+) .*/\1 \2/' | sort -k2 -u > "$out"
echo "conformance against apid demo -nodes 5 (Talos $TALOS_VERSION): $(grep -c '^PASS' "$out") passed, $(grep -c '^FAIL' "$out") failed, $(grep -c '^SKIP' "$out") skipped"
echo "results: $out; full log: $work/integration.log"
