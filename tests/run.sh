#!/usr/bin/env bash
# nestless's test command: on a fresh Debian 12 machine, as root, installs what the
# tests need (apt packages, vhost-device-vsock), builds the workspace, checks
# formatting and lints, builds the guest images, and runs every test: unit tests,
# root tests with namespaces/bridges/taps, containerd + runc tests, and real-QEMU
# tests. Prints each phase's duration at the end. CI runs exactly this (.ci/run).
#
#   bash tests/run.sh            everything
#   bash tests/run.sh --no-lint  skip fmt/clippy (local iterations)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LINT=1
for a in "$@"; do
	case $a in
	--no-lint) LINT=0 ;;
	*) echo "tests/run.sh: unknown argument $a" >&2 && exit 2 ;;
	esac
done

if [ "$(id -u)" != 0 ]; then
	echo "tests/run.sh: run as root (the tests create namespaces, bridges, taps and VMs)" >&2
	exit 1
fi

export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
PHASES=()
T_ALL=$(date +%s)
phase() {
	local name=$1
	shift
	local t0=$(date +%s)
	echo
	echo "=== phase: $name"
	"$@"
	local dt=$(($(date +%s) - t0))
	PHASES+=("$(printf '%-28s %5ds' "$name" "$dt")")
	echo "=== phase: $name done in ${dt}s"
}
summary() {
	local rc=$?
	echo
	echo "=== phase durations"
	printf '  %s\n' "${PHASES[@]}"
	printf '  %-28s %5ds\n' "total" "$(($(date +%s) - T_ALL))"
	[ $rc = 0 ] && echo "=== all tests passed" || echo "=== FAILED (exit $rc)"
}
trap summary EXIT

# install_packages, install_rust, install_vhost_device_vsock (shared with tests/demo.sh).
. tests/lib/setup.sh

build() {
	cargo build --workspace --all-targets
}

lint() {
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
}

guest_images() {
	bash tests/vm/build-guest.sh --variant minimal --exec-bin target/debug/nestless-vm-exec
	bash tests/vm/build-guest.sh --variant full --exec-bin target/debug/nestless-vm-exec
}

# Every crate but the test crate: unit tests, the planner's tests, doc tests; with the
# real Google 2011 trace when it is there. The data lives beside the repository
# (../shared/data, or NESTLESS_DATA_DIR), never in it; its test is opt-in (#[ignore]).
DATA_DIR=${NESTLESS_DATA_DIR:-$PWD/../shared/data}
unit_tests() {
	if [ -d "$DATA_DIR/traces/google2011" ]; then
		NESTLESS_DATA_DIR=$DATA_DIR cargo test --workspace --exclude nestless-tests -- --include-ignored
	else
		cargo test --workspace --exclude nestless-tests
	fi
}

# Root tests: namespaces, bridges, taps; containerd + runc (ctr and CRI); real QEMU VMs.
# The tests run the binaries the build phase made (rather than each building its own).
integration_tests() {
	NESTLESS_BIN_DIR=$PWD/target/debug NESTLESS_SHIM_BIN=$PWD/target/debug/containerd-shim-nestless-v2 \
		cargo test -p nestless-tests -- --test-threads 2
}

phase "apt packages" install_packages
phase "rust" install_rust
phase "vhost-device-vsock" install_vhost_device_vsock
phase "build" build
((LINT)) && phase "fmt + clippy" lint
phase "guest images" guest_images
if [ ! -d "$DATA_DIR/traces/google2011" ]; then
	echo "=== NOTE: $DATA_DIR/traces/google2011 is missing: the planner's trace test will not run"
	PHASES+=("$(printf '%-28s %s' "planner trace test" "NOT RUN: no $DATA_DIR")")
fi
phase "unit tests" unit_tests
phase "integration + VM tests" integration_tests
