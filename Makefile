# The targets a person runs are the ones CI runs.
GO ?= go
PKGS := ./...

.PHONY: build test test-short stress test-busy conformance bench bench-cluster bench-one bench-fanout soak lint fuzz demo clean

# The gateway alone: without the demo and the example agent, which link the
# resource runtime of the demo node (go run ./cmd/apid demo keeps them).
build:
	$(GO) build -buildvcs=auto -tags nodemo -o bin/apid ./cmd/apid

# Everything CI checks: formatting, vet, and every test under the race
# detector, a line per test as it ends (gotestsum, pinned and fetched from
# the module proxy, runs go test and closes with its count).
GOTESTSUM := gotest.tools/gotestsum@v1.13.0
test: lint
	$(GO) run $(GOTESTSUM) --format testname --format-hide-empty-pkg -- -race -count=1 -timeout 20m $(PKGS)

# Unit tests only (no end-to-end processes), for a quick loop.
test-short:
	$(GO) test -race -count=1 -short $(PKGS)

# The timing-sensitive tests (a deadline, timeout or sleep below a few
# seconds) STRESS_COUNT times each under the race detector, beside
# HOGS CPU-bound processes (default: two per core), so that a test that
# holds only on an idle machine is found here and not by a newcomer.
STRESS_COUNT ?= 20
HOGS ?= $(shell echo $$(( $$(nproc) * 2 )))
STRESS_TESTS := \
	proxy:'TestStressMixedFaults|TestOneToMany.*|TestBudgetCountsWhatCallsHoldAndReleasesIt|TestConnectionsAreReleasedAfterTheCallReturns' \
	clusterhealth:'TestUnhealthyClusters|TestCutOffAttemptKeepsTheFinding|TestConvergingClusterPasses|TestHealthyCluster' \
	director:'TestCallersDeadlinesEjectNobody|TestEjectionLifecycle|TestPool.*|TestRouteNodeTimeout' \
	internal/gateway:'TestConcurrentCallsPerIdentity|TestDrain|TestDrainEndsWhenCallsDo|TestObservability|TestEjection|TestHealthAndReadiness|TestEveryLiveKeyApplies|TestAdminAnswersOnlyItsHosts|TestHungNodeEjectedThroughTheGateway' \
	inventory:'TestFileShrunkInPlaceKeepsItsNodes|TestClusterSourceCoalescesBursts|TestClusterSourceBounds' \
	internal/demo/lifecycle:'TestEventsSlowSubscriber|TestEventsTailSeconds|TestRebootSimulation|TestRebootTrackedLikeTalosctl' \
	certs:'TestSourceWatch|TestNodeToNode' \
	limits:'TestListenerClosesConnectionsOverTheTotalAtOnce'
stress:
	@set -e; pids=""; trap 'kill $$pids 2>/dev/null' EXIT; \
	  for i in $$(seq $(HOGS)); do sh -c 'while :; do :; done' & pids="$$pids $$!"; done; \
	  echo "$(HOGS) CPU hogs running"; \
	  for t in $(STRESS_TESTS); do \
	    pkg=$${t%%:*}; re=$${t#*:}; \
	    $(GO) test -race -count=$(STRESS_COUNT) -timeout 30m -run "^($$re)\$$" ./$$pkg/; \
	  done

# make test beside the same CPU hogs, once.
test-busy:
	@set -e; pids=""; trap 'kill $$pids 2>/dev/null' EXIT; \
	  for i in $$(seq $(HOGS)); do sh -c 'while :; do :; done' & pids="$$pids $$!"; done; \
	  echo "$(HOGS) CPU hogs running"; \
	  $(MAKE) test

# Talos's own integration suite (api.* and cli.*) against apid demo -nodes
# 5, given the Talos tree at the tag and the modules the proxy refuses
# (test/conformance/run.sh says how to get them). Not part of make test.
conformance:
	@test -n "$(TALOS_SRC)" -a -n "$(TALOS_DEPS)" || { echo "usage: make conformance TALOS_SRC=DIR TALOS_DEPS=DIR (see test/conformance/run.sh)"; exit 2; }
	TALOS_SRC=$(TALOS_SRC) TALOS_DEPS=$(TALOS_DEPS) test/conformance/run.sh

# Source only: a tracked file over 1 MiB is a build output or data that
# does not belong in the repository.
MAX_FILE_BYTES := 1048576
lint:
	@big=$$(git ls-files -z 2>/dev/null | xargs -0 -r stat -c '%s %n' 2>/dev/null | awk -v max=$(MAX_FILE_BYTES) '$$1 > max'); \
	  if [ -n "$$big" ]; then echo "tracked files over $(MAX_FILE_BYTES) bytes:"; echo "$$big"; exit 1; fi
	@out=$$(gofmt -l $$(git ls-files '*.go' 2>/dev/null || find . -name '*.go')); \
	  if [ -n "$$out" ]; then echo "gofmt would change:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	$(GO) vet -tags nodemo ./cmd/apid
	$(GO) run $(STATICCHECK) $(PKGS)

# The static analyser, pinned; the module proxy serves it, so CI needs
# nothing else. Deprecated calls that released clients still make are
# kept on purpose, each marked //lint:ignore SA1019 with its reason.
STATICCHECK := honnef.co/go/tools/cmd/staticcheck@v0.8.2

# Benchmarks against a direct call and the anchor proxies, benchstat-friendly.
bench:
	$(GO) test -run '^$$' -bench . -benchmem -count 6 -timeout 60m ./bench/ | tee bench.txt

# Cluster-wide calls through one gateway process, server-side fan-out against
# client-side multiplexing (as talosctl does it), at 3, 50 and 200 nodes;
# writes the table to bench-cluster.md. ROUNDS interleaved windows per style.
ROUNDS ?= 5
bench-cluster:
	APID_BENCH_CLUSTER=1 APID_BENCH_ROUNDS=$(ROUNDS) APID_BENCH_OUT=$(CURDIR)/bench-cluster.md \
	  $(GO) test -run '^TestClusterWideCalls$$' -count 1 -v -timeout 30m ./bench/

# Whole gateways against siderolabs/grpc-proxy wired as Talos v1.13's apid
# wires it, each a process of its own, gateway CPU per call from /proc:
# concurrent node calls on one connection (bench-one.md), and Version
# fanned out to 20, 100 and 1,000 nodes (bench-fanout.md; SIZES to choose).
bench-one:
	APID_BENCH_ONE=1 APID_BENCH_ROUNDS=$(or $(BENCH_ROUNDS),7) APID_BENCH_OUT=$(CURDIR)/bench-one.md \
	  $(GO) test -run '^TestOneToOneCalls$$' -count 1 -v -timeout 30m ./bench/
SIZES ?= 20,100,1000
bench-fanout:
	APID_BENCH_FANOUT=1 APID_BENCH_ROUNDS=$(or $(BENCH_ROUNDS),7) APID_BENCH_SIZES=$(SIZES) APID_BENCH_OUT=$(CURDIR)/bench-fanout.md \
	  $(GO) test -run '^TestFanOutCalls$$' -count 1 -v -timeout 30m ./bench/

# 1,000 concurrent streamed fan-outs through one gateway for SOAK (10m):
# its RSS must stay flat and its goroutines return to where they were.
SOAK ?= 10m
soak:
	APID_SOAK=$(SOAK) $(GO) test -run '^TestSoak$$' -count 1 -v -timeout 60m ./test/

# A short run of every fuzz target (FUZZTIME each).
FUZZTIME ?= 30s
FUZZ_TARGETS := aggregate:FuzzStampReply aggregate:FuzzStampMessage aggregate:FuzzCheckMessage aggregate:FuzzErrorEntry \
	director:FuzzParseTargets auth:FuzzPolicy pki:FuzzMergeTalosconfig \
	internal/demo/monitoring:FuzzParseMeminfo internal/demo/logs:FuzzFormatKmsgRecord
fuzz:
	@set -e; for t in $(FUZZ_TARGETS); do \
	  pkg=$${t%%:*}; fn=$${t##*:}; \
	  echo "fuzz $$fn ($$pkg)"; \
	  $(GO) test -run '^$$' -fuzz "^$$fn\$$" -fuzztime $(FUZZTIME) ./$$pkg/; \
	done

# DEMO_FLAGS passes apid demo's flags: make demo DEMO_FLAGS='-nodes 5 -first-ip 127.0.0.21'
demo:
	$(GO) run ./cmd/apid demo $(DEMO_FLAGS)

clean:
	rm -rf bin bench.txt bench-cluster.md bench-one.md bench-fanout.md apid-demo
