#!/usr/bin/env bash
# nestless's demo: on a fresh Debian 12 machine, as root, installs what it needs (apt
# packages, Rust if cargo is missing, vhost-device-vsock), builds nestless, then runs
# nestless-demo: the host agent and a real VM (QEMU; KVM when it works, else TCG) with
# containerd and our shim; a pod created through CRI gets its own host-provided NIC, and the
# host reaches it (ping, HTTP to busybox httpd) with no bridge or NAT in the VM; the pod is
# deleted and its NIC unplugged. Prints each step with its time; cleans up at the end.
#
#   bash tests/demo.sh            release build (the first one takes ~10 min on 2 cores)
#   bash tests/demo.sh --debug    debug build (quicker to build, slower agent and shim)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PROFILE=release
for a in "$@"; do
	case $a in
	--debug) PROFILE=debug ;;
	*) echo "tests/demo.sh: unknown argument $a (see its header)" >&2 && exit 2 ;;
	esac
done
if [ "$(id -u)" != 0 ]; then
	echo "tests/demo.sh: run as root (the demo creates a bridge, taps and a VM)" >&2
	exit 1
fi

export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
# install_packages, install_rust, install_vhost_device_vsock (shared with tests/run.sh).
. tests/lib/setup.sh

timed() { # timed WHAT COMMAND...: runs it, prints how long it took
	local what=$1 t0
	shift
	t0=$(date +%s)
	echo "== $what"
	"$@"
	echo "== $what: done in $(($(date +%s) - t0)) s"
}

timed "apt packages" install_packages
timed "rust" install_rust
timed "vhost-device-vsock" install_vhost_device_vsock
FLAGS=()
[ "$PROFILE" = release ] && FLAGS=(--release)
timed "build ($PROFILE)" cargo build "${FLAGS[@]}" -p nestless-netagent -p containerd-shim-nestless-v2 \
	-p nestless-tests --bins
echo
exec "${CARGO_TARGET_DIR:-target}/$PROFILE/nestless-demo"
