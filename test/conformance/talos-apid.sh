#!/usr/bin/env bash
# Hand check: apid (this repository) as the entry in front of nodes that run
# Talos's OWN apid service code, driven by real talosctl binaries.
#
#   TALOS_SRC=/path/to/talos (a v1.13.9 tree whose Go module cache is usable)
#   TALOSCTLS="/path/talosctl-1.13.9 /path/talosctl-1.11.5"   (default below)
#   APID_BIN=/path/apid  (default: built from this repository)
#   sudo -E test/conformance/talos-apid.sh
#
# Topology (loopback only):
#   talosctl --> apid serve (entry) 127.0.90.10:50000, backend: agent socket
#                  | inventory node-a/node-b/node-c (controlplane)
#                  v  forwards with entry-client.crt (os:impersonator, EKU clientAuth)
#   Talos apid (internal/app/apid runService, unchanged)
#                127.0.90.1:50000, 127.0.90.2:50000, 127.0.90.3:50000
#                  | local backend: /system/run/machined/machine.sock
#                  v
#   metadata tap (logs talos-role / proxyfrom) --> apid agent (machined stand-in)
#
# Negative controls: a second entry on 127.0.90.11 WITHOUT clientCert (it
# forwards with its serving certificate, EKU serverAuth only) must be refused
# by the Talos nodes. A combined serverAuth+clientAuth forwarding certificate
# (made with openssl) is refused by apid serve at start-up, so it is shown to
# a Talos node directly with openssl s_client instead.
#
# Needs root: Talos's apid dials machined at the fixed path
# /system/run/machined/machine.sock. Everything the script makes (processes,
# that directory, the scratch files copied into TALOS_SRC, its temp dir) is
# removed on exit. It refuses to run if /system/run/machined already exists.
set -u -o pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)

: "${TALOS_SRC:?set TALOS_SRC to a Talos v1.13.9 source tree}"
TALOSCTLS=${TALOSCTLS:-"/work/conf-work/bin/talosctl /work/conf-work/bin/talosctl-1.11.5"}
machined_dir=/system/run/machined
sock=$machined_dir/machine.sock

if [ "$(id -u)" != 0 ]; then echo "needs root (creates $machined_dir)" >&2; exit 2; fi
if [ -e "$machined_dir" ]; then echo "$machined_dir exists; refusing to touch it" >&2; exit 2; fi
for f in internal/app/apid/zz_handcheck_export.go cmd/apid-handcheck; do
	if [ -e "$TALOS_SRC/$f" ]; then echo "$TALOS_SRC/$f exists; refusing to overwrite it" >&2; exit 2; fi
done

work=$(mktemp -d /tmp/apid-talos-handcheck.XXXXXX)
pids=()
made_system=0; made_system_run=0
[ -e /system ] || made_system=1
[ -e /system/run ] || made_system_run=1

cleanup() {
	local p
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
	for p in "${pids[@]}"; do wait "$p" 2>/dev/null; done
	rm -rf "$machined_dir"
	[ "$made_system_run" = 1 ] && rmdir /system/run 2>/dev/null
	[ "$made_system" = 1 ] && rmdir /system 2>/dev/null
	rm -f "$TALOS_SRC/internal/app/apid/zz_handcheck_export.go"
	rm -rf "$TALOS_SRC/cmd/apid-handcheck"
	if [ "${KEEP_WORK:-0}" = 1 ]; then echo "logs kept in $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bin=$work/bin; pki=$work/pki; logs=$work/logs
mkdir -p "$bin" "$pki" "$logs"

echo "== build"
if [ -n "${APID_BIN:-}" ]; then cp "$APID_BIN" "$bin/apid"; else
	(cd "$repo" && nice -n 10 go build -o "$bin/apid" ./cmd/apid) || exit 1
fi
cp "$here/talos-apid/wrapper.go.txt" "$TALOS_SRC/internal/app/apid/zz_handcheck_export.go"
mkdir -p "$TALOS_SRC/cmd/apid-handcheck"
cp "$here/talos-apid/main.go.txt" "$TALOS_SRC/cmd/apid-handcheck/main.go"
# GOWORK=off: the tree's go.work pulls in tool modules the build does not need.
(cd "$TALOS_SRC" && GOWORK=off GOTOOLCHAIN=local GOFLAGS=-mod=mod nice -n 10 go build -p 1 -o "$bin/talos-apid" ./cmd/apid-handcheck) || exit 1
apid=$bin/apid

echo "== certificates (one CA, apid gen)"
"$apid" gen ca -out "$pki" -name handcheck-ca >/dev/null || exit 1
i=1
for n in node-a node-b node-c; do
	"$apid" gen node -ca-dir "$pki" -out "$pki" -name $n -ip 127.0.90.$i >/dev/null || exit 1
	i=$((i + 1))
done
"$apid" gen node -ca-dir "$pki" -out "$pki" -name entry -ip 127.0.90.10 >/dev/null || exit 1
"$apid" gen node -ca-dir "$pki" -out "$pki" -name entry-noclient -ip 127.0.90.11 >/dev/null || exit 1
"$apid" gen client -ca-dir "$pki" -out "$pki" -name admin -roles os:admin \
	-talosconfig "$work/admin.talosconfig" -endpoints 127.0.90.10 >/dev/null || exit 1
"$apid" gen client -ca-dir "$pki" -out "$pki" -name reader -roles os:reader \
	-talosconfig "$work/reader.talosconfig" -endpoints 127.0.90.10 >/dev/null || exit 1
"$apid" gen node -ca-dir "$pki" -out "$pki" -name entry-combined -ip 127.0.90.12 >/dev/null || exit 1
# Baseline: the same kind of clients straight to Talos node-a, no apid entry.
"$apid" gen client -ca-dir "$pki" -out "$pki" -name admin-direct -roles os:admin \
	-talosconfig "$work/direct-admin.talosconfig" -endpoints 127.0.90.1 >/dev/null || exit 1
"$apid" gen client -ca-dir "$pki" -out "$pki" -name reader-direct -roles os:reader \
	-talosconfig "$work/direct-reader.talosconfig" -endpoints 127.0.90.1 >/dev/null || exit 1
"$apid" gen client -ca-dir "$pki" -out "$pki" -name admin2 -roles os:admin \
	-talosconfig "$work/neg.talosconfig" -endpoints 127.0.90.11 >/dev/null || exit 1
# A forwarding certificate as some older tooling makes it: os:impersonator,
# but extended key usage serverAuth AND clientAuth.
openssl ecparam -name prime256v1 -genkey -noout -out "$pki/entry-combined-client.key" 2>/dev/null || exit 1
openssl req -new -key "$pki/entry-combined-client.key" -subj "/O=os:impersonator/CN=entry-combined" \
	-out "$work/combined.csr" 2>/dev/null || exit 1
printf 'basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=DNS:entry-combined,IP:127.0.90.12\n' >"$work/combined.ext"
openssl x509 -req -in "$work/combined.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
	-days 2 -extfile "$work/combined.ext" -out "$pki/entry-combined-client.crt" 2>/dev/null || exit 1
for c in entry entry-client entry-noclient entry-combined-client; do
	printf '  %-16s ' "$c.crt"
	openssl x509 -in "$pki/$c.crt" -noout -subject -ext extendedKeyUsage 2>/dev/null | tr '\n' ' ' | sed 's/  */ /g'
	echo
done

wait_port() { # host port
	local k
	for k in $(seq 1 100); do
		(exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
		sleep 0.1
	done
	echo "timeout waiting for $1:$2" >&2; return 1
}
wait_sock() {
	local k
	for k in $(seq 1 100); do [ -S "$1" ] && return 0; sleep 0.1; done
	echo "timeout waiting for $1" >&2; return 1
}

echo "== machined stand-in: apid agent behind a metadata tap at $sock"
mkdir -p "$machined_dir"
"$apid" agent -listen "unix://$work/machined-agent.sock" -hostname talos-standin >"$logs/agent.log" 2>&1 &
pids+=($!)
wait_sock "$work/machined-agent.sock" || exit 1
"$bin/talos-apid" -tap-listen "$sock" -tap-upstream "$work/machined-agent.sock" >"$logs/tap.log" 2>&1 &
pids+=($!)
wait_sock "$sock" || exit 1

echo "== Talos apid nodes"
i=1
for n in node-a node-b node-c; do
	# GRPC_GO_LOG_SEVERITY_LEVEL=info: grpc-go logs refused handshakes at info.
	GRPC_GO_LOG_SEVERITY_LEVEL=info "$bin/talos-apid" -listen 127.0.90.$i:50000 -hostname $n -addresses 127.0.90.$i/32 \
		-ca "$pki/ca.crt" -cert "$pki/$n.crt" -key "$pki/$n.key" \
		-client-cert "$pki/$n-client.crt" -client-key "$pki/$n-client.key" >"$logs/$n.log" 2>&1 &
	pids+=($!)
	i=$((i + 1))
done
for i in 1 2 3; do wait_port 127.0.90.$i 50000 || exit 1; done

echo "== entry apid 127.0.90.10:50000 (negative control: 127.0.90.11 without clientCert)"
"$apid" agent -listen "unix://$work/entry-agent.sock" -hostname entry >"$logs/entry-agent.log" 2>&1 &
pids+=($!)
wait_sock "$work/entry-agent.sock" || exit 1
entry_cfg() { # name ip clientcert(yes|no)
	cat <<EOF
listen: "$2:50000"
ca: $pki/ca.crt
cert: $pki/$1.crt
key: $pki/$1.key
EOF
	if [ "$3" != no ]; then
		printf 'clientCert: %s\nclientKey: %s\n' "$pki/$1-client.crt" "$pki/$1-client.key"
	fi
	cat <<EOF
backend: unix://$work/entry-agent.sock
remotePort: 50000
selfNames: [$2, $1]
adminListen: "$2:50001"
logFormat: text
drainDelay: 0s
inventory:
  nodes:
    - {name: node-a, address: 127.0.90.1, identity: node-a, role: controlplane}
    - {name: node-b, address: 127.0.90.2, identity: node-b, role: controlplane}
    - {name: node-c, address: 127.0.90.3, identity: node-c, role: controlplane}
EOF
}
entry_cfg entry 127.0.90.10 yes >"$work/entry.yaml"
entry_cfg entry-noclient 127.0.90.11 no >"$work/entry-noclient.yaml"
entry_cfg entry-combined 127.0.90.12 yes >"$work/entry-combined.yaml"
"$apid" serve -config "$work/entry.yaml" >"$logs/entry.log" 2>&1 &
pids+=($!)
"$apid" serve -config "$work/entry-noclient.yaml" >"$logs/entry-noclient.log" 2>&1 &
pids+=($!)
# apid itself refuses a combined certificate as clientCert at start-up
# (allowCombinedClientCertificates only concerns certificates it accepts).
startup_refusal=$(timeout 10 "$apid" serve -config "$work/entry-combined.yaml" 2>&1 | tail -1)
wait_port 127.0.90.10 50000 || exit 1
wait_port 127.0.90.11 50000 || exit 1

pass=0; fail=0
echo
if grep -q 'is missing the client auth extended key usage' <<<"$startup_refusal"; then
	pass=1; echo "PASS  apid serve refuses a serverAuth+clientAuth clientCert at start-up"
else
	fail=1; echo "FAIL  apid serve started with a serverAuth+clientAuth clientCert"
fi
echo "      | $startup_refusal"
# What a Talos node says to that certificate: present it to node-a directly.
echo | timeout 10 openssl s_client -connect 127.0.90.1:50000 -servername node-a -alpn h2 \
	-CAfile "$pki/ca.crt" -cert "$pki/entry-combined-client.crt" -key "$pki/entry-combined-client.key" \
	>"$work/s_client.out" 2>&1
sleep 0.5
if grep -q 'certificate \\"CN=entry-combined,O=os:impersonator\\" is missing the client auth extended key usage' "$logs/node-a.log"; then
	pass=$((pass + 1)); echo "PASS  Talos node-a refuses the serverAuth+clientAuth certificate (verifyExtKeyUsage)"
else
	fail=$((fail + 1)); echo "FAIL  Talos node-a did not log the EKU refusal for the combined certificate"
fi
grep 'missing the client auth extended key usage' "$logs/node-a.log" | tail -1 | sed 's/^/      | node-a: /'
grep -m1 -E 'alert|error' "$work/s_client.out" | sed 's/^/      | openssl: /'
# check NAME EXPECT(regex on output) EXPECT_RC(0|nonzero) -- command...
check() {
	local name=$1 re=$2 want=$3; shift 3
	local out rc
	out=$(timeout 60 "$@" 2>&1); rc=$?
	local ok=1
	if [ "$want" = 0 ] && [ $rc != 0 ]; then ok=0; fi
	if [ "$want" = nonzero ] && [ $rc = 0 ]; then ok=0; fi
	if ! grep -Eq -- "$re" <<<"$out"; then ok=0; fi
	if [ $ok = 1 ]; then pass=$((pass + 1)); echo "PASS  $name (rc=$rc)"; else fail=$((fail + 1)); echo "FAIL  $name (rc=$rc, wanted /$re/)"; fi
	sed -n '1,12p' <<<"$out" | sed 's/^/      | /'
}
tap_count() { grep -c "$1" "$logs/tap.log"; }
neg() { # what via talosconfig
	echo "-- negative control: entry $1 ($2)"
	# A serverAuth-only certificate fails Go's chain verification (the server
	# asks for clientAuth) before Talos's verifyExtKeyUsage runs.
	local re='ServerHandshake.*(incompatible key usage|missing the client auth extended key usage)' n0
	n0=$(grep -cE "$re" "$logs/node-a.log")
	check "version -n node-a via $2 (must fail)" 'node-a: rpc error' nonzero "$tc" --talosconfig "$3" version -n node-a
	sleep 0.5
	if [ "$(grep -cE "$re" "$logs/node-a.log")" -gt "$n0" ]; then
		pass=$((pass + 1)); echo "PASS  Talos node-a refused the handshake of entry $1"
	else
		fail=$((fail + 1)); echo "FAIL  Talos node-a logged no handshake refusal for entry $1"
	fi
	grep -E "$re" "$logs/node-a.log" | tail -1 | sed 's/^.*failed to create ServerTransport: /      | node-a: /'
}

for tc in $TALOSCTLS; do
	v=$("$tc" version --client --short 2>/dev/null | grep -Eo 'v[0-9]+\.[0-9]+\.[0-9]+' | head -1)
	echo
	echo "== talosctl $v ($tc)"
	A=("$tc" --talosconfig "$work/admin.talosconfig")
	R=("$tc" --talosconfig "$work/reader.talosconfig")
	check "version -n node-a" 'NODE: +node-a' 0 "${A[@]}" version -n node-a
	check "version -n node-a,node-b" 'NODE: +node-b' 0 bash -c '"$@" | grep -E "NODE|Tag"; exit ${PIPESTATUS[0]}' _ "${A[@]}" version -n node-a,node-b
	check "-n @controlplane version" 'NODE: +node-c' 0 bash -c '"$@" | grep -E "NODE|Tag"; exit ${PIPESTATUS[0]}' _ "${A[@]}" -n @controlplane version
	# the whole (finite) dmesg, then its first lines and how many lines each node gave
	check "dmesg -n node-a,node-b | head" 'node-a: [0-9]+ lines, node-b: [0-9]+ lines' 0 bash -c \
		'"$@" >"$0"; rc=$?; head -4 "$0"; echo "node-a: $(grep -c "^node-a:" "$0") lines, node-b: $(grep -c "^node-b:" "$0") lines"; exit $rc' \
		"$work/dmesg.out" "${A[@]}" dmesg -n node-a,node-b
	check "memory -n node-a,node-b" 'node-b' 0 "${A[@]}" memory -n node-a,node-b
	check "service -n node-a" 'node-a +[a-z]' 0 "${A[@]}" service -n node-a
	# The stand-in lists simulated services (cri-sim, ...) but serves logs
	# only under the ids "agent" and "apid-agent" (see the first call).
	svc=$("${A[@]}" service -n node-a 2>/dev/null | awk 'NR>1 {print $2; exit}')
	check "logs -n node-a $svc (listed service; stand-in has no log for it)" 'NotFound' nonzero "${A[@]}" logs -n node-a "$svc"
	check "logs -n node-a apid-agent --tail 3" 'node-a: ' 0 "${A[@]}" logs -n node-a apid-agent --tail 3
	check "read -n node-a /proc/version" 'Linux version' 0 "${A[@]}" read -n node-a /proc/version
	check "reader: reboot -n node-a (refused)" 'PermissionDenied|not authorized|denied' nonzero "${R[@]}" reboot -n node-a --wait=false
	before=$(grep -c 'reboot requested' "$logs/agent.log")
	check "admin: reboot -n node-a --wait=false" '^$' 0 "${A[@]}" reboot -n node-a --wait=false
	after=$(grep -c 'reboot requested' "$logs/agent.log")
	if [ "$after" -gt "$before" ] && grep 'MachineService/Reboot' "$logs/tap.log" | tail -1 | grep -q 'talos-role=\["os:admin"\]'; then
		pass=$((pass + 1)); echo "PASS  admin reboot reached the machined stand-in with talos-role os:admin"
	else
		fail=$((fail + 1)); echo "FAIL  admin reboot: no Reboot with talos-role os:admin at the machined stand-in"
	fi
	grep 'MachineService/Reboot' "$logs/tap.log" | tail -1 | sed 's/^/      | tap: /'
	grep 'reboot requested' "$logs/agent.log" | tail -1 | sed 's/^/      | agent: /'
	sleep 3 # the stand-in simulates a 2 s reboot; the next reboot would be refused meanwhile
	check "admin: reboot -n node-a (default: waits for the reboot)" '.' 0 "${A[@]}" reboot -n node-a
	sleep 3

	echo "-- baseline: straight to Talos node-a (127.0.90.1), Talos forwarding to itself and node-b"
	DA=("$tc" --talosconfig "$work/direct-admin.talosconfig")
	DR=("$tc" --talosconfig "$work/direct-reader.talosconfig")
	check "direct: version -n 127.0.90.1,127.0.90.2" 'NODE: +127.0.90.2' 0 bash -c '"$@" | grep -E "NODE|Tag"; exit ${PIPESTATUS[0]}' _ "${DA[@]}" version -n 127.0.90.1,127.0.90.2
	# Talos's apid does not judge roles itself: it puts them in talos-role and
	# machined refuses. The stand-in does not check talos-role (it relies on
	# an apid in front doing so), so this is NOT refused here; real machined
	# answers PermissionDenied. Recorded, not counted.
	out=$(timeout 30 "${DR[@]}" reboot -n 127.0.90.1 --wait=false 2>&1); rc=$?
	echo "NOTE  direct: reader reboot -n 127.0.90.1 (rc=$rc): Talos apid passed it on; machined would refuse, the stand-in does not"
	[ -n "$out" ] && sed -n '1,3p' <<<"$out" | sed 's/^/      | /'
	grep 'MachineService/Reboot' "$logs/tap.log" | tail -1 | sed 's/^/      | tap: /'
	sleep 3

	neg "without clientCert" 127.0.90.11 "$work/neg.talosconfig"
done

echo
echo "== metadata that reached the machined stand-in (tap, last 8 calls)"
tail -8 "$logs/tap.log" | sed 's/^/  /'
echo "== entry apid warnings/errors"
grep -Ei 'level=(warn|error)|"level":"(WARN|ERROR)"' "$logs"/entry*.log | tail -10 | sed 's/^/  /'
echo "== Talos apid nodes: errors logged"
grep -hiE 'error|missing' "$logs"/node-?.log | tail -10 | sed 's/^/  /'

echo
echo "RESULT: $pass passed, $fail failed"
[ "$fail" = 0 ]
