#!/usr/bin/env bash
# The everyday talosctl commands through `apid demo -nodes 5`, with a
# talosctl built from a Talos tag (run.sh builds v1.13.9's; build v1.11.5's
# the same way from its tag). Each command runs with one node, a list of
# three and the group @controlplane; the results go to OUT, one a line:
# ok|FAIL, the talosctl version, how the nodes were named, the command,
# and the first line of its error. A command marked FOLLOW streams until
# stopped: it passes if it printed something before 5 s and was still
# running. upgrade, shutdown and reboot run last, in that order, without
# --wait (which tracks the node through resources the demo node does not
# serve yet), and then reboot with --wait (talosctl follows each node
# itself, one node call per node: with a list only, as a group cannot be
# followed); apid's disruption budget takes the nodes down one at a time,
# and the next command starts once node-1's apid counts no disruption held
# or active (every node back). upgrade also with --drain=false where
# talosctl has it (draining needs Kubernetes).
#
#   TALOSCTL=/path/to/talosctl test/conformance/talosctl-matrix.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/../.."
: "${TALOSCTL:?TALOSCTL: a talosctl binary}"
out=${1:-test/conformance/talosctl-matrix.txt}
work=$(mktemp -d)
go build -o "$work/apid" ./cmd/apid || exit 1
(cd "$work" && exec ./apid demo -nodes 5 > demo.log 2>&1) &
demo=$!
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do grep -q "nodes up" "$work/demo.log" 2>/dev/null && break; sleep 0.1; done
version=$("$TALOSCTL" version --client --short 2>/dev/null | awk '{for (i = 1; i <= NF; i++) if ($i ~ /^v[0-9]+\./) {print $i; exit}}')
tc=(--talosconfig "$work/apid-demo/talosconfig")
# talosctl v1.13 drains the Kubernetes node before an upgrade's reboot by
# default; older versions have no such flag.
drain=""
# apply-config applies what talosctl gen config writes for the demo.
"$TALOSCTL" gen config apid-demo https://127.0.0.11:6443 --output-types controlplane -o "$work/cp.yaml" >/dev/null 2>&1
"$TALOSCTL" upgrade --help 2>&1 | grep -q -- '--drain ' && drain="--drain=false "

# settle waits (at most 60 s) until node-1's apid counts no disruption
# held or active: every node a command took down is back.
settle() {
	for _ in $(seq 1 120); do
		m=$(curl -s http://127.0.0.11:50001/metrics)
		echo "$m" | grep -q '^apid_disruptions{state="active"} 0$' && echo "$m" | grep -q '^apid_disruptions{state="held"} 0$' && return
		sleep 0.5
	done
}

read -r -d '' commands <<'CMDS'
version
memory
processes
service
logs apid-agent --tail 3
dmesg --tail
ls /proc/self
read /proc/loadavg
cp /proc/self/status -
usage /proc/sys/kernel --depth 1
mounts
netstat
time
stats
containers
config new CONFIG --roles os:reader
get members
get services
get rd
etcd members
etcd status
inspect dependencies
logs kernel --tail 3
apply-config --file CPFILE --mode no-reboot
FOLLOW events --tail 2
FOLLOW logs apid-agent -f --tail 1
health --wait-timeout 30s
upgrade DRAIN--wait=false
shutdown --wait=false
reboot --wait=false
reboot
CMDS
: > "$out"
for nodes in node-1 node-1,node-2,node-3 @controlplane; do
	while IFS= read -r cmd; do
		[ -n "$cmd" ] || continue
		# talosctl follows each node of reboot --wait by name.
		[ "$cmd" = reboot ] && [ "${nodes#@}" != "$nodes" ] && continue
		c=${cmd//CONFIG/$work/cfg-$RANDOM}
		c=${c//DRAIN/$drain}
		c=${c//CPFILE/$work/cp.yaml}
		limit=60
		case $c in FOLLOW\ *) c=${c#FOLLOW }; limit=5 ;; esac
		# shellcheck disable=SC2086
		err=$(timeout "$limit" "$TALOSCTL" "${tc[@]}" -n "$nodes" $c 2>&1 >"$work/stdout")
		status=$?
		result=ok
		if [ "$limit" = 5 ]; then
			# Following: still running at the timeout, having printed.
			{ [ $status -eq 124 ] && [ -s "$work/stdout" ]; } || result=FAIL
			[ $status -eq 124 ] && [ -z "$err" ] && [ ! -s "$work/stdout" ] && err="nothing printed in 5 s"
		else
			[ $status -eq 0 ] || result=FAIL
		fi
		case $c in upgrade* | shutdown* | reboot*) settle ;; esac
		printf '%s\t%s\t-n %s\t%s\t%s\n' "$result" "$version" "$nodes" "${cmd//DRAIN/$drain}" "$(printf '%s' "$err" | head -1)" >> "$out"
	done <<< "$commands"
done
echo "talosctl $version through apid demo: $(grep -c '^ok' "$out") ok, $(grep -c '^FAIL' "$out") failed; see $out"
