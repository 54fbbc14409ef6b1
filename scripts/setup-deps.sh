#!/usr/bin/env bash
# Installs the host packages the whole Hatchery project needs (Debian 12,
# bookworm) and checks for a Rust toolchain.
#
#   sudo scripts/setup-deps.sh
#
# Idempotent: prints nothing and runs no apt command when everything is
# present; runs `apt-get update` only when something is missing. Packages come
# from the machine's configured apt sources. Recommends are installed as apt
# does by default (that is how the development machines were set up: e.g.
# r-base-core brings r-recommended, so the host's R has Matrix, MASS, ...).
set -euo pipefail

PACKAGES=(
    # rootfs-builder: debootstrap, Debian's signing keys, wget for Release files
    debootstrap debian-archive-keyring wget
    # sandbox: libseccomp (linked by the libseccomp crate), user-namespace id
    # maps, network namespaces, bubblewrap as a reference sandbox in tests
    libseccomp-dev pkg-config uidmap iproute2 bubblewrap
    # the R interpreter on the host (the zygote embeds libR), and CPython's shared
    # library and headers (the zygote embeds libpython3.11 through pyo3)
    r-base-core libpython3-dev python3
    # VM test harness: a cgroup-v2-only guest booted with qemu from Debian's
    # kernel and a busybox initramfs
    qemu-system-x86 linux-image-amd64 busybox-static cpio xz-utils jq
    # tests: a C compiler for the native library the hostile-code tests load
    # into sandboxes
    gcc libc6-dev
    # the cluster's engines: PostgreSQL (system of record) and Redis (the bus); tests
    # and local clusters run private servers (a temporary directory, a loopback port),
    # never the system ones
    postgresql redis-server
    # tests: moto (an AWS emulator for S3) goes into a virtualenv made below
    python3-venv
    # the web console's browser suite: Debian's Chromium, headless, driven over
    # WebDriver by its chromedriver
    chromium chromium-driver
)
MIN_RUST=1.80

say() { echo "setup-deps: $*" >&2; }

if [[ ${EUID:-$(id -u)} -ne 0 ]]; then
    say "must run as root (it installs apt packages): sudo $0"
    exit 1
fi
if ! command -v dpkg-query >/dev/null || ! command -v apt-get >/dev/null; then
    say "this script needs a Debian-based system (dpkg and apt-get)"
    exit 1
fi

missing() {
    local p status
    for p in "${PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${db:Status-Abbrev}' "$p" 2>/dev/null || true)
        [[ $status == ii* ]] || echo "$p"
    done
}

mapfile -t todo < <(missing)
if ((${#todo[@]} > 0)); then
    say "installing: ${todo[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if printf '%s\n' "${todo[@]}" | grep -qx postgresql \
        && [[ ! -e /etc/postgresql-common/createcluster.d/hatchery.conf ]]; then
        # Hatchery starts private PostgreSQL servers of its own: installing the package
        # must not create and start a system-wide cluster on port 5432.
        mkdir -p /etc/postgresql-common/createcluster.d
        echo "create_main_cluster = false" >/etc/postgresql-common/createcluster.d/hatchery.conf
        say "postgresql: no system-wide cluster is created (/etc/postgresql-common/createcluster.d/hatchery.conf)"
    fi
    apt-get update -q
    # Installing a server package must not start a system-wide server (Hatchery starts
    # private ones): invoke-rc.d asks policy-rc.d, which says no for this install only.
    own_policy=
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    apt-get install -y -q "${todo[@]}" || { [[ -n $own_policy ]] && rm -f /usr/sbin/policy-rc.d; exit 1; }
    if [[ -n $own_policy ]]; then
        rm -f /usr/sbin/policy-rc.d
    fi
    mapfile -t still < <(missing)
    if ((${#still[@]} > 0)); then
        say "still not installed after apt-get install: ${still[*]}"
        exit 1
    fi
    say "done"
fi

# moto (an AWS emulator: S3, EC2 Auto Scaling) for the tests, from PyPI into a
# virtualenv of its own; the engine tests find it there (or at $HATCHERY_MOTO_SERVER).
MOTO_VENV=/opt/hatchery/venv
MOTO_VERSION=5.2.5
if [[ ! -x $MOTO_VENV/bin/moto_server ]] \
    || [[ $("$MOTO_VENV/bin/pip" show moto 2>/dev/null | awk '/^Version:/ {print $2}') != "$MOTO_VERSION" ]]; then
    say "installing moto[server]==$MOTO_VERSION into $MOTO_VENV"
    /usr/bin/python3 -m venv "$MOTO_VENV"
    "$MOTO_VENV/bin/pip" install -q "moto[server]==$MOTO_VERSION"
fi

# Rust: sudo's secure_path usually hides ~/.cargo/bin, so also look in the
# invoking user's home.
cargo=$(command -v cargo || true)
if [[ -z $cargo ]]; then
    for home in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-}" 2>/dev/null | cut -d: -f6)"; do
        if [[ -n $home && -x $home/.cargo/bin/cargo ]]; then
            cargo=$home/.cargo/bin/cargo
            break
        fi
    done
fi
if [[ -z $cargo ]]; then
    say "cargo not found: install Rust (stable, >= $MIN_RUST) with rustup:"
    say "  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh"
    exit 1
fi
version=$("$cargo" --version 2>/dev/null | awk '{print $2}')
if [[ -n $version ]] && [[ $(printf '%s\n%s\n' "$MIN_RUST" "$version" | sort -V | head -n1) != "$MIN_RUST" ]]; then
    say "cargo $version is older than $MIN_RUST: run \`rustup update stable\`"
    exit 1
fi
