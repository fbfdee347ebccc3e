#!/usr/bin/env bash
# The shim side by side on every containerd version, in one run (docs/benchmarks.md):
# RunPodSandbox p50 and shim RSS per pod, containerd-shim-nestless-v2 against each
# version's own containerd-shim-runc-v2 (tests/benches/shim_versions.rs). As root.
#
#   bash tests/containerd/bench-versions.sh     # NESTLESS_BENCH_PODS=10 NESTLESS_BENCH_RSS_PODS=3
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. tests/lib/versions.sh
fetch_versions >/dev/null
# The agent, nestless-cni and the CRI client as the tests run them (the same for both
# shims); the shim under test is the release build the bench makes.
cargo build -q -p nestless-netagent -p containerd-shim-nestless-v2 -p nestless-tests --bins
export NESTLESS_BIN_DIR=${NESTLESS_BIN_DIR:-$PWD/target/debug}
cargo bench -q -p nestless-tests --bench shim_versions --no-run
echo "| containerd | RunPodSandbox p50, nestless | p50, runc-v2 | ratio | shim RSS per pod, nestless | runc-v2 | ratio |"
echo "|---|---|---|---|---|---|---|"
for v in containerd-1.6 containerd-1.7 containerd-2; do
	NESTLESS_CONTAINERD=$NESTLESS_VERSIONS_DIR/$v cargo bench -q -p nestless-tests --bench shim_versions | grep '^|'
done
