#!/usr/bin/env bash
# nestless's test command: on a fresh Debian 12 machine, as root, installs what the
# tests need (apt packages, vhost-device-vsock), builds the workspace, checks
# formatting and lints, builds the guest images, and runs every test: unit tests,
# root tests with namespaces/bridges/taps, containerd + runc tests, and real-QEMU
# tests, and the shim's containerd suites on containerd 1.6, 1.7 and 2.x side by side. Prints
# each phase's duration and each version's tests passed at the end. CI runs exactly this
# (.ci/run).
#
#   bash tests/run.sh            everything
#   bash tests/run.sh --no-lint  skip fmt/clippy (local iterations)
#   bash tests/run.sh --fuzz     only the fuzz phases (cargo-fuzz, fuzz build, fuzz)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

LINT=1
ONLY_FUZZ=0
for a in "$@"; do
	case $a in
	--no-lint) LINT=0 ;;
	--fuzz) ONLY_FUZZ=1 ;;
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
	if ((${#MATRIX[@]})); then
		echo "=== versions (tests passed / run)"
		printf '  %s\n' "${MATRIX[@]}"
	fi
	[ $rc = 0 ] && echo "=== all tests passed" || echo "=== FAILED (exit $rc)"
}
trap summary EXIT

# install_packages, install_rust, install_vhost_device_vsock (shared with tests/demo.sh).
. tests/lib/setup.sh
# fetch_versions: containerd 1.7 and 2.x, Docker 26 and 28, each in a folder of its own.
. tests/lib/versions.sh
MATRIX=()

build() {
	cargo build --workspace --all-targets
}

lint() {
	cargo fmt --all -- --check
	cargo fmt --manifest-path fuzz/Cargo.toml -- --check
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

# The tests run the binaries the build phase made (rather than each building its own).
export NESTLESS_BIN_DIR=$PWD/target/debug NESTLESS_SHIM_BIN=$PWD/target/debug/containerd-shim-nestless-v2

# The shim's suites that drive containerd: each runs whole on every containerd version
# (containerd-1.6 is Debian 12's own; tests/lib/versions.sh has the others).
SHIM_SUITES=(shim_ctr shim_cri shim_network shim_task_api shim_podnet_hook)

# The Docker suites: each runs whole on Docker 26 (on containerd 1.7) and 28 (on 2.x); the
# Dockerfile's build (a release build inside Docker) with the newest only. That test is
# #[ignore]d (opt-in with --ignored): its release build inside Docker takes over 30 min on
# CI's 2 cores; it is listed here so that the summary shows it as ignored, not forgotten.
DOCKER_SUITES=(docker)
NEWEST_DOCKER_SUITES=(dockerfile)

# Root tests: namespaces, bridges, taps; real QEMU VMs; libvirt domains (agent_libvirt, under
# the libvirtd of the "libvirtd" phase); every tests/tests/*.rs but the matrix's suites.
integration_tests() {
	local args=(--lib --bins) t
	for t in tests/tests/*.rs; do
		t=$(basename "$t" .rs)
		[[ " ${SHIM_SUITES[*]} ${DOCKER_SUITES[*]} ${NEWEST_DOCKER_SUITES[*]} " == *" $t "* ]] ||
			args+=(--test "$t")
	done
	cargo test -p nestless-tests "${args[@]}" -- --test-threads 2
	cargo test -p nestless-tests --doc
}

# Runs cargo test ARGS with NESTLESS_CONTAINERD=$1 set, tees its output, and records one line
# for the phase summary: the version and the tests passed / run.
matrix_run() {
	local dir=$1 label=$2
	shift 2
	local log rc=0
	log=$(mktemp)
	echo "=== $label"
	NESTLESS_CONTAINERD=$dir NESTLESS_DOCKER=${NESTLESS_DOCKER:-} cargo test -p nestless-tests --no-fail-fast "$@" 2>&1 | tee "$log" || rc=$?
	local passed failed
	passed=$(awk '/^test result:/ {s += $4} END {print s + 0}' "$log")
	failed=$(awk '/^test result:/ {s += $6} END {print s + 0}' "$log")
	rm -f "$log"
	MATRIX+=("$(printf '%-44s %3d passed, %d failed' "$label" "$passed" "$failed")")
	return $rc
}

docker_matrix() {
	local v c args=() t rc=0
	for t in "${DOCKER_SUITES[@]}"; do args+=(--test "$t"); done
	for v in docker-26 docker-28; do
		c=$(cat "$NESTLESS_VERSIONS_DIR/$v/CONTAINERD")
		if [ $v = docker-28 ]; then
			for t in "${NEWEST_DOCKER_SUITES[@]}"; do args+=(--test "$t"); done
		fi
		NESTLESS_DOCKER=$NESTLESS_VERSIONS_DIR/$v matrix_run "$NESTLESS_VERSIONS_DIR/$c" \
			"Docker $(cat "$NESTLESS_VERSIONS_DIR/$v/VERSION") ($v, $c)" "${args[@]}" -- --test-threads 2 || rc=1
	done
	return $rc
}

containerd_matrix() {
	local v args=() t rc=0
	for t in "${SHIM_SUITES[@]}"; do args+=(--test "$t"); done
	for v in containerd-1.6 containerd-1.7 containerd-2; do
		matrix_run "$NESTLESS_VERSIONS_DIR/$v" "containerd $(cat "$NESTLESS_VERSIONS_DIR/$v/VERSION") ($v)" \
			"${args[@]}" -- --test-threads 2 || rc=1
	done
	return $rc
}

# Fuzzing (fuzz/README.md). The targets build into fuzz/target (fuzz/ is a workspace of its
# own). For each cargo-fuzz target: first every input that once failed (fuzz/regressions/<target>/)
# is replayed, then the target runs for FUZZ_SECONDS on its seed corpus (fuzz/corpus/<target>,
# read only: new inputs go to fuzz/target/corpus/<target>) with its dictionary
# (fuzz/dicts/<target>.dict). A crash (panic, abort), a hang over 10 s or an out-of-memory fails
# the phase and names the input, kept in fuzz/artifacts/<target>/. cargo-fuzz wants nightly only
# for its sanitizers (-Zsanitizer); the toolchain here is stable, so the targets build with
# --sanitizer none, whose flags are all stable: -Cpasses=sancov-module and the -Cllvm-args
# counters that libFuzzer's coverage feedback reads, plus debug assertions and overflow checks.
# That it really fuzzes is checked, not assumed: libFuzzer must report instrumentation counters
# (none: blind random inputs) and each target must run FUZZ_MIN_EXECS executions.
FUZZ_SECONDS=${NESTLESS_FUZZ_SECONDS:-45}
FUZZ_MIN_EXECS=${NESTLESS_FUZZ_MIN_EXECS:-1000}
FUZZ=(--sanitizer none --debug-assertions --target-dir fuzz/target)
fuzz_build() {
	cargo fuzz build "${FUZZ[@]}"
}
# fuzz_failed TARGET LOG: the end of the log, then each input libFuzzer kept, and how to rerun it.
fuzz_failed() {
	local t=$1 log=$2 f
	tail -n 60 "$log"
	echo "=== FUZZ TARGET $t FAILED (log: $log)" >&2
	for f in $(find "fuzz/artifacts/$t" -type f -newer "$log.start" 2>/dev/null); do
		echo "=== reproducer: $PWD/$f" >&2
		echo "    rerun: cargo fuzz run ${FUZZ[*]} $t $f" >&2
	done
	return 1
}
fuzz() {
	local t log execs counters dirs dict t0 regs
	for t in $(cargo fuzz list); do
		mkdir -p "fuzz/target/corpus/$t" "fuzz/artifacts/$t"
		log="fuzz/target/$t.log"
		touch "$log.start"
		t0=$(date +%s)
		regs=()
		[ -d "fuzz/regressions/$t" ] && mapfile -t regs < <(find "fuzz/regressions/$t" -type f | sort)
		if ((${#regs[@]})); then
			# Files, not directories: libFuzzer runs each once and exits.
			if ! cargo fuzz run "${FUZZ[@]}" "$t" "${regs[@]}" -- -timeout=10 \
				-artifact_prefix="$PWD/fuzz/artifacts/$t/" >"$log" 2>&1; then
				fuzz_failed "$t" "$log"
				return 1
			fi
			echo "fuzz target $t: ${#regs[@]} regression inputs replayed, no crash"
		fi
		dirs=("fuzz/target/corpus/$t" "fuzz/corpus/$t")
		dict=()
		[ -f "fuzz/dicts/$t.dict" ] && dict=(-dict="fuzz/dicts/$t.dict")
		if ! cargo fuzz run "${FUZZ[@]}" "$t" "${dirs[@]}" -- \
			-max_total_time="$FUZZ_SECONDS" -timeout=10 -print_final_stats=1 "${dict[@]}" \
			-artifact_prefix="$PWD/fuzz/artifacts/$t/" >"$log" 2>&1; then
			fuzz_failed "$t" "$log"
			return 1
		fi
		counters=$(sed -n '/inline 8-bit counters/{s/.*(\([0-9]*\) inline 8-bit counters).*/\1/p;q}' "$log")
		execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
		if [ "${counters:-0}" -eq 0 ] || [ "${execs:-0}" -lt "$FUZZ_MIN_EXECS" ]; then
			tail -n 30 "$log"
			echo "=== FUZZ TARGET $t did not really fuzz: ${counters:-no} coverage counters, ${execs:-no} executions" >&2
			return 1
		fi
		PHASES+=("$(printf '  fuzz %-23s %5ds  %s executions, %s counters, corpus %s' "$t" \
			"$(($(date +%s) - t0))" "$execs" "$counters" "$(find "fuzz/target/corpus/$t" -type f | wc -l)")")
		echo "fuzz target $t: ${execs} executions in $(($(date +%s) - t0))s, no crash"
	done
}

if ((ONLY_FUZZ)); then
	phase "apt packages" install_packages
	phase "rust" install_rust
	phase "cargo-fuzz" install_cargo_fuzz
	phase "fuzz build" fuzz_build
	phase "fuzz (${FUZZ_SECONDS}s per target)" fuzz
	exit 0
fi

phase "apt packages" install_packages
phase "rust" install_rust
phase "vhost-device-vsock" install_vhost_device_vsock
phase "libvirtd" start_libvirtd
phase "cargo-fuzz" install_cargo_fuzz
phase "containerd + Docker versions" fetch_versions
phase "build" build
((LINT)) && phase "fmt + clippy" lint
phase "guest images" guest_images
if [ ! -d "$DATA_DIR/traces/google2011" ]; then
	echo "=== NOTE: $DATA_DIR/traces/google2011 is missing: the planner's trace test will not run"
	PHASES+=("$(printf '%-28s %s' "planner trace test" "NOT RUN: no $DATA_DIR")")
fi
phase "unit tests" unit_tests
phase "fuzz build" fuzz_build
phase "fuzz (${FUZZ_SECONDS}s per target)" fuzz
phase "integration + VM tests" integration_tests
phase "containerd matrix" containerd_matrix
phase "Docker matrix" docker_matrix
