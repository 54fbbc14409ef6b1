#!/usr/bin/env bash
# Run Hatchery's cgroup-dependent tests inside a qemu VM whose kernel has a pure cgroup v2
# hierarchy (cgroup_no_v1=all), so that the v2 backend is tested on hosts that are hybrid.
#
# Usage: scripts/vm-test.sh [TARGET [FILTER...]]...
#   Each argument is one test binary: "PACKAGE:TARGET" optionally followed by libtest
#   filters separated by spaces (a test runs when its name contains any of them; libtest's
#   '--skip NAME' excludes one), e.g.
#   'hatchery-tests:cgroups' (the integration test target tests/tests/cgroups.rs) or
#   'hatchery-sandbox:lib cgroup' (the library's unit tests whose names contain "cgroup").
#   "lib" stands for the package's library target.
#   Default: every suite whose code path reads or writes cgroups, i.e. what differs between
#   a v1 and a v2 host: the cgroup backend, the runtime's behaviour and escape suites, the
#   warm pool, the hostile-channel and Python suites, the agent (limits written at claim, usage
#   read while running), the netns provider (each host a cgroup of its group's shape), and
#   the API tests that watch sandboxes through their cgroups
#   (a displaced run dead before its successor, the storm cap, the monitor's usage).
#   Suites that never reach a cgroup (the R engine, the API's routing, policy, storage and
#   its store-level hostile tests) run on the host only: under software emulation every
#   minute of the VM is five of the host's.
#
# All binaries run in one VM, as root, each in its package directory (as cargo runs
# them), with HATCHERY_REQUIRE_CGROUP_V2=1 and HATCHERY_REQUIRE_FULL_ROOT=1 (a test that
# would skip on the development host must run here). The guest sees the host's /
# read-only with a tmpfs overlay (the sandboxes' root filesystems straight over 9p, so
# that their overlays do not stack on the guest's), and fresh /tmp, /run and /dev; it has
# no network, only a non-loopback address on lo for the tests that look for one.
#
# Environment:
#   VM_TEST_TIMEOUT   time limit of the VM, boot included (default 1800s)
#   VM_TEST_MEMORY    guest memory in MiB (default 3072)
#   VM_TEST_CPUS      guest CPUs (default 2)
#   VM_TEST_ARGS      extra arguments for every test binary (e.g. --test-threads=1)
#   VM_TEST_LOG       where the guest console log is kept (default target/vm-test/console.log)
#   VM_TEST_NO_DEPS=1 do not install packages
#   HATCHERY_VM_ACCEL auto (default: kvm, else tcg), kvm or tcg
#
# Exit status: 0 when every test binary passed (or was skipped as not yet written),
# 1 when a test failed in the guest, 124 when the VM hit its time limit, 125 when the VM
# could not run the tests, 2 on a usage or build error.
set -euo pipefail

cd "$(dirname "$0")/.."
script_start=$(date +%s.%N)

say() { printf 'vm-test: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }
elapsed() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }

# --- dependencies (idempotent) ---------------------------------------------------------
install_deps() {
    local wanted=(qemu-system-x86 linux-image-amd64 busybox-static xz-utils jq)
    local missing=() pkg
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    local sudo=()
    [ "$(id -u)" -eq 0 ] || sudo=(sudo)
    say "installing ${missing[*]}"
    "${sudo[@]}" apt-get update -qq
    # linux-image-amd64 only puts a kernel in /boot and modules in /lib/modules for the
    # guest; the host keeps running its own kernel.
    DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null
}
if [ "${VM_TEST_NO_DEPS:-}" != 1 ]; then
    install_deps
fi
command -v cargo >/dev/null || die "cargo is not installed"

# --- build -----------------------------------------------------------------------------
out_dir=target/vm-test
mkdir -p "$out_dir"
log=${VM_TEST_LOG:-$out_dir/console.log}

say "building hatchery-vm and the workspace's tests"
cargo build --quiet -p hatchery-scheduler --bin hatchery-vm || die "cannot build hatchery-vm"
vm=target/debug/hatchery-vm
cargo test --workspace --no-run --message-format=json-render-diagnostics >"$out_dir/artifacts.json" \
    || die "the workspace's tests do not build"
cargo metadata --no-deps --format-version 1 >"$out_dir/metadata.json"

# TSV of every test executable: package, target name, kinds, executable, package dir.
artifacts=$(jq -r --slurpfile meta "$out_dir/metadata.json" '
    ($meta[0].packages | map({key: .manifest_path, value: .name}) | from_entries) as $names
    | select(.reason == "compiler-artifact" and .profile.test and .executable != null)
    | [$names[.manifest_path], .target.name, (.target.kind | join(",")), .executable,
       (.manifest_path | rtrimstr("/Cargo.toml"))]
    | @tsv' "$out_dir/artifacts.json")

# --- select the test binaries ------------------------------------------------------------
if (($# == 0)); then
    # Tests whose code never reaches a cgroup are skipped here (they run on the host):
    # the channel's floods and byte-exactness (the runtime's reader), forged artifacts (the
    # artifact directory), Python's value and error conversion and its copy of the channel
    # suite (the R one covers the v2 kills), the escape suite through the Python pool (the
    # same pooled sandbox as the R pool's, which runs it here), and the agent's count of
    # store transactions, and netns hosts reaching engines over the bridge (networking).
    set -- 'hatchery-tests:cgroups' 'hatchery-sandbox:lib' 'hatchery-tests:behaviour' \
        'hatchery-tests:escape' \
        'hatchery-tests:pool --skip the_escape_suite_passes_through_the_python_pool' \
        'hatchery-tests:channel --skip output_floods_end_output_limit_in_bounded_events --skip progress_floods_are_coalesced_and_counted --skip chatty_output_is_merged_at_a_bounded_rate --skip output_bytes_are_carried_exactly --skip forged_artifacts_beyond_what_was_asked_end_the_run' \
        'hatchery-tests:python --skip values_become_json_and_frames_become_records --skip errors_are_data_with_a_traceback_of_the_users_code_only --skip the_channel_is_as_hostile_from_python_as_from_r' \
        'hatchery-scheduler:agent --skip output_is_stored_in_few_transactions' \
        'hatchery-scheduler:netns_provider --skip hosts_reach_the_engines_started_on_the_bridge' \
        'hatchery-api:e2e a_displaced_execution_is_dead_before_its_successor_runs a_storm_of_simultaneous_submissions_never_runs_more_than_two all_events_monitor_and_admin_views'
fi
extra_args=${VM_TEST_ARGS:-}
# A non-loopback address for the tests that need the host's own address (no network).
guest_script='failed=0
hostname hatchery-guest
ip addr add 10.0.2.15/32 dev lo 2>/dev/null
ip link set lo up 2>/dev/null
# netns hosts: a bridge and veth pairs (modules of the guest kernel, from the shared /).
modprobe -q bridge 2>/dev/null
modprobe -q veth 2>/dev/null'
selected=0
for spec in "$@"; do
    target_spec=${spec%% *}
    filter=
    [ "$target_spec" = "$spec" ] || filter=${spec#* }
    package=${target_spec%%:*}
    target=${target_spec#*:}
    [ -n "$package" ] && [ -n "$target" ] && [ "$package" != "$target_spec" ] \
        || die "bad test binary '$spec' (want PACKAGE:TARGET [FILTER])"
    match=$(awk -F'\t' -v p="$package" -v t="$target" '
        $1 == p && ($2 == t || (t == "lib" && $3 ~ /(^|,)(lib|rlib|cdylib|staticlib|proc-macro)(,|$)/)) { print; exit }
    ' <<<"$artifacts")
    if [ -z "$match" ]; then
        die "package $package has no test target '$target'"
    fi
    IFS=$'\t' read -r _ _ _ exe dir <<<"$match"
    label="$target_spec${filter:+ [$filter]}"
    # shellcheck disable=SC2086 # filter and extra_args are split on purpose
    run=$(printf '%q ' env "CARGO_MANIFEST_DIR=$dir" "$exe" $filter $extra_args)
    guest_script+="
echo $(printf '%q' "vm-test: ==== $label ($exe)")
t0=\$(date +%s)
cd $(printf '%q' "$dir") && $run
rc=\$?
echo $(printf '%q' "vm-test: ==== $label: exit") \$rc in \$((\$(date +%s) - t0)) s
[ \$rc -eq 0 ] || failed=\$((failed + 1))"
    selected=$((selected + 1))
done
guest_script+='
exit $((failed > 0 ? 1 : 0))'

vm_args=(--timeout "${VM_TEST_TIMEOUT:-1800s}" --memory "${VM_TEST_MEMORY:-3072}"
    --cpus "${VM_TEST_CPUS:-2}" --log "$log")
rootfs_store=/var/lib/hatchery/rootfs
if [ -d "$rootfs_store" ]; then
    vm_args+=(--share "$rootfs_store")
fi

# --- run ---------------------------------------------------------------------------------
vm_start=$(date +%s.%N)
set +e
if ((selected == 0)); then
    say "no test binary to run yet; checking that the VM boots with pure cgroup v2 instead"
    "$vm" check "${vm_args[@]}"
else
    say "running $selected test binaries in the VM"
    "$vm" run "${vm_args[@]}" --cwd "$PWD" \
        --env HATCHERY_REQUIRE_CGROUP_V2=1 --env HATCHERY_REQUIRE_FULL_ROOT=1 \
        --env RUST_BACKTRACE=1 \
        -- /bin/bash -c "$guest_script"
fi
status=$?
set -e
say "the VM run took $(elapsed "$vm_start") s (boot included); the whole script $(elapsed "$script_start") s"
# A guest whose vCPU the host did not run for seconds (a loaded host under software
# emulation) says so in its kernel log; timing assertions that failed in such a run are
# the host's doing as much as ours, so say it next to the verdict.
stalls=$(grep -cE 'soft lockup|rcu_sched self-detected stall|rcu: INFO: rcu_sched detected stalls' "$log" 2>/dev/null || true)
if ((${stalls:-0} > 0)); then
    say "the guest kernel reported $stalls CPU stall(s) (the host did not run a vCPU for seconds):"
    grep -E 'soft lockup|self-detected stall|detected stalls' "$log" | head -5 | sed 's/^/vm-test:   /' >&2
fi

case $status in
0) say "PASS (guest console log: $log)" ;;
124) say "FAILED: the VM hit its time limit (${VM_TEST_TIMEOUT:-1800s}); guest console log: $log" ;;
125) say "FAILED: the VM could not run the tests; guest console log: $log" ;;
*)
    say "FAILED: a test failed inside the VM; guest console log: $log"
    status=1
    ;;
esac
exit "$status"
