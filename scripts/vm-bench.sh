#!/usr/bin/env bash
# Run the warm-pool benchmark inside the qemu VM whose kernel has a pure cgroup v2
# hierarchy (cgroup_no_v1=all), next to the same bench on this host.
#
# Usage: scripts/vm-bench.sh [BENCH OPTIONS...]
#   The options are the warm-pool bench's (`cargo bench -p hatchery-sandbox --bench
#   warm_pool -- --help`). Default: a shorter run than on the host (software emulation
#   makes every figure several times slower; the ratios between configurations measured
#   side by side are what compare): --warm 8 --cold 1 --seconds 6 --slice 2
#   --burst-rounds 2 --rcu 1 --wake 1.
#
# The guest sees the host's / read-only (as scripts/vm-test.sh sets it up) and runs the
# release build of the bench, `sandbox` and `hatchery-zygote` made here first.
#
# Environment: VM_TEST_TIMEOUT (default 1800s), VM_TEST_MEMORY (default 3072 MiB),
# VM_TEST_CPUS (default 2), VM_TEST_LOG (default target/vm-test/bench-console.log),
# HATCHERY_VM_ACCEL (auto, kvm or tcg). The packages the VM needs are installed by
# scripts/vm-test.sh (run it once first).
set -euo pipefail

cd "$(dirname "$0")/.."
say() { printf 'vm-bench: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

(($# > 0)) || set -- --warm 8 --cold 1 --seconds 6 --slice 2 --burst-rounds 2 --rcu 1 --wake 1

out_dir=target/vm-test
mkdir -p "$out_dir"
log=${VM_TEST_LOG:-$out_dir/bench-console.log}

say "building hatchery-vm, the sandbox binaries and the bench (release)"
cargo build --quiet -p hatchery-scheduler --bin hatchery-vm || die "cannot build hatchery-vm"
cargo build --quiet --release -p hatchery-sandbox --bins || die "cannot build the sandbox binaries"
bench=$(cargo bench -p hatchery-sandbox --bench warm_pool --no-run \
    --message-format=json-render-diagnostics 2>/dev/null \
    | jq -r 'select(.reason == "compiler-artifact" and .target.name == "warm_pool" and .executable != null) | .executable' \
    | tail -n 1)
[ -x "$bench" ] || die "cannot build the warm_pool bench"

vm_args=(--timeout "${VM_TEST_TIMEOUT:-1800s}" --memory "${VM_TEST_MEMORY:-3072}"
    --cpus "${VM_TEST_CPUS:-2}" --log "$log")
if [ -d /var/lib/hatchery/rootfs ]; then
    vm_args+=(--share /var/lib/hatchery/rootfs)
fi
run=$(printf '%q ' "$bench" "$@")
say "running the bench in the VM: $run"
exec target/debug/hatchery-vm run "${vm_args[@]}" --cwd "$PWD/sandbox" \
    -- /bin/bash -c "ip link set lo up; $run"
