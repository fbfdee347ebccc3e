#!/bin/bash
# Print the memory of containerd-shim-nestless-v2 against Debian's containerd-shim-runc-v2,
# each serving the same busybox pod (a sandbox container and an app container grouped by
# io.kubernetes.cri.sandbox-id), under a private containerd. A benchmark: it prints
# figures, it does not pass or fail on them.
#
#   tests/containerd/measure-shim-rss.sh [SHIM_BINARY]
#
# DETAIL=1 also prints the resident memory of each mapping; SETTLE=N waits N seconds
# (default 12) before measuring. SHIM_BINARY defaults to target/release/containerd-shim-nestless-v2 (under
# $CARGO_TARGET_DIR if set). Needs root, containerd, ctr, runc, containerd-shim-runc-v2.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
SHIM=${1:-${CARGO_TARGET_DIR:-$ROOT/target}/release/containerd-shim-nestless-v2}
[ -x "$SHIM" ] || {
	echo "no shim binary at $SHIM (cargo build --release -p containerd-shim-nestless-v2)" >&2
	exit 1
}
for t in containerd ctr runc containerd-shim-runc-v2; do
	command -v "$t" >/dev/null || {
		echo "$t is missing (apt-get install -y containerd runc)" >&2
		exit 1
	}
done

D=$(mktemp -d /tmp/nl-rss-XXXXXX)
SOCK=$D/containerd.sock
NS=rss
CTD=
cleanup() {
	set +e
	for id in nl-sb nl-app rc-sb rc-app; do
		ctr --address "$SOCK" -n $NS task kill -s SIGKILL $id >/dev/null 2>&1
	done
	sleep 1
	for id in nl-sb nl-app rc-sb rc-app; do
		ctr --address "$SOCK" -n $NS task delete $id >/dev/null 2>&1
		ctr --address "$SOCK" -n $NS container rm $id >/dev/null 2>&1
	done
	[ -n "$CTD" ] && kill "$CTD" && wait "$CTD" 2>/dev/null
	grep -o " $D[^ ]*" /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l 2>/dev/null
	rm -rf "$D"
}
trap cleanup EXIT

cat >"$D/shim.toml" <<EOF
[network]
mode = "none"
[runc]
root = "$D/runc"
EOF
cat >"$D/config.toml" <<EOF
version = 2
root = "$D/root"
state = "$D/state"
[grpc]
  address = "$SOCK"
[ttrpc]
  address = "$SOCK.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$D/opt"
EOF
PATH="$(dirname "$SHIM"):$PATH" containerd --config "$D/config.toml" >"$D/containerd.log" 2>&1 &
CTD=$!
for _ in $(seq 100); do
	ctr --address "$SOCK" version >/dev/null 2>&1 && break
	sleep 0.1
done
ctr --address "$SOCK" -n $NS images import "$("$ROOT/tests/vm/build-busybox-image.sh")" >/dev/null
IMG=localhost/nestless/busybox:test

run_pod() { # run_pod PREFIX RUNTIME [RUNTIME ARGS...]
	local p=$1
	shift
	ctr --address "$SOCK" -n $NS run -d "$@" --annotation io.kubernetes.cri.container-type=sandbox \
		--annotation io.kubernetes.cri.sandbox-id=$p-sb $IMG $p-sb sleep 100000
	ctr --address "$SOCK" -n $NS run -d "$@" --annotation io.kubernetes.cri.container-type=container \
		--annotation io.kubernetes.cri.sandbox-id=$p-sb $IMG $p-app sleep 100000
}
run_pod nl --runtime io.containerd.nestless.v2 --runtime-config-path "$D/shim.toml"
run_pod rc --runtime io.containerd.runc.v2
# Let idle helper threads (tokio's blocking pool keeps them 10 s) go.
sleep ${SETTLE:-12}
[ -n "${HOLD:-}" ] && { echo "holding: containerd at $SOCK; kill -USR1 $$ to continue" >&2; trap 'HOLD=' USR1; while [ -n "$HOLD" ]; do sleep 1; done; }

shim_pids() { # shim_pids BINARY_NAME: serving shims of this containerd (not start/delete)
	local p c
	for p in /proc/[0-9]*; do
		{ c=$(tr '\0' ' ' <"$p/cmdline"); } 2>/dev/null || continue
		case $c in
		*"$1 "*"-address $SOCK "*) ;;
		*) continue ;;
		esac
		case $c in
		*" start " | *" delete ") continue ;;
		esac
		echo "${p#/proc/}"
	done
	return 0
}
report() { # report LABEL BINARY_NAME
	local pids pid
	pids=$(shim_pids "$2")
	echo "$1: $(echo "$pids" | wc -w) shim process(es) for the pod"
	for pid in $pids; do
		printf '  pid %-7s RSS %6s kB (anon %5s, file %5s)  PSS %6s kB  threads %s\n' "$pid" \
			"$(awk '/^VmRSS/ {print $2}' /proc/$pid/status)" \
			"$(awk '/^RssAnon/ {print $2}' /proc/$pid/status)" \
			"$(awk '/^RssFile/ {print $2}' /proc/$pid/status)" \
			"$(awk '/^Pss:/ {print $2}' /proc/$pid/smaps_rollup)" \
			"$(awk '/^Threads/ {print $2}' /proc/$pid/status)"
		if [ -n "${DETAIL:-}" ]; then # resident memory per mapping
			awk '/^[0-9a-f]+-[0-9a-f]+ / { name = $6 ? $6 : "[anon]" }
				/^Rss:/ { rss[name] += $2 }
				END { for (n in rss) if (rss[n] > 0) printf "    %6d kB %s\n", rss[n], n }' \
				/proc/$pid/smaps | sort -rn | head -8
		fi
	done
}
echo "binary: $SHIM ($(stat -c %s "$SHIM") bytes)"
report "containerd-shim-nestless-v2" containerd-shim-nestless-v2
report "containerd-shim-runc-v2    " containerd-shim-runc-v2
