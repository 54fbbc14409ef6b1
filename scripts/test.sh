#!/usr/bin/env bash
# Runs every test of the workspace, as root, on a fresh Debian 12 machine or a
# development one. Installs what it needs (idempotently), builds the root filesystem
# (cached), then:
#   1. cargo test --workspace — unit tests, the sandbox behaviour and escape suites and
#      the cgroup backend on this host (v1/hybrid on our machines),
#   2. scripts/vm-test.sh — every suite whose code reads or writes cgroups (the pool, the
#      escape and hostile-channel suites, the agent, the API tests that watch cgroups,
#      ...) on the cgroup v2 backend, inside a VM booted with a pure-v2 kernel (skip with
#      HATCHERY_SKIP_VM=1 when iterating locally).
#
# A test that cannot run on this host (a v2-only check on a v1 host, a check that needs a
# privilege the host withholds) records a line in $HATCHERY_SKIP_LOG; the last lines of the
# run list every skip with its count, so a green run says exactly what it did not test.
#
#   sudo scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

start=$(date +%s)
skip_log=$(mktemp -t hatchery-skips.XXXXXX)
export HATCHERY_SKIP_LOG=$skip_log
# The engines setup-deps.sh installed are required: a test that cannot start one fails.
export HATCHERY_REQUIRE_ENGINES=1
# Whatever happens, leave no cgroup behind: reap orphans and remove Hatchery's parent
# cgroup once it is empty (the tests clean up their own; this also covers a run that was
# interrupted half-way).
cleanup() {
    if [[ -x target/debug/sandbox ]]; then
        target/debug/sandbox gc >/dev/null 2>&1 || true
    fi
    rm -f "$skip_log"
}
trap cleanup EXIT
echo "==> root filesystem (cached after the first build)" >&2
cargo build --quiet -p rootfs-builder
target/debug/rootfs-builder build rootfs-builder/manifests/r.toml >/dev/null

echo "==> building the workspace and its tests" >&2
cargo build --quiet --workspace --all-targets

cgroup_version=$(target/debug/sandbox info | grep -o '"v[12]"' | tr -d '"')
echo "==> cargo test --workspace (this host's cgroups: $cgroup_version)" >&2
cargo test --workspace "$@"

if [[ -z ${HATCHERY_SKIP_VM:-} ]]; then
    echo "==> every cgroup-touching suite on cgroup v2, inside a VM (scripts/vm-test.sh)" >&2
    scripts/vm-test.sh
else
    echo "the cgroup v2 VM run (scripts/vm-test.sh): HATCHERY_SKIP_VM is set" >>"$skip_log"
fi

skipped=$(grep -c . "$skip_log" || true)
if ((skipped > 0)); then
    echo "==> $skipped skipped (not tested by this run):" >&2
    sed 's/^/    /' "$skip_log" >&2
fi
echo "==> all tests passed in $(( $(date +%s) - start )) s; $skipped skipped" >&2
