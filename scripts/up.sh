#!/usr/bin/env bash
# Sets everything up on a fresh Debian 12 machine and runs R code in a sandbox.
#
#   sudo scripts/up.sh                    # R example
#   sudo scripts/up.sh -- Rscript -e 'summary(cars)'   # your own command
#
# Idempotent: host packages are installed only when missing, the root filesystem is
# built once and then served from its cache, cargo rebuilds only what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup-deps.sh
export PATH="$HOME/.cargo/bin:$PATH"

echo "==> building (release)" >&2
cargo build --release --quiet -p hatchery-sandbox -p rootfs-builder

echo "==> root filesystem (cached after the first build)" >&2
target/release/rootfs-builder build rootfs-builder/manifests/r.toml >/dev/null

if [[ ${1:-} == "--" ]]; then
    shift
    exec target/release/sandbox run --memory 512M --cpus 1 --timeout 60s -- "$@"
fi

echo "==> running R in a sandbox: target/release/sandbox run --memory 512M --cpus 1 --timeout 60s -- Rscript -e ..." >&2
target/release/sandbox run --memory 512M --cpus 1 --timeout 60s --report /tmp/hatchery-report.json -- \
    Rscript -e 'fit <- lm(dist ~ speed, data = cars); print(summary(fit)$coefficients); cat("running as uid", Sys.getuid(), "on host", Sys.info()[["nodename"]], "\n")'
echo "==> report of that run (/tmp/hatchery-report.json):" >&2
cat /tmp/hatchery-report.json >&2
echo >&2
echo "==> try: sudo target/release/sandbox run --memory 256M --cpus 0.5 --timeout 10s -- Rscript -e 'sum(1:10)'" >&2
