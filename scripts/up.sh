#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine and starts the whole platform on this
# machine: `hatchery up` (API on 127.0.0.1:8080, scheduler, one agent with warm R and
# bash pools; embedded store, bus and encrypted object store under
# /var/lib/hatchery/data). It prints tokens and a curl example; Ctrl-C stops it.
#
#   sudo scripts/up.sh [hatchery up options, e.g. --config hatchery.toml]
#
# Idempotent: host packages are installed only when missing, the root filesystem is
# built once and then served from its cache, cargo rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "==> building (release)" >&2
cargo build --release --quiet -p hatchery-sandbox -p hatchery-api -p rootfs-builder

echo "==> root filesystem (cached after the first build)" >&2
target/release/rootfs-builder build rootfs-builder/manifests/r.toml >/dev/null

echo "==> starting the platform: target/release/hatchery up $*" >&2
exec target/release/hatchery up "$@"
