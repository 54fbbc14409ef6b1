#!/usr/bin/env bash
# Runs every test of the workspace, as root, on a fresh Debian 12 machine or a
# development one. Installs what it needs (idempotently), builds the root filesystem
# (cached), then:
#   1. cargo test --workspace — unit tests, the sandbox behaviour and escape suites and
#      the cgroup backend on this host (v1/hybrid on our machines),
#   2. scripts/vm-test.sh — the cgroup v2 backend, inside a VM booted with a pure-v2
#      kernel (skip with HATCHERY_SKIP_VM=1 when iterating locally).
#
#   sudo scripts/test.sh [extra cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

start=$(date +%s)
# Whatever happens, leave no cgroup behind: reap orphans and remove Hatchery's parent
# cgroup once it is empty (the tests clean up their own; this also covers a run that was
# interrupted half-way).
cleanup() {
    if [[ -x target/debug/sandbox ]]; then
        target/debug/sandbox gc >/dev/null 2>&1 || true
    fi
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
if [[ $cgroup_version == v1 ]]; then
    echo "note: on this v1/hybrid host the cgroup-v2-only tests in tests/tests/cgroups.rs" \
        "(clone3 CLONE_INTO_CGROUP, born frozen) were skipped; the VM run below runs them" >&2
fi

if [[ -z ${HATCHERY_SKIP_VM:-} && -x scripts/vm-test.sh ]]; then
    echo "==> cgroup v2 backend inside a VM (scripts/vm-test.sh)" >&2
    scripts/vm-test.sh
fi
echo "==> all tests passed in $(( $(date +%s) - start )) s" >&2
