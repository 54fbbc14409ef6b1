//! The escape suite: one test per classic sandbox escape, each run by the in-sandbox
//! `probe` (bind-mounted at /usr/local/bin/probe) under `sandbox run`, asserting the exact
//! line the probe prints and, where the attack aims at the host, that the host is
//! unaffected. Every test exists twice: `plain::` (root-owned namespaces) and `userns::`
//! (`sandbox run --userns`).
//!
//! A failing test here is a security finding: never weaken an expectation to make it
//! pass; fix the sandbox.
//!
//! Needs root, the runtime binary (`cargo build -p hatchery-sandbox`, same profile; or
//! `HATCHERY_SANDBOX_BIN`) and the R root filesystem (`HATCHERY_ROOTFS`, default
//! /var/lib/hatchery/rootfs/r). Run: `cargo test -p hatchery-tests --test escape`.

use std::io::ErrorKind;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use hatchery_tests::{
    host_hostname, host_ipv4, host_processes_with, unique_token, Canary, HostMarker, Run, Sandbox,
};

/// Where the probe appears inside the sandbox.
const PROBE: &str = "/usr/local/bin/probe";
/// The probe binary built by this package.
const PROBE_HOST: &str = env!("CARGO_BIN_EXE_probe");
/// Set on the `sandbox` process; must never reach the command.
const SECRET_VAR: &str = "HATCHERY_ESCAPE_SECRET";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Namespaces created by host root (no user namespace).
    Plain,
    /// `--userns`: root inside maps to an unprivileged host range.
    Userns,
}

/// The sandbox every attempt runs in: probe bound in, bounded in time, processes and
/// memory.
fn sandbox(mode: Mode) -> Sandbox {
    unbounded(mode).timeout("20s").pids(64).memory("256M")
}

/// [`sandbox`] without time, pids and memory limits (for tests that set their own).
fn unbounded(mode: Mode) -> Sandbox {
    Sandbox::new()
        .userns(mode == Mode::Userns)
        .ro_bind(Path::new(PROBE_HOST), PROBE)
        .hostname("hatchery-escape")
        .host_env(SECRET_VAR, "host-secret")
}

fn run_probe(sb: Sandbox, attempt: &str, args: &[&str]) -> Run {
    let mut cmd = vec![PROBE, attempt];
    cmd.extend_from_slice(args);
    sb.run(cmd)
}

/// Asserts the probe ran to completion, printed exactly `probe <attempt>: <expected>` and
/// nothing of the run is left on the host.
fn assert_line(run: &Run, attempt: &str, expected: &str) {
    let want = format!("probe {attempt}: {expected}");
    assert_eq!(
        run.stdout.trim_end_matches('\n'),
        want,
        "probe {attempt}: unexpected outcome\n{}",
        run.describe()
    );
    let code = if expected.starts_with("ESCAPED") {
        3
    } else {
        0
    };
    run.assert_status("exited", code);
    run.assert_cleaned_up();
}

/// Like [`assert_line`] for attempts whose exact errno depends on the host kernel; every
/// accepted outcome is a refusal.
fn assert_line_one_of(run: &Run, attempt: &str, accepted: &[String]) {
    let got = run.stdout.trim_end_matches('\n');
    assert!(
        accepted
            .iter()
            .any(|e| got == format!("probe {attempt}: {e}")),
        "probe {attempt}: outcome not among {accepted:?}\n{}",
        run.describe()
    );
    run.assert_status("exited", 0);
    run.assert_cleaned_up();
}

/// Runs `attempt` in the default sandbox and expects `blocked <expected>`.
fn blocked(mode: Mode, attempt: &str, args: &[&str], expected: &str) -> Run {
    let run = run_probe(sandbox(mode), attempt, args);
    assert_line(&run, attempt, &format!("blocked {expected}"));
    run
}

/// For files the host kernel may lack: one of the refusals a masked or read-only path
/// gives an unprivileged user. A host without the file has nothing to attack: the sandbox
/// must lack it too (ENOENT), and the attempt is recorded as skipped, fatal where
/// `required` is set (a kernel that must have the file).
fn blocked_kernel_file(mode: Mode, attempt: &str, host_path: &str, required: &str) {
    let run = run_probe(sandbox(mode), attempt, &[]);
    if Path::new(host_path).exists() {
        let accepted: Vec<String> = ["EACCES", "EROFS", "EPERM", "ENOENT", "masked by /dev/null"]
            .iter()
            .map(|e| format!("blocked {e}"))
            .collect();
        assert_line_one_of(&run, attempt, &accepted);
    } else {
        assert_line(&run, attempt, "blocked ENOENT");
        let mode = match mode {
            Mode::Plain => "plain",
            Mode::Userns => "userns",
        };
        hatchery_tests::skip(
            &format!("escape {mode} {attempt}"),
            &format!("this kernel has no {host_path}: there is nothing to attack"),
            required,
        );
    }
}

/// Asserts the probe's fill of `dir` (the bytes it reports on stderr) stopped within
/// 1 MiB below `size`, the filesystem's configured size: ENOSPC from a larger or a shared
/// filesystem would stop elsewhere.
fn assert_filled_close_to(run: &Run, dir: &str, size: u64) {
    let suffix = format!(" bytes written to {dir}");
    let written: u64 = run
        .stderr
        .lines()
        .find_map(|l| {
            l.strip_prefix("probe fill: ")?
                .strip_suffix(suffix.as_str())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the probe did not report what it wrote\n{}", run.describe()));
    assert!(
        (size - (1 << 20)..=size).contains(&written),
        "{written} bytes fit in {dir}, configured at {size} bytes\n{}",
        run.describe()
    );
}

/// A host TCP listener on every address, checked for connections after the attack.
struct Listener(TcpListener);

impl Listener {
    fn start() -> Listener {
        let l = TcpListener::bind("0.0.0.0:0").expect("bind host listener");
        l.set_nonblocking(true).expect("nonblocking listener");
        Listener(l)
    }

    fn port(&self) -> u16 {
        self.0.local_addr().expect("listener address").port()
    }

    fn assert_untouched(&self, run: &Run) {
        match self.0.accept() {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Ok((_, peer)) => panic!(
                "the host listener accepted a connection from {peer}\n{}",
                run.describe()
            ),
            Err(e) => panic!("accept on the host listener: {e}"),
        }
    }
}

/// A SysV shared memory segment on the host, removed on drop.
struct HostShm {
    key: libc::key_t,
    id: libc::c_int,
}

impl HostShm {
    fn create() -> HostShm {
        static NEXT: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = 0x4a00_0000 | ((std::process::id() as i32 & 0xffff) << 8) | (n & 0xff);
        // SAFETY: shmget creates a 4 KiB segment; no pointers involved.
        let id = unsafe { libc::shmget(key, 4096, libc::IPC_CREAT | libc::IPC_EXCL | 0o666) };
        assert!(
            id >= 0,
            "shmget on the host: {}",
            std::io::Error::last_os_error()
        );
        HostShm { key, id }
    }
}

impl Drop for HostShm {
    fn drop(&mut self) {
        // SAFETY: removing the segment this test created; the buffer may be NULL.
        unsafe { libc::shmctl(self.id, libc::IPC_RMID, std::ptr::null_mut()) };
    }
}

/// Generates every case twice: `plain::<name>` and `userns::<name>`.
macro_rules! escape_suite {
    ($( $(#[$meta:meta])* fn $name:ident($mode:ident) $body:block )+) => {
        mod cases {
            #[allow(unused_imports)]
            use super::*;
            $( $(#[$meta])* pub fn $name($mode: Mode) $body )+
        }
        mod plain {
            $( $(#[$meta])* #[test] fn $name() { super::cases::$name(super::Mode::Plain) } )+
        }
        mod userns {
            $( $(#[$meta])* #[test] fn $name() { super::cases::$name(super::Mode::Userns) } )+
        }
    };
}

escape_suite! {
    // ----- mounts and the root -----------------------------------------------------------

    /// mount(2) of a new tmpfs: any mount lets the command reshape its view of the system.
    fn mounting_a_tmpfs_is_refused(mode) {
        blocked(mode, "mount-tmpfs", &[], "EPERM");
    }

    /// Bind-mounting / elsewhere (the first step of hiding or duplicating mounts).
    fn bind_mounting_the_root_is_refused(mode) {
        blocked(mode, "mount-bind", &[], "EPERM");
    }

    /// Remounting the read-only root read-write.
    fn remounting_the_root_read_write_is_refused(mode) {
        blocked(mode, "remount-root-rw", &[], "EPERM");
    }

    /// umount2("/proc"): uncovering what the fresh /proc and its masks hide.
    fn unmounting_proc_is_refused(mode) {
        blocked(mode, "umount-proc", &[], "EPERM");
    }

    /// pivot_root(2) to a root of the command's choosing.
    fn pivot_root_is_refused(mode) {
        blocked(mode, "pivot-root", &[], "EPERM");
    }

    /// The classic chroot escape: chroot into a subdirectory, walk out with "..",
    /// chroot("."), look for a host-only file.
    fn chroot_dotdot_escape_is_refused(mode) {
        let marker = HostMarker::create();
        let path = marker.path();
        blocked(mode, "chroot-escape", &[path.to_str().unwrap()], "EPERM");
    }

    /// The new mount API (fsopen/fsmount), which bypasses filters written for mount(2).
    fn fsopen_is_refused(mode) {
        blocked(mode, "fsopen", &[], "EPERM");
    }

    /// open_tree(OPEN_TREE_CLONE): cloning a detached copy of a mount tree.
    fn open_tree_clone_is_refused(mode) {
        blocked(mode, "open-tree", &[], "EPERM");
    }

    // ----- namespaces --------------------------------------------------------------------

    /// unshare(CLONE_NEWUSER): a user namespace gives a full capability set inside it,
    /// the entry point of most kernel privilege escalations.
    fn unshare_user_namespace_is_refused(mode) {
        blocked(mode, "unshare-user", &[], "EPERM");
    }

    /// unshare(CLONE_NEWNET).
    fn unshare_network_namespace_is_refused(mode) {
        blocked(mode, "unshare-net", &[], "EPERM");
    }

    /// unshare(CLONE_NEWNS).
    fn unshare_mount_namespace_is_refused(mode) {
        blocked(mode, "unshare-mount", &[], "EPERM");
    }

    /// unshare(CLONE_NEWPID).
    fn unshare_pid_namespace_is_refused(mode) {
        blocked(mode, "unshare-pid", &[], "EPERM");
    }

    /// unshare(CLONE_NEWUTS).
    fn unshare_uts_namespace_is_refused(mode) {
        blocked(mode, "unshare-uts", &[], "EPERM");
    }

    /// unshare(CLONE_NEWIPC).
    fn unshare_ipc_namespace_is_refused(mode) {
        blocked(mode, "unshare-ipc", &[], "EPERM");
    }

    /// unshare(CLONE_NEWCGROUP).
    fn unshare_cgroup_namespace_is_refused(mode) {
        blocked(mode, "unshare-cgroup", &[], "EPERM");
    }

    /// unshare(CLONE_NEWTIME).
    fn unshare_time_namespace_is_refused(mode) {
        blocked(mode, "unshare-time", &[], "EPERM");
    }

    /// setns(2) into the network namespace of pid 1 (the sandbox init).
    fn joining_the_init_network_namespace_is_refused(mode) {
        blocked(mode, "setns-init-net", &[], "EACCES");
    }

    /// setns(2) at all (here: back into its own mount namespace).
    fn setns_is_refused(mode) {
        blocked(mode, "setns-self-mnt", &[], "EPERM");
    }

    /// clone3(CLONE_NEWUSER): clone3 passes flags in memory, where seccomp cannot see
    /// them, so it must be refused outright (ENOSYS makes libc fall back to clone).
    fn clone3_with_a_new_user_namespace_is_refused(mode) {
        blocked(mode, "clone3-newuser", &[], "ENOSYS");
    }

    /// clone(CLONE_NEWNS) as a raw syscall (not through unshare).
    fn clone_with_a_new_mount_namespace_is_refused(mode) {
        blocked(mode, "clone-newns", &[], "EPERM");
    }

    /// clone(CLONE_NEWUSER) as a raw syscall.
    fn clone_with_a_new_user_namespace_is_refused(mode) {
        blocked(mode, "clone-newuser", &[], "EPERM");
    }

    // ----- other processes ---------------------------------------------------------------

    /// ptrace(PTRACE_ATTACH) of pid 1, the sandbox's init: controlling the one process
    /// inside that talks to the runtime.
    fn ptrace_attach_to_sandbox_init_is_refused(mode) {
        blocked(mode, "ptrace-attach", &[], "EPERM");
    }

    /// process_vm_readv(2) of the sandbox init's memory.
    fn process_vm_readv_of_sandbox_init_is_refused(mode) {
        blocked(mode, "process-vm-readv", &[], "EPERM");
    }

    /// pidfd_getfd(2): stealing a descriptor (e.g. the runtime channel) from the init.
    fn pidfd_getfd_from_sandbox_init_is_refused(mode) {
        let run = run_probe(sandbox(mode), "pidfd-getfd", &[]);
        assert_line_one_of(
            &run,
            "pidfd-getfd",
            &["blocked EPERM".into(), "blocked pidfd_open EPERM".into()],
        );
    }

    /// kcmp(2) against the init (leaks kernel object identity).
    fn kcmp_against_sandbox_init_is_refused(mode) {
        blocked(mode, "kcmp", &[], "EPERM");
    }

    /// Reading /proc/1/environ (the runtime side's environment).
    fn reading_the_init_environment_is_refused(mode) {
        blocked(mode, "init-environ", &[], "EACCES");
    }

    /// Reaching a host-only file through /proc/1/root.
    fn host_files_through_proc_1_root_are_unreachable(mode) {
        let marker = HostMarker::create();
        let path = marker.path();
        blocked(mode, "init-root", &[path.to_str().unwrap()], "EACCES");
    }

    /// kill(-1, SIGKILL): must reach nothing outside the sandbox; the host canary and the
    /// runtime survive and report a normal exit.
    fn kill_all_reaches_neither_host_nor_runtime(mode) {
        let mut canary = Canary::start();
        blocked(mode, "kill-all", &[], "ESRCH");
        canary.assert_alive("after kill(-1, SIGKILL) inside the sandbox");
    }

    /// kill(2) of a host pid (the canary's).
    fn killing_a_host_pid_fails(mode) {
        let mut canary = Canary::start();
        let pid = canary.pid().to_string();
        blocked(mode, "kill-pid", &[&pid], "ESRCH");
        canary.assert_alive("after kill(<canary pid>, SIGKILL) inside the sandbox");
    }

    /// /proc/<host pid> must not exist inside.
    fn host_pids_are_invisible(mode) {
        let canary = Canary::start();
        let pid = canary.pid().to_string();
        blocked(mode, "host-pid", &[&pid], "ENOENT");
    }

    /// Listing /proc shows only the sandbox's own processes (init and the probe).
    fn only_sandbox_pids_are_listed(mode) {
        blocked(mode, "proc-pids", &[], "only 2 sandbox pids visible");
    }

    // ----- kernel attack surface ---------------------------------------------------------

    /// add_key(2): the kernel keyring is not namespaced (keyring CVEs, key quota DoS).
    fn add_key_is_refused(mode) {
        blocked(mode, "add-key", &[], "EPERM");
    }

    /// keyctl(KEYCTL_JOIN_SESSION_KEYRING).
    fn keyctl_join_session_keyring_is_refused(mode) {
        blocked(mode, "keyctl-join", &[], "EPERM");
    }

    /// bpf(BPF_PROG_LOAD): the eBPF verifier is a recurring privilege-escalation source.
    fn bpf_prog_load_is_refused(mode) {
        blocked(mode, "bpf-prog-load", &[], "EPERM");
    }

    /// perf_event_open(2): kernel info leaks and perf CVEs.
    fn perf_event_open_is_refused(mode) {
        blocked(mode, "perf-event-open", &[], "EPERM");
    }

    /// userfaultfd(2): the standard tool for winning kernel races.
    fn userfaultfd_is_refused(mode) {
        blocked(mode, "userfaultfd", &[], "EPERM");
    }

    /// io_uring_setup(2): io_uring bypasses seccomp for the operations it performs.
    fn io_uring_setup_is_refused(mode) {
        blocked(mode, "io-uring-setup", &[], "EPERM");
    }

    /// open_by_handle_at(2): the "shocker" escape from Docker 0.11 (2014).
    fn open_by_handle_at_shocker_is_refused(mode) {
        blocked(mode, "open-by-handle-at", &[], "EPERM");
    }

    /// name_to_handle_at(2): the first half of shocker (forging handles).
    fn name_to_handle_at_is_refused(mode) {
        blocked(mode, "name-to-handle-at", &[], "EPERM");
    }

    /// kexec_load(2): replacing the running kernel.
    fn kexec_load_is_refused(mode) {
        blocked(mode, "kexec-load", &[], "EPERM");
    }

    /// kexec_file_load(2).
    fn kexec_file_load_is_refused(mode) {
        blocked(mode, "kexec-file-load", &[], "EPERM");
    }

    /// init_module(2): loading kernel code.
    fn init_module_is_refused(mode) {
        blocked(mode, "init-module", &[], "EPERM");
    }

    /// finit_module(2).
    fn finit_module_is_refused(mode) {
        blocked(mode, "finit-module", &[], "EPERM");
    }

    /// reboot(2) (LINUX_REBOOT_CMD_CAD_OFF, harmless even if it worked).
    fn reboot_is_refused(mode) {
        blocked(mode, "reboot", &[], "EPERM");
    }

    /// swapon(2): host-wide swap configuration.
    fn swapon_is_refused(mode) {
        blocked(mode, "swapon", &[], "EPERM");
    }

    /// mknod(2) of a block device (8:0, the first SCSI disk) in /tmp.
    fn mknod_of_a_block_device_is_refused(mode) {
        blocked(mode, "mknod-block", &[], "EPERM");
    }

    /// syslog(SYSLOG_ACTION_READ_ALL): the host kernel log leaks addresses and host activity.
    fn reading_the_kernel_log_is_refused(mode) {
        blocked(mode, "syslog", &[], "EPERM");
    }

    /// modify_ldt(2): old attack surface for 16-bit segment bugs.
    fn modify_ldt_is_refused(mode) {
        blocked(mode, "modify-ldt", &[], "EPERM");
    }

    /// iopl(2): raw port I/O.
    fn iopl_is_refused(mode) {
        blocked(mode, "iopl", &[], "EPERM");
    }

    /// ioperm(2): raw port I/O.
    fn ioperm_is_refused(mode) {
        blocked(mode, "ioperm", &[], "EPERM");
    }

    /// personality(READ_IMPLIES_EXEC): weakens W^X for exploits.
    fn personality_read_implies_exec_is_refused(mode) {
        blocked(mode, "personality", &[], "EPERM");
    }

    /// lookup_dcookie(2).
    fn lookup_dcookie_is_refused(mode) {
        blocked(mode, "lookup-dcookie", &[], "EPERM");
    }

    /// acct(2): host-wide process accounting.
    fn acct_is_refused(mode) {
        blocked(mode, "acct", &[], "EPERM");
    }

    /// quotactl(2).
    fn quotactl_is_refused(mode) {
        blocked(mode, "quotactl", &[], "EPERM");
    }

    /// fanotify_init(2): watching the filesystem host-wide.
    fn fanotify_init_is_refused(mode) {
        blocked(mode, "fanotify-init", &[], "EPERM");
    }

    /// clock_settime(CLOCK_REALTIME): the host clock is global.
    fn setting_the_clock_is_refused(mode) {
        blocked(mode, "clock-settime", &[], "EPERM");
    }

    /// settimeofday(2).
    fn settimeofday_is_refused(mode) {
        blocked(mode, "settimeofday", &[], "EPERM");
    }

    // ----- /proc and /sys ----------------------------------------------------------------

    /// Writing /proc/sysrq-trigger (key 'h'; real keys reboot or crash the host).
    fn sysrq_trigger_is_unreachable(mode) {
        blocked_kernel_file(
            mode,
            "sysrq-trigger",
            "/proc/sysrq-trigger",
            "HATCHERY_REQUIRE_FULL_ROOT",
        );
    }

    /// Writing /proc/sys/kernel/hostname; the host's hostname stays unchanged.
    fn writing_proc_sys_kernel_hostname_is_refused(mode) {
        let before = host_hostname();
        let run = run_probe(sandbox(mode), "proc-sys-hostname", &[]);
        assert_line_one_of(
            &run,
            "proc-sys-hostname",
            &["blocked EACCES".into(), "blocked EROFS".into()],
        );
        assert_eq!(host_hostname(), before, "the host's hostname changed");
    }

    /// Writing /proc/sys/kernel/core_pattern: a "|program" pattern runs as host root on the
    /// next crash (the classic core_pattern escape).
    fn core_pattern_write_is_refused(mode) {
        let before = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
        let run = run_probe(sandbox(mode), "core-pattern", &[]);
        assert_line_one_of(
            &run,
            "core-pattern",
            &["blocked EACCES".into(), "blocked EROFS".into()],
        );
        let after = std::fs::read_to_string("/proc/sys/kernel/core_pattern").unwrap();
        assert_eq!(after, before, "the host's core_pattern changed");
    }

    /// Writing /proc/sys/kernel/modprobe (run as root on demand module loads).
    fn modprobe_path_write_is_refused(mode) {
        blocked_kernel_file(
            mode,
            "modprobe-path",
            "/proc/sys/kernel/modprobe",
            "HATCHERY_REQUIRE_FULL_ROOT",
        );
    }

    /// Writing /sys/kernel/uevent_helper (run as root on every uevent). Kernels built
    /// without CONFIG_UEVENT_HELPER (Debian's) have no such file: set
    /// HATCHERY_REQUIRE_UEVENT_HELPER where the kernel has one.
    fn uevent_helper_write_is_refused(mode) {
        blocked_kernel_file(
            mode,
            "uevent-helper",
            "/sys/kernel/uevent_helper",
            "HATCHERY_REQUIRE_UEVENT_HELPER",
        );
    }

    /// Writing /sys/class/net/lo/mtu: /sys must be read-only.
    fn sysfs_write_is_refused(mode) {
        let run = run_probe(sandbox(mode), "lo-mtu", &[]);
        assert_line_one_of(&run, "lo-mtu", &["blocked EACCES".into(), "blocked EROFS".into()]);
    }

    /// Lowering /proc/self/oom_score_adj to -1000 (making the host's OOM killer pick host
    /// processes instead of the sandbox).
    fn oom_score_adj_cannot_be_lowered(mode) {
        blocked(mode, "oom-score-adj", &[], "EACCES");
    }

    /// Writing /proc/sys/vm/drop_caches (a host-wide performance attack).
    fn drop_caches_write_is_refused(mode) {
        let run = run_probe(sandbox(mode), "drop-caches", &[]);
        assert_line_one_of(
            &run,
            "drop-caches",
            &["blocked EACCES".into(), "blocked EROFS".into()],
        );
    }

    /// Rewriting /proc/self/uid_map (mapping itself to host root).
    fn uid_map_cannot_be_rewritten(mode) {
        blocked(mode, "uid-map", &[], "EPERM");
    }

    /// /proc/sys is a read-only mount (not merely root-owned files).
    fn proc_sys_is_mounted_read_only(mode) {
        blocked(mode, "proc-sys-readonly", &[], "/proc/sys mounted ro");
    }

    /// /sys is a read-only mount.
    fn sys_is_mounted_read_only(mode) {
        blocked(mode, "sys-readonly", &[], "/sys mounted ro");
    }

    /// Reading /proc/kcore (physical memory of the host).
    fn reading_kcore_is_refused(mode) {
        blocked_kernel_file(
            mode,
            "read-kcore",
            "/proc/kcore",
            "HATCHERY_REQUIRE_FULL_ROOT",
        );
    }

    // ----- cgroups -----------------------------------------------------------------------

    /// Moving itself into the root cgroup (escaping every limit) via cgroup.procs.
    fn joining_the_root_cgroup_is_refused(mode) {
        blocked(mode, "cgroup-procs-root", &[], "ENOENT");
    }

    /// The same on the v1 memory hierarchy path.
    fn joining_the_root_memory_cgroup_is_refused(mode) {
        blocked(mode, "cgroup-procs-memory", &[], "ENOENT");
    }

    /// The same on the hybrid hosts' unified hierarchy path.
    fn joining_the_root_unified_cgroup_is_refused(mode) {
        blocked(mode, "cgroup-procs-unified", &[], "ENOENT");
    }

    /// Mounting a cgroup v1 hierarchy.
    fn mounting_cgroup_v1_is_refused(mode) {
        blocked(mode, "mount-cgroup", &[], "EPERM");
    }

    /// Mounting cgroup2.
    fn mounting_cgroup2_is_refused(mode) {
        blocked(mode, "mount-cgroup2", &[], "EPERM");
    }

    /// CVE-2022-0492: mount a v1 hierarchy and set release_agent (runs as host root).
    fn release_agent_via_a_new_cgroup_mount_is_refused(mode) {
        blocked(mode, "release-agent", &[], "EPERM");
    }

    /// No existing release_agent file is visible (or writable) inside.
    fn existing_release_agent_is_unreachable(mode) {
        blocked(mode, "release-agent-existing", &[], "not visible");
    }

    /// /proc/self/cgroup shows only the cgroup namespace root, no host cgroup layout.
    fn cgroup_namespace_hides_host_paths(mode) {
        blocked(mode, "cgroup-path", &[], "cgroup namespace root only");
    }

    // ----- network -----------------------------------------------------------------------

    /// socket(AF_INET, SOCK_RAW): packet forging needs CAP_NET_RAW.
    fn raw_socket_is_refused(mode) {
        blocked(mode, "raw-socket", &[], "EPERM");
    }

    /// socket(AF_PACKET) (CVE-2020-14386 and friends).
    fn packet_socket_is_refused(mode) {
        blocked(mode, "packet-socket", &[], "EPERM");
    }

    /// socket(AF_VSOCK): a path to the hypervisor host on VMs.
    fn vsock_socket_is_refused(mode) {
        blocked(mode, "vsock-socket", &[], "EPERM");
    }

    /// socket(AF_ALG): kernel crypto API attack surface.
    fn af_alg_socket_is_refused(mode) {
        blocked(mode, "af-alg-socket", &[], "EPERM");
    }

    /// socket(AF_NETLINK, NETLINK_ROUTE) and RTM_NEWADDR on lo.
    fn netlink_route_cannot_configure_interfaces(mode) {
        blocked(mode, "netlink-route", &[], "EPERM");
    }

    /// TCP to a listener on the host's loopback: the sandbox's lo is its own.
    fn host_loopback_listener_is_unreachable(mode) {
        let listener = Listener::start();
        let addr = format!("127.0.0.1:{}", listener.port());
        let run = blocked(mode, "tcp-connect", &[&addr], "ECONNREFUSED");
        listener.assert_untouched(&run);
    }

    /// TCP to the same listener on the host's own (default-route) address.
    fn host_address_is_unreachable(mode) {
        let listener = Listener::start();
        let ip = host_ipv4().expect("this host has a non-loopback IPv4 address");
        let addr = format!("{ip}:{}", listener.port());
        let run = blocked(mode, "tcp-connect", &[&addr], "ENETUNREACH");
        listener.assert_untouched(&run);
    }

    /// Abstract unix sockets belong to the network namespace: a host one is unreachable.
    fn host_abstract_unix_socket_is_unreachable(mode) {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("hatchery-escape-{}-{:?}", std::process::id(), mode);
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let host = std::os::unix::net::UnixListener::bind_addr(&addr).expect("host socket");
        host.set_nonblocking(true).unwrap();
        let run = blocked(mode, "abstract-unix", &[&name], "ECONNREFUSED");
        assert!(
            host.accept().is_err(),
            "the host abstract socket accepted a connection\n{}",
            run.describe()
        );
    }

    /// The network namespace has exactly one interface, lo.
    fn only_the_loopback_interface_exists(mode) {
        blocked(mode, "interfaces", &[], "only lo");
    }

    // ----- terminals ---------------------------------------------------------------------

    /// ioctl(TIOCSTI) on stdin: typing commands into the invoking terminal (CVE-2016-7545
    /// and many runtimes since).
    fn tiocsti_on_stdin_is_refused(mode) {
        blocked(mode, "tiocsti-stdin", &[], "EPERM");
    }

    /// TIOCSTI through /dev/tty (the controlling terminal).
    fn tiocsti_on_dev_tty_is_refused(mode) {
        blocked(mode, "tiocsti-tty", &[], "ENOENT");
    }

    // ----- credentials and privileges ----------------------------------------------------

    /// setuid(0).
    fn setuid_root_is_refused(mode) {
        blocked(mode, "setuid-root", &[], "EPERM");
    }

    /// setgid(0).
    fn setgid_root_is_refused(mode) {
        blocked(mode, "setgid-root", &[], "EPERM");
    }

    /// setgroups([0]).
    fn setgroups_is_refused(mode) {
        blocked(mode, "setgroups", &[], "EPERM");
    }

    /// capset(2) raising CAP_SYS_ADMIN.
    fn capset_cannot_raise_capabilities(mode) {
        blocked(mode, "capset", &[], "EPERM");
    }

    /// sethostname(2); the host's hostname stays unchanged.
    fn sethostname_is_refused(mode) {
        let before = host_hostname();
        blocked(mode, "sethostname", &[], "EPERM");
        assert_eq!(host_hostname(), before, "the host's hostname changed");
    }

    /// Executing a setuid-root binary (a setuid copy of the probe, bind-mounted in) must
    /// not give euid 0: nosuid bind mounts and no_new_privs.
    fn setuid_binary_does_not_grant_root(mode) {
        let dir = tempfile::tempdir().unwrap();
        let suid = dir.path().join("probe-suid");
        std::fs::copy(PROBE_HOST, &suid).unwrap();
        std::fs::set_permissions(&suid, std::fs::Permissions::from_mode(0o4755)).unwrap();
        let sb = sandbox(mode).ro_bind(&suid, "/usr/local/bin/probe-suid");
        let run = run_probe(sb, "setuid-binary", &["/usr/local/bin/probe-suid"]);
        assert_line(&run, "setuid-binary", "blocked euid 65534");
    }

    /// no_new_privs is set (execve can never add privileges).
    fn no_new_privs_is_set(mode) {
        blocked(mode, "no-new-privs", &[], "no_new_privs=1");
    }

    /// Every capability set is empty, the bounding set included.
    fn no_capabilities_are_held(mode) {
        blocked(mode, "capabilities", &[], "no capabilities");
    }

    /// A seccomp filter is in force.
    fn seccomp_filter_is_active(mode) {
        blocked(mode, "seccomp-mode", &[], "seccomp filter active");
    }

    /// Raising the hard RLIMIT_NOFILE.
    fn hard_nofile_limit_cannot_be_raised(mode) {
        blocked(mode, "setrlimit-nofile", &[], "EPERM");
    }

    /// setpriority(-20): starving the host's processes.
    fn priority_cannot_be_raised(mode) {
        blocked(mode, "setpriority", &[], "EACCES");
    }

    // ----- runtime leaks -----------------------------------------------------------------

    /// Opening /proc/self/exe for writing (the root-owned probe binary, bound read-only).
    fn overwriting_own_executable_is_refused(mode) {
        blocked(mode, "overwrite-self-exe", &[], "EACCES");
    }

    /// CVE-2019-5736 (runc): reopening /proc/1/exe for writing to overwrite the runtime
    /// binary on the host.
    fn overwriting_the_runtime_binary_is_refused(mode) {
        blocked(mode, "overwrite-init-exe", &[], "EACCES");
    }

    /// CVE-2024-21626 (runc "Leaky Vessels"): no host descriptor beyond stdio reaches the
    /// command.
    fn no_host_descriptor_leaks_into_the_sandbox(mode) {
        blocked(mode, "leaked-fds", &[], "no fd beyond 2");
    }

    /// CVE-2024-21626 follow-up: no path through /proc/self/fd/N/.. or the working
    /// directory reaches a host-only file.
    fn host_root_is_unreachable_through_fds_or_cwd(mode) {
        let marker = HostMarker::create();
        let path = marker.path();
        blocked(
            mode,
            "proc-fd-escape",
            &[path.to_str().unwrap()],
            "no leaked fd and cwd inside the root",
        );
    }

    /// The host environment (secrets of the runtime's caller) does not reach the command.
    fn host_environment_does_not_leak(mode) {
        blocked(mode, "env-leak", &[SECRET_VAR], "not set");
    }

    // ----- filesystem and devices --------------------------------------------------------

    /// A host-only file is invisible inside.
    fn host_only_files_are_invisible(mode) {
        let marker = HostMarker::create();
        let path = marker.path();
        blocked(mode, "host-marker", &[path.to_str().unwrap()], "ENOENT");
    }

    /// Creating a file in / (read-only root).
    fn the_root_is_read_only(mode) {
        blocked(mode, "write-root", &[], "EROFS");
    }

    /// Creating a file in /usr/bin (planting binaries for later runs).
    fn usr_bin_is_read_only(mode) {
        blocked(mode, "write-usr-bin", &[], "EROFS");
    }

    /// Opening /etc/passwd for writing (root-owned: refused by permissions before the
    /// read-only mount is even consulted).
    fn etc_passwd_is_not_writable(mode) {
        blocked(mode, "write-etc", &[], "EACCES");
    }

    /// The root mount itself carries the read-only flag (independent of file modes).
    fn the_root_mount_is_read_only(mode) {
        blocked(mode, "root-readonly", &[], "/ mounted ro");
    }

    /// `--ro-bind` mounts are read-only, nosuid and nodev.
    fn ro_binds_are_read_only_nosuid_nodev(mode) {
        let expected = format!("{PROBE} has ro,nosuid,nodev");
        blocked(mode, "mount-flags", &[PROBE, "ro", "nosuid", "nodev"], &expected);
    }

    /// The writable /tmp is nosuid and nodev.
    fn tmp_is_nosuid_nodev(mode) {
        blocked(mode, "mount-flags", &["/tmp", "nosuid", "nodev"], "/tmp has nosuid,nodev");
    }

    /// The writable /work is nosuid and nodev.
    fn work_is_nosuid_nodev(mode) {
        blocked(mode, "mount-flags", &["/work", "nosuid", "nodev"], "/work has nosuid,nodev");
    }

    /// /dev/sda does not exist inside.
    fn host_disks_are_absent(mode) {
        blocked(mode, "dev-sda", &[], "ENOENT");
    }

    /// /dev/mem does not exist inside.
    fn physical_memory_device_is_absent(mode) {
        blocked(mode, "dev-mem", &[], "ENOENT");
    }

    /// /dev/kmsg does not exist inside.
    fn kernel_log_device_is_absent(mode) {
        blocked(mode, "dev-kmsg", &[], "ENOENT");
    }

    /// /dev holds only the minimal safe device nodes.
    fn dev_holds_only_safe_devices(mode) {
        blocked(mode, "dev-list", &[], "only null zero full random urandom tty ptmx");
    }

    /// A host SysV shared memory segment is invisible (own IPC namespace).
    fn host_sysv_shared_memory_is_invisible(mode) {
        let shm = HostShm::create();
        let key = shm.key.to_string();
        blocked(mode, "sysv-shm", &[&key], "ENOENT");
    }

    /// The sandbox has its own hostname, not the host's.
    fn the_hostname_is_the_sandbox_s_own(mode) {
        let host = host_hostname();
        blocked(mode, "uts", &[&host], "own hostname hatchery-escape");
    }

    // ----- leftovers and exhaustion ------------------------------------------------------

    /// A detached daemon (new session, deaf to SIGTERM/SIGHUP) does not outlive the
    /// sandbox: nothing with its token runs on the host after the run.
    fn a_detached_daemon_does_not_outlive_the_sandbox(mode) {
        let token = unique_token("hatchery-daemon");
        let run = run_probe(sandbox(mode), "daemonize", &[&token]);
        assert_line(&run, "daemonize", "blocked daemon detached, the host must find it gone");
        let left = host_processes_with(&token);
        assert!(left.is_empty(), "processes outlived the sandbox: {left:?}\n{}", run.describe());
    }

    /// On timeout the whole tree is killed, including a process ignoring SIGTERM and a
    /// detached daemon; the report says timed_out.
    fn the_whole_tree_is_killed_on_timeout(mode) {
        let token = unique_token("hatchery-linger");
        let sb = unbounded(mode).timeout("2s").pids(64).memory("256M");
        let run = run_probe(sb, "linger", &[&token]);
        assert_eq!(run.stdout, "", "linger printed a verdict\n{}", run.describe());
        run.assert_status("timed_out", 124);
        run.assert_cleaned_up();
        // Killed at the deadline: 1.5 s of slack for a loaded machine, far less than any
        // later fallback kill would take.
        let wall = run.report().wall_time_ms;
        assert!(
            (1900.0..=3500.0).contains(&wall),
            "wall time {wall} ms does not match a 2 s timeout\n{}",
            run.describe()
        );
        let left = host_processes_with(&token);
        assert!(left.is_empty(), "processes outlived the timeout: {left:?}\n{}", run.describe());
    }

    /// Flooding stdout stops at the output limit.
    fn output_flood_stops_at_the_output_limit(mode) {
        let run = run_probe(sandbox(mode).output_limit("1M"), "output-flood", &[]);
        run.assert_status("output_limit", 122);
        run.assert_cleaned_up();
        assert!(run.report().stdout_truncated, "stdout_truncated is false\n{}", run.describe());
        assert!(
            run.stdout.len() <= 1 << 20,
            "{} bytes of stdout passed a 1M limit",
            run.stdout.len()
        );
    }

    /// A fork bomb stops at the pids limit; the host canary survives.
    fn fork_bomb_is_stopped_by_the_pids_limit(mode) {
        let mut canary = Canary::start();
        let sb = unbounded(mode).timeout("20s").pids(64).memory("256M");
        let run = run_probe(sb, "fork-bomb", &[]);
        assert_line(&run, "fork-bomb", "blocked EAGAIN");
        canary.assert_alive("after the fork bomb");
    }

    /// A memory bomb is OOM-killed at the memory limit; the host canary survives.
    fn memory_bomb_is_oom_killed(mode) {
        let mut canary = Canary::start();
        let sb = unbounded(mode).timeout("20s").memory("128M").pids(64);
        let run = run_probe(sb, "memory-bomb", &[]);
        assert_eq!(run.stdout, "", "the memory bomb was not stopped\n{}", run.describe());
        run.assert_status("oom_killed", 137);
        run.assert_cleaned_up();
        let peak = run.report().peak_memory_bytes;
        assert!(
            peak <= 160 << 20,
            "peak memory {peak} bytes is far above the 128M limit\n{}",
            run.describe()
        );
        canary.assert_alive("after the memory bomb");
    }

    /// Filling /tmp stops at the tmpfs size.
    fn filling_tmp_stops_at_its_size(mode) {
        let run = run_probe(sandbox(mode).tmp_size("16M"), "fill-tmp", &[]);
        assert_line(&run, "fill-tmp", "blocked ENOSPC");
        assert_filled_close_to(&run, "/tmp", 16 << 20);
    }

    /// Filling /work stops at the tmpfs size.
    fn filling_work_stops_at_its_size(mode) {
        let run = run_probe(sandbox(mode).work_size("16M"), "fill-work", &[]);
        assert_line(&run, "fill-work", "blocked ENOSPC");
        assert_filled_close_to(&run, "/work", 16 << 20);
    }

    /// Opening descriptors stops at RLIMIT_NOFILE.
    fn exhausting_descriptors_stops_at_the_limit(mode) {
        blocked(mode, "exhaust-fds", &[], "EMFILE");
    }
}

/// Every attempt the probe knows is exercised by a test above (the probe and the suite
/// cannot drift apart), and there are at least 45 of them.
#[test]
fn every_probe_attempt_has_a_test() {
    let out = std::process::Command::new(PROBE_HOST)
        .arg("list")
        .output()
        .expect("run probe list");
    let list = String::from_utf8(out.stdout).unwrap();
    let names: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert!(names.len() >= 45, "only {} probe attempts", names.len());
    let source = include_str!("escape.rs");
    let missing: Vec<&&str> = names
        .iter()
        .filter(|n| !source.contains(&format!("\"{n}\"")))
        .collect();
    assert!(
        missing.is_empty(),
        "probe attempts without a test: {missing:?}"
    );
}

/// The suite's own plumbing: a canary dies when killed (so `assert_alive` can fail).
#[test]
fn canary_detects_death() {
    let mut canary = Canary::start();
    assert!(canary.is_alive());
    // SAFETY: signalling the child this test started.
    unsafe { libc::kill(canary.pid() as libc::pid_t, libc::SIGKILL) };
    // Dying takes a moment (much longer in an emulated VM): wait for it, bounded.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while canary.is_alive() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !canary.is_alive(),
        "a SIGKILLed canary still counts as alive after 10 s"
    );
}
