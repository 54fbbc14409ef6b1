//! `probe`: the in-sandbox half of the escape suite.
//!
//! A multi-call binary in the spirit of crun's `tests/init.c` and bubblewrap's
//! `tests/try-syscall.c`: `probe <attempt> [args]` performs exactly ONE escape attempt and
//! prints exactly one line on stdout:
//!
//! - `probe <attempt>: blocked <ERRNO_NAME>` (e.g. `blocked EPERM`), or
//!   `probe <attempt>: blocked <short reason>` when the attempt failed without an errno;
//! - `probe <attempt>: ESCAPED <detail>` when the attempt succeeded;
//! - `probe <attempt>: error <detail>` when the probe could not even set the attempt up
//!   (a broken test, never a pass).
//!
//! Exit status: 0 blocked, 3 escaped, 2 error, 64 usage. Diagnostics go to stderr only.
//!
//! Every attempt really performs the operation (no simulated results). Run on a host as
//! root many attempts report `ESCAPED`: that shows the probe really tries. A few attempts
//! would change host state if they succeeded there (hostname, /proc/sys, cgroups, clocks,
//! release_agent, umount /proc); run those on a host only inside throw-away namespaces
//! (`unshare -m -u -n -p -f`). Attempts whose syscall checks a capability before it
//! validates its arguments are called with invalid arguments, so that even a privileged
//! caller changes nothing: for those, an errno other than EPERM/EACCES means "passed the
//! permission check" and is reported as an escape.
//!
//! `probe list` prints the attempt names; `probe euid` prints the effective uid (used by
//! `setuid-binary` through a setuid copy of this binary).

use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::mem::{size_of, zeroed};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::ptr;
use std::time::Duration;

use nix::errno::Errno;

/// What one attempt found.
enum Outcome {
    Blocked(String),
    Escaped(String),
    Error(String),
}

type Attempt = fn(&[String]) -> Outcome;

/// Every attempt: name, argument synopsis, implementation.
const ATTEMPTS: &[(&str, &str, Attempt)] = &[
    // mounts and the root
    ("mount-tmpfs", "", mount_tmpfs),
    ("mount-bind", "", mount_bind),
    ("remount-root-rw", "", remount_root_rw),
    ("umount-proc", "", umount_proc),
    ("pivot-root", "", pivot_root),
    ("chroot-escape", "MARKER", chroot_escape),
    ("fsopen", "", fsopen),
    ("open-tree", "", open_tree),
    // namespaces
    ("unshare-user", "", |_| unshare_one(libc::CLONE_NEWUSER)),
    ("unshare-net", "", |_| unshare_one(libc::CLONE_NEWNET)),
    ("unshare-mount", "", |_| unshare_one(libc::CLONE_NEWNS)),
    ("unshare-pid", "", |_| unshare_one(libc::CLONE_NEWPID)),
    ("unshare-uts", "", |_| unshare_one(libc::CLONE_NEWUTS)),
    ("unshare-ipc", "", |_| unshare_one(libc::CLONE_NEWIPC)),
    ("unshare-cgroup", "", |_| unshare_one(libc::CLONE_NEWCGROUP)),
    ("unshare-time", "", |_| unshare_one(libc::CLONE_NEWTIME)),
    ("setns-init-net", "[PID]", setns_init_net),
    ("setns-self-mnt", "", setns_self_mnt),
    ("clone3-newuser", "", clone3_newuser),
    ("clone-newns", "", |_| raw_clone(libc::CLONE_NEWNS, "mount")),
    ("clone-newuser", "", |_| {
        raw_clone(libc::CLONE_NEWUSER, "user")
    }),
    // other processes
    ("ptrace-attach", "[PID]", ptrace_attach),
    ("process-vm-readv", "[PID]", process_vm_readv),
    ("pidfd-getfd", "[PID]", pidfd_getfd),
    ("kcmp", "[PID]", kcmp),
    ("init-environ", "[PID]", init_environ),
    ("init-root", "MARKER [PID]", init_root),
    ("kill-all", "", kill_all),
    ("kill-pid", "PID", kill_pid),
    ("host-pid", "PID", host_pid),
    ("proc-pids", "", proc_pids),
    // kernel attack surface
    ("add-key", "", add_key),
    ("keyctl-join", "", keyctl_join),
    ("bpf-prog-load", "", bpf_prog_load),
    ("perf-event-open", "", perf_event_open),
    ("userfaultfd", "", userfaultfd),
    ("io-uring-setup", "", io_uring_setup),
    ("open-by-handle-at", "", open_by_handle_at),
    ("name-to-handle-at", "", name_to_handle_at),
    ("kexec-load", "", kexec_load),
    ("kexec-file-load", "", kexec_file_load),
    ("init-module", "", init_module),
    ("finit-module", "", finit_module),
    ("reboot", "", reboot),
    ("swapon", "", swapon),
    ("mknod-block", "", mknod_block),
    ("syslog", "", syslog),
    ("modify-ldt", "", modify_ldt),
    ("iopl", "", iopl),
    ("ioperm", "", ioperm),
    ("personality", "", personality),
    ("lookup-dcookie", "", lookup_dcookie),
    ("acct", "", acct),
    ("quotactl", "", quotactl),
    ("fanotify-init", "", fanotify_init),
    ("clock-settime", "", clock_settime),
    ("settimeofday", "", settimeofday),
    // /proc and /sys
    ("sysrq-trigger", "", |_| {
        write_kernel_file("/proc/sysrq-trigger", Content::Bytes(b"h"))
    }),
    ("proc-sys-hostname", "", |_| {
        write_kernel_file(
            "/proc/sys/kernel/hostname",
            Content::Bytes(b"hatchery-pwned"),
        )
    }),
    ("core-pattern", "", |_| {
        write_kernel_file("/proc/sys/kernel/core_pattern", Content::Same)
    }),
    ("modprobe-path", "", |_| {
        write_kernel_file("/proc/sys/kernel/modprobe", Content::Same)
    }),
    ("uevent-helper", "", |_| {
        write_kernel_file("/sys/kernel/uevent_helper", Content::Same)
    }),
    ("lo-mtu", "", |_| {
        write_kernel_file("/sys/class/net/lo/mtu", Content::Same)
    }),
    ("oom-score-adj", "", |_| {
        write_kernel_file("/proc/self/oom_score_adj", Content::Bytes(b"-1000"))
    }),
    ("drop-caches", "", |_| {
        write_kernel_file("/proc/sys/vm/drop_caches", Content::Bytes(b"1"))
    }),
    ("uid-map", "", |_| {
        write_kernel_file("/proc/self/uid_map", Content::Bytes(b"0 0 1\n"))
    }),
    ("proc-sys-readonly", "", |_| mounted_readonly("/proc/sys")),
    ("sys-readonly", "", |_| mounted_readonly("/sys")),
    ("mount-flags", "PATH FLAG...", mount_flags),
    ("read-kcore", "", read_kcore),
    // cgroups
    ("cgroup-procs-root", "", |_| {
        write_kernel_file("/sys/fs/cgroup/cgroup.procs", Content::OwnPid)
    }),
    ("cgroup-procs-memory", "", |_| {
        write_kernel_file("/sys/fs/cgroup/memory/cgroup.procs", Content::OwnPid)
    }),
    ("cgroup-procs-unified", "", |_| {
        write_kernel_file("/sys/fs/cgroup/unified/cgroup.procs", Content::OwnPid)
    }),
    ("mount-cgroup", "", mount_cgroup),
    ("mount-cgroup2", "", mount_cgroup2),
    ("release-agent", "", release_agent),
    ("release-agent-existing", "", release_agent_existing),
    ("cgroup-path", "", cgroup_path),
    // network
    ("raw-socket", "", |_| {
        socket_attempt(
            libc::AF_INET,
            libc::SOCK_RAW,
            libc::IPPROTO_ICMP,
            "AF_INET SOCK_RAW",
        )
    }),
    ("packet-socket", "", |_| {
        socket_attempt(
            libc::AF_PACKET,
            libc::SOCK_RAW,
            i32::from((libc::ETH_P_ALL as u16).to_be()),
            "AF_PACKET",
        )
    }),
    ("vsock-socket", "", |_| {
        socket_attempt(libc::AF_VSOCK, libc::SOCK_STREAM, 0, "AF_VSOCK")
    }),
    ("af-alg-socket", "", |_| {
        socket_attempt(libc::AF_ALG, libc::SOCK_SEQPACKET, 0, "AF_ALG")
    }),
    ("netlink-route", "", netlink_route),
    ("tcp-connect", "ADDR:PORT", tcp_connect),
    ("abstract-unix", "NAME", abstract_unix),
    ("interfaces", "", interfaces),
    // terminals
    ("tiocsti-stdin", "", tiocsti_stdin),
    ("tiocsti-tty", "", tiocsti_tty),
    // credentials and privileges
    ("setuid-root", "", |_| {
        // SAFETY: setuid has no memory-safety preconditions.
        must_fail(unsafe { libc::setuid(0) }.into(), |_| {
            "setuid(0) succeeded".into()
        })
    }),
    ("setgid-root", "", |_| {
        // SAFETY: setgid has no memory-safety preconditions.
        must_fail(unsafe { libc::setgid(0) }.into(), |_| {
            "setgid(0) succeeded".into()
        })
    }),
    ("setgroups", "", setgroups),
    ("capset", "", capset),
    ("sethostname", "", sethostname),
    ("setuid-binary", "PATH", setuid_binary),
    ("no-new-privs", "", no_new_privs),
    ("capabilities", "", capabilities),
    ("seccomp-mode", "", seccomp_mode),
    ("setrlimit-nofile", "", setrlimit_nofile),
    ("setpriority", "", setpriority),
    // runtime leaks (runc CVEs)
    ("overwrite-self-exe", "", |_| {
        overwrite_exe("/proc/self/exe")
    }),
    ("overwrite-init-exe", "[PID]", |a| {
        overwrite_exe(&format!("/proc/{}/exe", pid_arg(a, 0)))
    }),
    ("leaked-fds", "", leaked_fds),
    ("proc-fd-escape", "MARKER", proc_fd_escape),
    ("env-leak", "VAR", env_leak),
    // filesystem and devices
    ("host-marker", "PATH", host_marker),
    ("write-root", "", |_| create_file("/hatchery-probe")),
    ("write-usr-bin", "", |_| {
        create_file("/usr/bin/hatchery-probe")
    }),
    ("write-etc", "", write_etc),
    ("root-readonly", "", |_| mounted_readonly("/")),
    ("dev-sda", "", |_| open_device("/dev/sda")),
    ("dev-mem", "", |_| open_device("/dev/mem")),
    ("dev-kmsg", "", |_| open_device("/dev/kmsg")),
    ("dev-list", "", dev_list),
    ("sysv-shm", "KEY", sysv_shm),
    ("uts", "HOST_HOSTNAME", uts),
    // resource exhaustion and leftovers
    ("daemonize", "TOKEN", daemonize),
    ("linger", "TOKEN", linger),
    ("output-flood", "", output_flood),
    ("fork-bomb", "[MAX]", fork_bomb),
    ("memory-bomb", "[MAX_MIB]", memory_bomb),
    ("fill-tmp", "[MAX_MIB]", |a| fill_dir("/tmp", a)),
    ("fill-work", "[MAX_MIB]", |a| fill_dir("/work", a)),
    ("exhaust-fds", "[MAX]", exhaust_fds),
];

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(name) = args.first() else {
        usage();
    };
    match name.as_str() {
        "list" => {
            for (name, synopsis, _) in ATTEMPTS {
                println!("{name} {synopsis}");
            }
            return;
        }
        "euid" => {
            // SAFETY: geteuid and getuid cannot fail and have no preconditions.
            let (euid, uid) = unsafe { (libc::geteuid(), libc::getuid()) };
            println!("probe euid: {euid} uid {uid}");
            return;
        }
        _ => {}
    }
    let Some((_, _, attempt)) = ATTEMPTS.iter().find(|(n, _, _)| n == name) else {
        eprintln!("probe: unknown attempt {name:?}");
        usage();
    };
    let outcome = attempt(&args[1..]);
    let (line, code) = match outcome {
        Outcome::Blocked(s) => (format!("probe {name}: blocked {s}"), 0),
        Outcome::Escaped(s) => (format!("probe {name}: ESCAPED {s}"), 3),
        Outcome::Error(s) => (format!("probe {name}: error {s}"), 2),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
    std::process::exit(code);
}

fn usage() -> ! {
    eprintln!("usage: probe <attempt> [args]   (probe list: all attempts)");
    std::process::exit(64);
}

// ---------------------------------------------------------------------------------------
// helpers

fn errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

fn ename(e: i32) -> String {
    format!("{:?}", Errno::from_raw(e))
}

fn blocked(s: impl Into<String>) -> Outcome {
    Outcome::Blocked(s.into())
}

fn escaped(s: impl Into<String>) -> Outcome {
    Outcome::Escaped(s.into())
}

fn blocked_errno() -> Outcome {
    blocked(ename(errno()))
}

fn io_outcome(e: &std::io::Error) -> Outcome {
    match e.raw_os_error() {
        Some(code) => blocked(ename(code)),
        None => blocked(e.to_string()),
    }
}

fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL in path")
}

/// A call that must fail: a negative return is blocked (with errno, read immediately),
/// anything else is an escape described by `on_success`.
fn must_fail(ret: i64, on_success: impl FnOnce(i64) -> String) -> Outcome {
    if ret < 0 {
        blocked_errno()
    } else {
        escaped(on_success(ret))
    }
}

/// A call whose kernel implementation checks a capability before it validates the
/// (deliberately invalid) arguments: EPERM, EACCES or ENOSYS mean blocked; success or any
/// other errno means the caller got past the permission check.
fn gate(ret: i64, what: &str) -> Outcome {
    if ret >= 0 {
        return escaped(format!("{what} succeeded"));
    }
    let e = errno();
    match e {
        libc::EPERM | libc::EACCES | libc::ENOSYS => blocked(ename(e)),
        _ => escaped(format!("{what} passed the permission check ({})", ename(e))),
    }
}

fn close(fd: i64) {
    if fd >= 0 {
        // SAFETY: closing a descriptor this process owns and no longer uses.
        unsafe { libc::close(fd as RawFd) };
    }
}

fn pid_arg(args: &[String], index: usize) -> libc::pid_t {
    args.get(index).and_then(|s| s.parse().ok()).unwrap_or(1)
}

fn required<'a>(args: &'a [String], what: &str) -> Result<&'a str, Outcome> {
    args.first()
        .map(String::as_str)
        .ok_or_else(|| Outcome::Error(format!("missing argument {what}")))
}

fn getpid() -> libc::pid_t {
    // SAFETY: getpid cannot fail.
    unsafe { libc::getpid() }
}

fn open_raw(path: &str, flags: i32) -> i64 {
    let p = cstr(path);
    // SAFETY: p is a valid NUL-terminated path; the mode argument is unused without O_CREAT.
    i64::from(unsafe { libc::open(p.as_ptr(), flags | libc::O_CLOEXEC, 0o644) })
}

fn is_dev_null(fd: RawFd) -> bool {
    // SAFETY: st is a plain C struct written by fstat.
    let mut st: libc::stat = unsafe { zeroed() };
    // SAFETY: fd is an open descriptor and st is a valid out pointer.
    let r = unsafe { libc::fstat(fd, &mut st) };
    r == 0 && (st.st_mode & libc::S_IFMT) == libc::S_IFCHR && st.st_rdev == libc::makedev(1, 3)
}

fn fs_type(fd: RawFd) -> Option<i64> {
    // SAFETY: sfs is a plain C struct written by fstatfs.
    let mut sfs: libc::statfs = unsafe { zeroed() };
    // SAFETY: fd is an open descriptor and sfs is a valid out pointer.
    let r = unsafe { libc::fstatfs(fd, &mut sfs) };
    (r == 0).then_some(sfs.f_type)
}

// ---------------------------------------------------------------------------------------
// mounts and the root

fn mount_tmpfs(_: &[String]) -> Outcome {
    let _ = std::fs::create_dir_all("/tmp/hatchery-probe-mnt");
    // SAFETY: all strings are valid NUL-terminated C strings; data may be NULL.
    let r = unsafe {
        libc::mount(
            c"tmpfs".as_ptr(),
            c"/tmp/hatchery-probe-mnt".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            ptr::null(),
        )
    };
    let out = must_fail(r.into(), |_| {
        "mounted a tmpfs on /tmp/hatchery-probe-mnt".into()
    });
    if r == 0 {
        // SAFETY: valid path; undoing our own mount.
        unsafe { libc::umount2(c"/tmp/hatchery-probe-mnt".as_ptr(), libc::MNT_DETACH) };
    }
    out
}

fn mount_bind(_: &[String]) -> Outcome {
    let _ = std::fs::create_dir_all("/tmp/hatchery-probe-bind");
    // SAFETY: valid C strings; fstype and data may be NULL for a bind mount.
    let r = unsafe {
        libc::mount(
            c"/".as_ptr(),
            c"/tmp/hatchery-probe-bind".as_ptr(),
            ptr::null(),
            libc::MS_BIND | libc::MS_REC,
            ptr::null(),
        )
    };
    let out = must_fail(r.into(), |_| {
        "bind-mounted / on /tmp/hatchery-probe-bind".into()
    });
    if r == 0 {
        // SAFETY: valid path; undoing our own mount.
        unsafe { libc::umount2(c"/tmp/hatchery-probe-bind".as_ptr(), libc::MNT_DETACH) };
    }
    out
}

fn remount_root_rw(_: &[String]) -> Outcome {
    // SAFETY: valid C strings; source, fstype and data may be NULL for a remount.
    let r = unsafe {
        libc::mount(
            ptr::null(),
            c"/".as_ptr(),
            ptr::null(),
            libc::MS_REMOUNT | libc::MS_BIND,
            ptr::null(),
        )
    };
    must_fail(r.into(), |_| "remounted / read-write".into())
}

fn umount_proc(_: &[String]) -> Outcome {
    // SAFETY: valid C string.
    let r = unsafe { libc::umount2(c"/proc".as_ptr(), libc::MNT_DETACH) };
    must_fail(r.into(), |_| "unmounted /proc".into())
}

fn pivot_root(_: &[String]) -> Outcome {
    // pivot_root checks CAP_SYS_ADMIN before it validates its arguments; "/tmp" twice is
    // invalid in every root (not a new root below the current one), so it changes nothing.
    // SAFETY: valid C strings.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, c"/tmp".as_ptr(), c"/tmp".as_ptr()) };
    gate(r, "pivot_root")
}

fn chroot_escape(args: &[String]) -> Outcome {
    let marker = match required(args, "MARKER") {
        Ok(m) => m,
        Err(o) => return o,
    };
    let jail = "/tmp/hatchery-probe-jail";
    if let Err(e) = std::fs::create_dir_all(jail) {
        return Outcome::Error(format!("mkdir {jail}: {e}"));
    }
    let cj = cstr(jail);
    // The classic escape: chroot into a subdirectory while the cwd stays outside it, walk
    // up with "..", chroot(".") at the top.
    // SAFETY: valid C string.
    if unsafe { libc::chroot(cj.as_ptr()) } != 0 {
        return blocked_errno();
    }
    for _ in 0..64 {
        // SAFETY: valid C string.
        unsafe { libc::chdir(c"..".as_ptr()) };
    }
    // SAFETY: valid C string.
    if unsafe { libc::chroot(c".".as_ptr()) } != 0 {
        return blocked(format!("second chroot {}", ename(errno())));
    }
    if Path::new(marker).exists() {
        escaped(format!("chroot allowed and host marker {marker} reached"))
    } else {
        blocked("chroot allowed but host root not reached")
    }
}

fn fsopen(_: &[String]) -> Outcome {
    // SAFETY: valid C string, flags 0.
    let r = unsafe { libc::syscall(libc::SYS_fsopen, c"tmpfs".as_ptr(), 0) };
    close(r);
    must_fail(r, |_| {
        "fsopen(\"tmpfs\") returned a filesystem context".into()
    })
}

fn open_tree(_: &[String]) -> Outcome {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    // SAFETY: valid C string; OPEN_TREE_CLONE detaches a copy of the tree, no state change.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            c"/".as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        )
    };
    close(r);
    must_fail(r, |_| {
        "open_tree(/, OPEN_TREE_CLONE) cloned a mount tree".into()
    })
}

// ---------------------------------------------------------------------------------------
// namespaces

fn unshare_one(flag: libc::c_int) -> Outcome {
    // SAFETY: unshare has no memory-safety preconditions.
    let r = unsafe { libc::unshare(flag) };
    must_fail(r.into(), |_| format!("unshare({flag:#x}) succeeded"))
}

fn setns_init_net(args: &[String]) -> Outcome {
    let pid = pid_arg(args, 0);
    let fd = open_raw(&format!("/proc/{pid}/ns/net"), libc::O_RDONLY);
    if fd < 0 {
        return blocked_errno();
    }
    // SAFETY: fd is an open namespace descriptor.
    let r = unsafe { libc::setns(fd as RawFd, libc::CLONE_NEWNET) };
    let out = must_fail(r.into(), |_| {
        format!("joined the network namespace of pid {pid}")
    });
    close(fd);
    out
}

fn setns_self_mnt(_: &[String]) -> Outcome {
    let fd = open_raw("/proc/self/ns/mnt", libc::O_RDONLY);
    if fd < 0 {
        return blocked(format!("open /proc/self/ns/mnt {}", ename(errno())));
    }
    // SAFETY: fd is an open namespace descriptor.
    let r = unsafe { libc::setns(fd as RawFd, libc::CLONE_NEWNS) };
    let out = must_fail(r.into(), |_| "setns(CLONE_NEWNS) succeeded".into());
    close(fd);
    out
}

/// `struct clone_args` (v2, 88 bytes) from linux/sched.h.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// After a fork-like raw clone: the child leaves at once, the parent reaps it.
fn after_clone(r: i64, what: &str) -> Outcome {
    if r == 0 {
        // SAFETY: in the child of a fork-like clone; leave without running any Rust code.
        unsafe { libc::_exit(0) };
    }
    if r < 0 {
        return blocked_errno();
    }
    // SAFETY: r is the pid of our own child; status is a valid out pointer.
    unsafe { libc::waitpid(r as libc::pid_t, ptr::null_mut(), libc::__WALL) };
    escaped(format!("created a child in a new {what} namespace"))
}

fn clone3_newuser(_: &[String]) -> Outcome {
    let args = CloneArgs {
        flags: libc::CLONE_NEWUSER as u64,
        exit_signal: libc::SIGCHLD as u64,
        ..Default::default()
    };
    // SAFETY: args is a valid clone_args of the given size; stack 0 means fork semantics
    // (the child continues on a copy of our stack and _exits immediately).
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &args as *const CloneArgs,
            size_of::<CloneArgs>(),
        )
    };
    after_clone(r, "user")
}

fn raw_clone(flag: libc::c_int, what: &str) -> Outcome {
    // x86_64 argument order: flags, stack, parent_tid, child_tid, tls.
    // SAFETY: a NULL stack gives fork semantics; the child _exits immediately.
    let r = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flag | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    after_clone(r, what)
}

// ---------------------------------------------------------------------------------------
// other processes

fn ptrace_attach(args: &[String]) -> Outcome {
    let pid = pid_arg(args, 0);
    // SAFETY: PTRACE_ATTACH takes no addr/data.
    let r = unsafe {
        libc::ptrace(
            libc::PTRACE_ATTACH,
            pid,
            ptr::null_mut::<libc::c_void>(),
            ptr::null_mut::<libc::c_void>(),
        )
    };
    if r < 0 {
        return blocked_errno();
    }
    // SAFETY: we are the tracer of pid; wait for the attach stop, then detach.
    unsafe {
        libc::waitpid(pid, ptr::null_mut(), libc::__WALL);
        libc::ptrace(
            libc::PTRACE_DETACH,
            pid,
            ptr::null_mut::<libc::c_void>(),
            ptr::null_mut::<libc::c_void>(),
        );
    }
    escaped(format!("attached to pid {pid} with ptrace"))
}

fn first_mapping(pid: libc::pid_t) -> Option<usize> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let start = maps.lines().next()?.split('-').next()?;
    usize::from_str_radix(start, 16).ok()
}

fn process_vm_readv(args: &[String]) -> Outcome {
    let pid = pid_arg(args, 0);
    let addr = first_mapping(pid).unwrap_or(0x1000);
    let mut buf = [0u8; 16];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: local points at our buffer of the stated length; the remote iovec is only
    // dereferenced by the kernel in the other process.
    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if r >= 0 {
        return escaped(format!("read {r} bytes of pid {pid} memory at {addr:#x}"));
    }
    match errno() {
        libc::EFAULT => escaped(format!(
            "access to pid {pid} memory granted (EFAULT at {addr:#x})"
        )),
        e => blocked(ename(e)),
    }
}

fn pidfd_getfd(args: &[String]) -> Outcome {
    let pid = pid_arg(args, 0);
    // SAFETY: pidfd_open takes a pid and flags.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if pidfd < 0 {
        return blocked(format!("pidfd_open {}", ename(errno())));
    }
    // SAFETY: pidfd is an open pidfd; target fd 0, flags 0.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd, 0, 0) };
    let out = must_fail(r, |_| format!("stole fd 0 of pid {pid}"));
    close(r);
    close(pidfd);
    out
}

fn kcmp(args: &[String]) -> Outcome {
    const KCMP_FILE: libc::c_int = 0;
    let pid = pid_arg(args, 0);
    // SAFETY: kcmp compares kernel objects, no pointers involved.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, getpid(), pid, KCMP_FILE, 0, 0) };
    must_fail(r, |v| format!("kcmp against pid {pid} answered {v}"))
}

fn init_environ(args: &[String]) -> Outcome {
    let pid = pid_arg(args, 0);
    if pid == getpid() {
        return Outcome::Error(format!("the probe itself is pid {pid}"));
    }
    match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(env) => escaped(format!("read {} bytes of pid {pid} environment", env.len())),
        Err(e) => io_outcome(&e),
    }
}

fn init_root(args: &[String]) -> Outcome {
    let marker = match required(args, "MARKER") {
        Ok(m) => m,
        Err(o) => return o,
    };
    let pid = pid_arg(args, 1);
    let path = format!("/proc/{pid}/root/{}", marker.trim_start_matches('/'));
    match std::fs::symlink_metadata(&path) {
        Ok(_) => escaped(format!("host marker visible through {path}")),
        Err(e) => io_outcome(&e),
    }
}

fn kill_all(_: &[String]) -> Outcome {
    // kill(-1) signals every process we may signal except ourselves and our pid-ns init.
    // SAFETY: kill has no memory-safety preconditions.
    let r = unsafe { libc::kill(-1, libc::SIGKILL) };
    must_fail(r.into(), |_| {
        "kill(-1, SIGKILL) found other processes to signal".into()
    })
}

fn kill_pid(args: &[String]) -> Outcome {
    let pid: libc::pid_t = match required(args, "PID").map(str::parse) {
        Ok(Ok(p)) => p,
        _ => return Outcome::Error("PID must be a number".into()),
    };
    // SAFETY: kill has no memory-safety preconditions.
    let r = unsafe { libc::kill(pid, libc::SIGKILL) };
    must_fail(r.into(), |_| format!("sent SIGKILL to pid {pid}"))
}

fn host_pid(args: &[String]) -> Outcome {
    let pid = match required(args, "PID") {
        Ok(p) => p,
        Err(o) => return o,
    };
    match std::fs::symlink_metadata(format!("/proc/{pid}")) {
        Ok(_) => {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            escaped(format!("/proc/{pid} is visible ({})", comm.trim()))
        }
        Err(e) => io_outcome(&e),
    }
}

fn proc_pids(_: &[String]) -> Outcome {
    let entries = match std::fs::read_dir("/proc") {
        Ok(e) => e,
        Err(e) => return Outcome::Error(format!("read /proc: {e}")),
    };
    let mut pids: Vec<u32> = entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    pids.sort_unstable();
    let list: Vec<String> = pids.iter().map(u32::to_string).collect();
    // A fresh pid namespace holds the sandbox init and the probe; a host /proc holds many.
    if pids.len() > 8 {
        escaped(format!("{} pids visible: {}", pids.len(), list.join(",")))
    } else {
        blocked(format!("only {} sandbox pids visible", pids.len()))
    }
}

// ---------------------------------------------------------------------------------------
// kernel attack surface

fn add_key(_: &[String]) -> Outcome {
    let payload = b"x";
    // SAFETY: valid C strings and a payload of the given length.
    let r = unsafe {
        libc::syscall(
            libc::SYS_add_key,
            c"user".as_ptr(),
            c"hatchery-probe".as_ptr(),
            payload.as_ptr(),
            payload.len(),
            libc::KEY_SPEC_PROCESS_KEYRING,
        )
    };
    must_fail(r, |id| format!("added key {id} to the process keyring"))
}

fn keyctl_join(_: &[String]) -> Outcome {
    // SAFETY: valid C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_keyctl,
            libc::KEYCTL_JOIN_SESSION_KEYRING,
            c"hatchery-probe".as_ptr(),
        )
    };
    must_fail(r, |id| format!("joined session keyring {id}"))
}

/// The BPF_PROG_LOAD part of `union bpf_attr`.
#[repr(C)]
struct BpfProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
}

fn bpf_prog_load(_: &[String]) -> Outcome {
    const BPF_PROG_LOAD: libc::c_int = 5;
    const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
    // r0 = 0; exit
    let insns: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let attr = BpfProgLoad {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: c"GPL".as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
        kern_version: 0,
        prog_flags: 0,
    };
    // SAFETY: attr is a valid bpf_attr prefix of the stated size pointing at live buffers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const BpfProgLoad,
            size_of::<BpfProgLoad>(),
        )
    };
    close(r);
    must_fail(r, |_| "loaded a BPF socket filter program".into())
}

fn perf_event_open(_: &[String]) -> Outcome {
    // struct perf_event_attr, PERF_ATTR_SIZE_VER0 = 64 bytes, zero-padded to 128.
    let mut attr = [0u64; 16];
    let type_and_size: u64 = 1 /* PERF_TYPE_SOFTWARE */ | (64u64 << 32);
    attr[0] = type_and_size; // config (attr[1]) 0 = PERF_COUNT_SW_CPU_CLOCK
    attr[5] = 1 | (1 << 5) | (1 << 6); // disabled, exclude_kernel, exclude_hv
                                       // SAFETY: attr is a valid, zero-padded perf_event_attr.
    let r = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            attr.as_ptr(),
            0,
            -1,
            -1,
            8usize, // PERF_FLAG_FD_CLOEXEC
        )
    };
    close(r);
    must_fail(r, |_| "opened a perf event".into())
}

fn userfaultfd(_: &[String]) -> Outcome {
    const UFFD_USER_MODE_ONLY: libc::c_int = 1;
    // SAFETY: userfaultfd takes flags only.
    let r = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | UFFD_USER_MODE_ONLY) };
    close(r);
    must_fail(r, |_| "created a userfaultfd".into())
}

fn io_uring_setup(_: &[String]) -> Outcome {
    let mut params = [0u8; 120]; // struct io_uring_params
                                 // SAFETY: params is a zeroed io_uring_params the kernel fills in.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 1u32, params.as_mut_ptr()) };
    close(r);
    must_fail(r, |_| "created an io_uring instance".into())
}

/// `struct file_handle` with room for any handle.
#[repr(C)]
struct FileHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; 128],
}

fn get_handle(path: &CStr) -> Result<FileHandle, i32> {
    let mut fh = FileHandle {
        handle_bytes: 128,
        handle_type: 0,
        f_handle: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: fh has room for handle_bytes bytes; mount_id is a valid out pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            path.as_ptr(),
            &mut fh as *mut FileHandle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    if r < 0 {
        Err(errno())
    } else {
        Ok(fh)
    }
}

fn open_by_handle_at(_: &[String]) -> Outcome {
    // "Shocker" (2014): guess the handle of the filesystem root (ext4 inode 2,
    // FILEID_INO32_GEN) or take the real one when name_to_handle_at works, then open it
    // with CAP_DAC_READ_SEARCH-guarded open_by_handle_at.
    let fh = get_handle(c"/").unwrap_or_else(|_| {
        let mut fh = FileHandle {
            handle_bytes: 8,
            handle_type: 1,
            f_handle: [0; 128],
        };
        fh.f_handle[..4].copy_from_slice(&2u32.to_le_bytes());
        fh
    });
    let mount_fd = open_raw("/", libc::O_RDONLY | libc::O_DIRECTORY);
    if mount_fd < 0 {
        return Outcome::Error(format!("open /: {}", ename(errno())));
    }
    // SAFETY: fh is a valid file_handle; mount_fd is open.
    let r = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd,
            &fh as *const FileHandle,
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    let out = gate(r, "open_by_handle_at");
    close(r);
    close(mount_fd);
    out
}

fn name_to_handle_at(_: &[String]) -> Outcome {
    match get_handle(c"/etc/passwd") {
        Ok(fh) => escaped(format!(
            "obtained a file handle for /etc/passwd (type {}, {} bytes)",
            fh.handle_type, fh.handle_bytes
        )),
        Err(e) => blocked(ename(e)),
    }
}

fn kexec_load(_: &[String]) -> Outcome {
    // 1000 segments is above KEXEC_SEGMENT_MAX: invalid once past the CAP_SYS_BOOT check.
    // SAFETY: no pointer is dereferenced before the argument checks fail.
    let r = unsafe { libc::syscall(libc::SYS_kexec_load, 0usize, 1000usize, 0usize, 0usize) };
    gate(r, "kexec_load")
}

fn kexec_file_load(_: &[String]) -> Outcome {
    // Invalid kernel fd -1: EBADF once past the CAP_SYS_BOOT check.
    // SAFETY: valid C string of length 1 (its NUL).
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            -1,
            -1,
            1usize,
            c"".as_ptr(),
            0usize,
        )
    };
    gate(r, "kexec_file_load")
}

fn init_module(_: &[String]) -> Outcome {
    // 64 zero bytes are not an ELF module: ENOEXEC once past the CAP_SYS_MODULE check.
    let image = [0u8; 64];
    // SAFETY: image is a live buffer of the stated length; valid C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_init_module,
            image.as_ptr(),
            image.len(),
            c"".as_ptr(),
        )
    };
    gate(r, "init_module")
}

fn finit_module(_: &[String]) -> Outcome {
    let fd = open_raw("/dev/null", libc::O_RDONLY);
    // SAFETY: valid C string; fd may be -1 (then EBADF after the capability check).
    let r = unsafe { libc::syscall(libc::SYS_finit_module, fd, c"".as_ptr(), 0) };
    let out = gate(r, "finit_module");
    close(fd);
    out
}

fn reboot(_: &[String]) -> Outcome {
    // CAD_OFF only disables ctrl-alt-del; inside a pid namespace it is EINVAL anyway.
    // SAFETY: reboot has no memory-safety preconditions.
    let r = unsafe { libc::reboot(libc::LINUX_REBOOT_CMD_CAD_OFF) };
    gate(r.into(), "reboot(LINUX_REBOOT_CMD_CAD_OFF)")
}

fn swapon(_: &[String]) -> Outcome {
    let path = "/tmp/hatchery-probe-swap";
    let _ = std::fs::write(path, vec![0u8; 64 * 1024]);
    let p = cstr(path);
    // A file of zeros has no swap signature: EINVAL once past the CAP_SYS_ADMIN check.
    // SAFETY: valid C string.
    let r = unsafe { libc::swapon(p.as_ptr(), 0) };
    let out = gate(r.into(), "swapon");
    if r == 0 {
        // SAFETY: valid C string; undo our own swapon.
        unsafe { libc::swapoff(p.as_ptr()) };
    }
    let _ = std::fs::remove_file(path);
    out
}

fn mknod_block(_: &[String]) -> Outcome {
    let path = "/tmp/hatchery-probe-sda";
    let p = cstr(path);
    // SAFETY: valid C string.
    let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFBLK | 0o600, libc::makedev(8, 0)) };
    if r != 0 {
        return blocked_errno();
    }
    let fd = open_raw(path, libc::O_RDONLY);
    let opened = if fd >= 0 {
        "and opened it".to_string()
    } else {
        format!("(open: {})", ename(errno()))
    };
    close(fd);
    let _ = std::fs::remove_file(path);
    escaped(format!("created block device 8:0 at {path} {opened}"))
}

fn syslog(_: &[String]) -> Outcome {
    const SYSLOG_ACTION_READ_ALL: libc::c_int = 3;
    let mut buf = vec![0u8; 4096];
    // SAFETY: buf is a live buffer of the stated length.
    let r = unsafe { libc::klogctl(SYSLOG_ACTION_READ_ALL, buf.as_mut_ptr().cast(), 4096) };
    must_fail(r.into(), |n| format!("read {n} bytes of the kernel log"))
}

fn modify_ldt(_: &[String]) -> Outcome {
    // struct user_desc for entry 0, not present (harmless if it were installed).
    let desc: [u32; 4] = [0, 0, 0, 1 << 5 /* seg_not_present */];
    // SAFETY: desc is a valid 16-byte user_desc.
    let r = unsafe { libc::syscall(libc::SYS_modify_ldt, 1, desc.as_ptr(), 16usize) };
    must_fail(r, |_| "installed an LDT entry".into())
}

fn iopl(_: &[String]) -> Outcome {
    // SAFETY: syscall without pointers.
    let r = unsafe { libc::syscall(libc::SYS_iopl, 3) };
    if r == 0 {
        // SAFETY: drop the I/O privilege level again.
        unsafe { libc::syscall(libc::SYS_iopl, 0) };
    }
    must_fail(r, |_| "raised the I/O privilege level to 3".into())
}

fn ioperm(_: &[String]) -> Outcome {
    // SAFETY: syscall without pointers.
    let r = unsafe { libc::syscall(libc::SYS_ioperm, 0x80usize, 1usize, 1) };
    if r == 0 {
        // SAFETY: give the port back.
        unsafe { libc::syscall(libc::SYS_ioperm, 0x80usize, 1usize, 0) };
    }
    must_fail(r, |_| "got access to I/O port 0x80".into())
}

fn personality(_: &[String]) -> Outcome {
    const READ_IMPLIES_EXEC: libc::c_ulong = 0x0400000;
    // SAFETY: personality has no memory-safety preconditions.
    let r = unsafe { libc::personality(READ_IMPLIES_EXEC) };
    if r >= 0 {
        // SAFETY: restore the previous persona.
        unsafe { libc::personality(r as libc::c_ulong) };
    }
    must_fail(r.into(), |_| "set READ_IMPLIES_EXEC personality".into())
}

fn lookup_dcookie(_: &[String]) -> Outcome {
    let mut buf = [0u8; 256];
    // SAFETY: buf is a live buffer of the stated length.
    let r = unsafe { libc::syscall(libc::SYS_lookup_dcookie, 0u64, buf.as_mut_ptr(), buf.len()) };
    gate(r, "lookup_dcookie")
}

fn acct(_: &[String]) -> Outcome {
    let path = "/tmp/hatchery-probe-acct";
    let _ = std::fs::write(path, b"");
    let p = cstr(path);
    // SAFETY: valid C string.
    let r = unsafe { libc::acct(p.as_ptr()) };
    if r == 0 {
        // SAFETY: NULL turns process accounting off again.
        unsafe { libc::acct(ptr::null()) };
    }
    let out = must_fail(r.into(), |_| "turned on process accounting".into());
    let _ = std::fs::remove_file(path);
    out
}

fn quotactl(_: &[String]) -> Outcome {
    let cmd = (libc::Q_QUOTAON << 8) | libc::USRQUOTA;
    // SAFETY: valid C strings; /dev/null is not a block device, so nothing can be enabled.
    let r = unsafe {
        libc::quotactl(
            cmd,
            c"/dev/null".as_ptr(),
            libc::QFMT_VFS_V1,
            c"/tmp/hatchery-probe-quota".as_ptr() as *mut libc::c_char,
        )
    };
    must_fail(r.into(), |_| "turned quotas on".into())
}

fn fanotify_init(_: &[String]) -> Outcome {
    // SAFETY: fanotify_init takes flags only.
    let r = unsafe {
        libc::fanotify_init(
            libc::FAN_CLASS_NOTIF | libc::FAN_CLOEXEC,
            libc::O_RDONLY as libc::c_uint,
        )
    };
    close(r.into());
    must_fail(r.into(), |_| "created a fanotify group".into())
}

fn clock_settime(_: &[String]) -> Outcome {
    // SAFETY: ts is a plain C struct written by clock_gettime.
    let mut ts: libc::timespec = unsafe { zeroed() };
    // SAFETY: ts is a valid out/in pointer; we set the clock to its own current value.
    let r = unsafe {
        libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts);
        libc::clock_settime(libc::CLOCK_REALTIME, &ts)
    };
    must_fail(r.into(), |_| "set CLOCK_REALTIME".into())
}

fn settimeofday(_: &[String]) -> Outcome {
    // SAFETY: tv is a plain C struct written by gettimeofday.
    let mut tv: libc::timeval = unsafe { zeroed() };
    // SAFETY: tv is valid; the timezone argument may be NULL.
    let r = unsafe {
        libc::gettimeofday(&mut tv, ptr::null_mut());
        libc::settimeofday(&tv, ptr::null())
    };
    must_fail(r.into(), |_| "set the time of day".into())
}

// ---------------------------------------------------------------------------------------
// /proc, /sys and cgroup files

enum Content {
    /// Write these bytes.
    Bytes(&'static [u8]),
    /// Write back what the file holds now (proves write access without changing anything).
    Same,
    /// Write our own pid (cgroup.procs).
    OwnPid,
}

fn write_kernel_file(path: &str, content: Content) -> Outcome {
    let bytes: Vec<u8> = match content {
        Content::Bytes(b) => b.to_vec(),
        Content::Same => match std::fs::read(path) {
            Ok(b) if b.is_empty() => b"\n".to_vec(),
            Ok(b) => b,
            Err(_) => b"\n".to_vec(),
        },
        Content::OwnPid => getpid().to_string().into_bytes(),
    };
    let fd = open_raw(path, libc::O_WRONLY);
    if fd < 0 {
        return blocked_errno();
    }
    let fd = fd as RawFd;
    if is_dev_null(fd) {
        close(fd.into());
        return blocked("masked by /dev/null");
    }
    match fs_type(fd) {
        Some(t)
            if t == libc::PROC_SUPER_MAGIC
                || t == libc::SYSFS_MAGIC
                || t == libc::CGROUP_SUPER_MAGIC
                || t == libc::CGROUP2_SUPER_MAGIC => {}
        Some(t) => {
            close(fd.into());
            return blocked(format!("masked (filesystem {t:#x})"));
        }
        None => {}
    }
    // SAFETY: bytes is a live buffer of the stated length; fd is open.
    let r = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    let out = must_fail(r as i64, |n| format!("wrote {n} bytes to {path}"));
    close(fd.into());
    out
}

fn read_kcore(_: &[String]) -> Outcome {
    let mut f = match std::fs::File::open("/proc/kcore") {
        Ok(f) => f,
        Err(e) => return io_outcome(&e),
    };
    if is_dev_null(f.as_raw_fd()) {
        return blocked("masked by /dev/null");
    }
    let mut buf = [0u8; 64];
    match f.read(&mut buf) {
        Ok(0) => blocked("empty"),
        Ok(n) => escaped(format!("read {n} bytes of /proc/kcore")),
        Err(e) => io_outcome(&e),
    }
}

fn mount_cgroup_fs(fstype: &CStr, opts: &CStr, dir: &str) -> i32 {
    let _ = std::fs::create_dir_all(dir);
    let d = cstr(dir);
    // SAFETY: valid C strings.
    unsafe {
        libc::mount(
            c"cgroup".as_ptr(),
            d.as_ptr(),
            fstype.as_ptr(),
            0,
            opts.as_ptr().cast(),
        )
    }
}

fn umount(dir: &str) {
    let d = cstr(dir);
    // SAFETY: valid C string; undoing our own mount.
    unsafe { libc::umount2(d.as_ptr(), libc::MNT_DETACH) };
}

fn mount_cgroup(_: &[String]) -> Outcome {
    let dir = "/tmp/hatchery-probe-cgroup";
    let r = mount_cgroup_fs(c"cgroup", c"none,name=hatchery_probe", dir);
    if r == 0 {
        umount(dir);
    }
    must_fail(r.into(), |_| "mounted a cgroup v1 hierarchy".into())
}

fn mount_cgroup2(_: &[String]) -> Outcome {
    let dir = "/tmp/hatchery-probe-cgroup2";
    let r = mount_cgroup_fs(c"cgroup2", c"", dir);
    if r == 0 {
        umount(dir);
    }
    must_fail(r.into(), |_| "mounted the cgroup2 hierarchy".into())
}

fn release_agent(_: &[String]) -> Outcome {
    // CVE-2022-0492: mount a v1 hierarchy (rdma is usually unused) and set release_agent.
    let dir = "/tmp/hatchery-probe-rdma";
    let mut r = mount_cgroup_fs(c"cgroup", c"rdma", dir);
    if r != 0 {
        let first = errno();
        r = mount_cgroup_fs(c"cgroup", c"none,name=hatchery_probe", dir);
        if r != 0 {
            return blocked(ename(first));
        }
    }
    let out = write_kernel_file(&format!("{dir}/release_agent"), Content::Same);
    umount(dir);
    match out {
        Outcome::Escaped(s) => escaped(format!("mounted a cgroup v1 hierarchy and {s}")),
        Outcome::Blocked(s) => escaped(format!(
            "mounted a cgroup v1 hierarchy (release_agent write: {s})"
        )),
        e => e,
    }
}

fn release_agent_existing(_: &[String]) -> Outcome {
    let mut candidates = vec!["/sys/fs/cgroup/release_agent".to_string()];
    if let Ok(dir) = std::fs::read_dir("/sys/fs/cgroup") {
        for e in dir.flatten() {
            candidates.push(format!("{}/release_agent", e.path().display()));
        }
    }
    let existing: Vec<String> = candidates
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect();
    if existing.is_empty() {
        return blocked("not visible");
    }
    let mut first_err = None;
    for path in &existing {
        let fd = open_raw(path, libc::O_WRONLY);
        if fd >= 0 {
            close(fd);
            return escaped(format!("opened {path} for writing"));
        }
        first_err.get_or_insert(errno());
    }
    blocked(ename(first_err.unwrap_or(0)))
}

fn cgroup_path(_: &[String]) -> Outcome {
    let text = match std::fs::read_to_string("/proc/self/cgroup") {
        Ok(t) => t,
        Err(e) => return Outcome::Error(format!("read /proc/self/cgroup: {e}")),
    };
    let leaked: Vec<&str> = text
        .lines()
        .filter(|l| l.splitn(3, ':').nth(2).is_some_and(|p| p != "/"))
        .collect();
    if leaked.is_empty() {
        blocked("cgroup namespace root only")
    } else {
        escaped(format!("host cgroup paths visible: {}", leaked.join(" ")))
    }
}

// ---------------------------------------------------------------------------------------
// network

fn socket_attempt(domain: i32, ty: i32, proto: i32, what: &str) -> Outcome {
    // SAFETY: socket has no memory-safety preconditions.
    let r = unsafe { libc::socket(domain, ty | libc::SOCK_CLOEXEC, proto) };
    close(r.into());
    must_fail(r.into(), |_| format!("created an {what} socket"))
}

fn netlink_route(_: &[String]) -> Outcome {
    // SAFETY: socket has no memory-safety preconditions.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return blocked_errno();
    }
    // RTM_NEWADDR: add 198.51.100.123/32 (TEST-NET-2) to lo.
    // SAFETY: valid C string.
    let lo_index = match unsafe { libc::if_nametoindex(c"lo".as_ptr()) } {
        0 => 1,
        i => i,
    };
    let mut msg: Vec<u8> = Vec::with_capacity(40);
    msg.extend_from_slice(&40u32.to_ne_bytes());
    msg.extend_from_slice(&libc::RTM_NEWADDR.to_ne_bytes());
    let flags =
        (libc::NLM_F_REQUEST | libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_EXCL) as u16;
    msg.extend_from_slice(&flags.to_ne_bytes());
    msg.extend_from_slice(&1u32.to_ne_bytes()); // seq
    msg.extend_from_slice(&0u32.to_ne_bytes()); // pid
    msg.extend_from_slice(&[libc::AF_INET as u8, 32, 0, 0]); // ifaddrmsg
    msg.extend_from_slice(&lo_index.to_ne_bytes());
    for attr_type in [libc::IFA_LOCAL, libc::IFA_ADDRESS] {
        msg.extend_from_slice(&8u16.to_ne_bytes());
        msg.extend_from_slice(&attr_type.to_ne_bytes());
        msg.extend_from_slice(&[198, 51, 100, 123]);
    }
    let timeout = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // SAFETY: sa is a zeroed sockaddr_nl (destination: the kernel); msg and timeout are
    // live buffers of the stated sizes.
    let sent = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            size_of::<libc::timeval>() as libc::socklen_t,
        );
        let mut sa: libc::sockaddr_nl = zeroed();
        sa.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        libc::sendto(
            fd,
            msg.as_ptr().cast(),
            msg.len(),
            0,
            (&sa as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        let e = errno();
        close(fd.into());
        return blocked(format!("RTM_NEWADDR send {}", ename(e)));
    }
    let mut buf = [0u8; 1024];
    // SAFETY: buf is a live buffer of the stated length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
    let e = errno();
    close(fd.into());
    if n < 20 {
        return Outcome::Error(format!("no netlink ack ({})", ename(e)));
    }
    let msg_type = u16::from_ne_bytes([buf[4], buf[5]]);
    let error = i32::from_ne_bytes([buf[16], buf[17], buf[18], buf[19]]);
    if msg_type == libc::NLMSG_ERROR as u16 && error < 0 {
        blocked(format!("RTM_NEWADDR {}", ename(-error)))
    } else {
        escaped("added address 198.51.100.123 to lo over netlink")
    }
}

fn tcp_connect(args: &[String]) -> Outcome {
    let addr: std::net::SocketAddr = match required(args, "ADDR:PORT").map(str::parse) {
        Ok(Ok(a)) => a,
        _ => return Outcome::Error("ADDR:PORT must be a socket address".into()),
    };
    match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
        Ok(_) => escaped(format!("connected to {addr}")),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut && e.raw_os_error().is_none() => {
            blocked("timeout")
        }
        Err(e) => io_outcome(&e),
    }
}

fn abstract_unix(args: &[String]) -> Outcome {
    use std::os::linux::net::SocketAddrExt;
    let name = match required(args, "NAME") {
        Ok(n) => n,
        Err(o) => return o,
    };
    let addr = match std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()) {
        Ok(a) => a,
        Err(e) => return Outcome::Error(format!("abstract address: {e}")),
    };
    match std::os::unix::net::UnixStream::connect_addr(&addr) {
        Ok(_) => escaped(format!("connected to abstract socket @{name}")),
        Err(e) => io_outcome(&e),
    }
}

fn interfaces(_: &[String]) -> Outcome {
    // /proc/net/dev and /sys/class/net both describe the caller's network namespace
    // (if_nameindex would need a netlink socket, which the sandbox refuses).
    let mut names: Vec<String> = match std::fs::read_to_string("/proc/net/dev") {
        Ok(text) => text
            .lines()
            .skip(2)
            .filter_map(|l| Some(l.split(':').next()?.trim().to_string()))
            .collect(),
        Err(e) => return Outcome::Error(format!("read /proc/net/dev: {e}")),
    };
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names.sort();
    if names == ["lo"] {
        blocked("only lo")
    } else {
        escaped(format!("interfaces: {}", names.join(",")))
    }
}

// ---------------------------------------------------------------------------------------
// terminals

fn tiocsti(fd: RawFd, what: &str) -> Outcome {
    let c: libc::c_char = b'#' as libc::c_char;
    // SAFETY: TIOCSTI reads one char through the pointer.
    let r = unsafe { libc::ioctl(fd, libc::TIOCSTI, &c as *const libc::c_char) };
    must_fail(r.into(), |_| {
        format!("injected a byte into the terminal input of {what}")
    })
}

fn tiocsti_stdin(_: &[String]) -> Outcome {
    tiocsti(0, "fd 0")
}

fn tiocsti_tty(_: &[String]) -> Outcome {
    let fd = open_raw("/dev/tty", libc::O_RDWR | libc::O_NOCTTY);
    if fd < 0 {
        return blocked_errno();
    }
    let out = tiocsti(fd as RawFd, "/dev/tty");
    close(fd);
    out
}

// ---------------------------------------------------------------------------------------
// credentials and privileges

fn setgroups(_: &[String]) -> Outcome {
    let groups = [0 as libc::gid_t];
    // SAFETY: groups is a live array of the stated length.
    let r = unsafe { libc::setgroups(1, groups.as_ptr()) };
    must_fail(r.into(), |_| "setgroups([0]) succeeded".into())
}

fn capset(_: &[String]) -> Outcome {
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    const CAP_SYS_ADMIN: u32 = 21;
    // struct __user_cap_header_struct { version, pid } and two __user_cap_data_struct
    // { effective, permitted, inheritable } (low and high 32 capability bits).
    let header: [u32; 2] = [LINUX_CAPABILITY_VERSION_3, 0];
    let mut data = [0u32; 6];
    // SAFETY: header and data have the v3 layout and sizes.
    if unsafe { libc::syscall(libc::SYS_capget, header.as_ptr(), data.as_mut_ptr()) } < 0 {
        return Outcome::Error(format!("capget: {}", ename(errno())));
    }
    // Ask for CAP_SYS_ADMIN in the effective and permitted sets on top of what we hold.
    data[0] |= 1 << CAP_SYS_ADMIN;
    data[1] |= 1 << CAP_SYS_ADMIN;
    // SAFETY: header and data have the v3 layout and sizes.
    let r = unsafe { libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()) };
    must_fail(r, |_| "raised CAP_SYS_ADMIN with capset".into())
}

fn sethostname(_: &[String]) -> Outcome {
    let name = b"hatchery-pwned";
    // SAFETY: name is a live buffer of the stated length.
    let r = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    must_fail(r.into(), |_| "set the hostname".into())
}

fn setuid_binary(args: &[String]) -> Outcome {
    let path = match required(args, "PATH") {
        Ok(p) => p,
        Err(o) => return o,
    };
    let out = match std::process::Command::new(path).arg("euid").output() {
        Ok(o) => o,
        Err(e) => return Outcome::Error(format!("exec {path}: {e}")),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(euid) = text
        .strip_prefix("probe euid: ")
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse::<u32>().ok())
    else {
        return Outcome::Error(format!("unexpected output from {path}: {text:?}"));
    };
    if euid == 0 {
        escaped(format!("setuid-root binary {path} ran with euid 0"))
    } else {
        blocked(format!("euid {euid}"))
    }
}

fn no_new_privs(_: &[String]) -> Outcome {
    // SAFETY: PR_GET_NO_NEW_PRIVS takes no pointers.
    let r = unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) };
    match r {
        1 => blocked("no_new_privs=1"),
        0 => escaped("no_new_privs is not set"),
        _ => Outcome::Error(format!("prctl: {}", ename(errno()))),
    }
}

fn status_field(name: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

fn capabilities(_: &[String]) -> Outcome {
    let mut held = Vec::new();
    let mut bounding = 0u64;
    for set in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        let Some(v) = status_field(set) else {
            return Outcome::Error(format!("{set} missing from /proc/self/status"));
        };
        let bits = u64::from_str_radix(&v, 16).unwrap_or(u64::MAX);
        if set == "CapBnd" {
            bounding = bits;
        } else if bits != 0 {
            held.push(format!("{set}={v}"));
        }
    }
    if !held.is_empty() {
        escaped(format!("capabilities held: {}", held.join(" ")))
    } else if bounding != 0 {
        blocked(format!("no capabilities (bounding set {bounding:#x})"))
    } else {
        blocked("no capabilities")
    }
}

fn seccomp_mode(_: &[String]) -> Outcome {
    match status_field("Seccomp").as_deref() {
        Some("2") => blocked("seccomp filter active"),
        Some(m) => escaped(format!("seccomp mode {m}")),
        None => Outcome::Error("Seccomp missing from /proc/self/status".into()),
    }
}

fn setrlimit_nofile(_: &[String]) -> Outcome {
    // SAFETY: rl is a plain C struct written by getrlimit.
    let mut rl: libc::rlimit = unsafe { zeroed() };
    // SAFETY: rl is a valid out pointer.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) };
    if rl.rlim_max == libc::RLIM_INFINITY {
        return escaped("hard RLIMIT_NOFILE is unlimited");
    }
    let raised = libc::rlimit {
        rlim_cur: rl.rlim_cur,
        rlim_max: rl.rlim_max + 1,
    };
    // SAFETY: raised is a valid rlimit.
    let r = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) };
    must_fail(r.into(), |_| {
        format!("raised the hard RLIMIT_NOFILE to {}", raised.rlim_max)
    })
}

fn setpriority(_: &[String]) -> Outcome {
    // SAFETY: setpriority has no memory-safety preconditions.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, -20) };
    must_fail(r.into(), |_| "set nice -20".into())
}

// ---------------------------------------------------------------------------------------
// runtime leaks

fn overwrite_exe(link: &str) -> Outcome {
    // CVE-2019-5736: keep an O_PATH handle on the runtime's executable, then reopen it for
    // writing through /proc/self/fd. Nothing is ever written.
    let path_fd = open_raw(link, libc::O_PATH);
    if path_fd < 0 {
        return blocked_errno();
    }
    let target = std::fs::read_link(format!("/proc/self/fd/{path_fd}"))
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| link.to_string());
    let fd = open_raw(&format!("/proc/self/fd/{path_fd}"), libc::O_WRONLY);
    let out = must_fail(fd, |_| format!("opened {target} for writing"));
    close(fd);
    close(path_fd);
    out
}

fn open_fds() -> Vec<RawFd> {
    (3..1024)
        // SAFETY: F_GETFD only queries the descriptor table.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect()
}

fn leaked_fds(_: &[String]) -> Outcome {
    // CVE-2024-21626: any descriptor beyond stdio is a leak from the runtime.
    let mut fds = open_fds();
    // /proc/self/fd also shows descriptors above 1023 (its own directory handle is below
    // 1024 and was not open when the table above was taken).
    if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
        for e in dir.flatten() {
            if let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<RawFd>().ok()) {
                if fd >= 1024 && !fds.contains(&fd) {
                    fds.push(fd);
                }
            }
        }
    }
    if fds.is_empty() {
        return blocked("no fd beyond 2");
    }
    let detail: Vec<String> = fds
        .iter()
        .map(|fd| {
            let target = std::fs::read_link(format!("/proc/self/fd/{fd}"))
                .map(|p| p.display().to_string())
                .unwrap_or_else(|_| "?".into());
            format!("{fd}->{target}")
        })
        .collect();
    escaped(format!("open fds: {}", detail.join(" ")))
}

fn proc_fd_escape(args: &[String]) -> Outcome {
    let marker = match required(args, "MARKER") {
        Ok(m) => m.trim_start_matches('/').to_string(),
        Err(o) => return o,
    };
    let up = "../".repeat(32);
    // The working directory left outside the root by the runtime (the runc 1.1.11 bug).
    let cwd = std::env::current_dir();
    if Path::new(&format!("{up}{marker}")).exists() {
        return escaped(format!("host marker reached through the cwd {cwd:?}"));
    }
    let fds = open_fds();
    for fd in &fds {
        let path = format!("/proc/self/fd/{fd}/{up}{marker}");
        if Path::new(&path).exists() {
            return escaped(format!("host marker reached through {path}"));
        }
    }
    match cwd {
        Err(e) => escaped(format!("cwd outside the root ({e})")),
        Ok(_) if fds.is_empty() => blocked("no leaked fd and cwd inside the root"),
        Ok(_) => blocked(format!("marker not reachable through {} fds", fds.len())),
    }
}

fn env_leak(args: &[String]) -> Outcome {
    let var = match required(args, "VAR") {
        Ok(v) => v,
        Err(o) => return o,
    };
    match std::env::var_os(var) {
        Some(v) => escaped(format!("{var}={}", v.to_string_lossy())),
        None => blocked("not set"),
    }
}

// ---------------------------------------------------------------------------------------
// filesystem and devices

fn host_marker(args: &[String]) -> Outcome {
    let path = match required(args, "PATH") {
        Ok(p) => p,
        Err(o) => return o,
    };
    match std::fs::symlink_metadata(path) {
        Ok(_) => escaped(format!("host-only path {path} is visible")),
        Err(e) => io_outcome(&e),
    }
}

fn create_file(path: &str) -> Outcome {
    let fd = open_raw(path, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL);
    if fd < 0 {
        return blocked_errno();
    }
    close(fd);
    let _ = std::fs::remove_file(path);
    escaped(format!("created {path}"))
}

fn write_etc(_: &[String]) -> Outcome {
    // Opening for append proves write access without changing the file.
    let fd = open_raw("/etc/passwd", libc::O_WRONLY | libc::O_APPEND);
    close(fd);
    must_fail(fd, |_| "opened /etc/passwd for writing".into())
}

/// Checks the per-mount flags of the mount on top at `point` (whatever file modes say).
fn mounted_readonly(point: &str) -> Outcome {
    match mount_options(point) {
        Ok(Some(opts)) if opts.iter().any(|o| o == "ro") => blocked(format!("{point} mounted ro")),
        Ok(Some(opts)) => escaped(format!("{point} mounted {}", opts.join(","))),
        Ok(None) => escaped(format!("{point} is not a mount point of its own")),
        Err(o) => o,
    }
}

/// Per-mount options of the mount on top at `point`, from /proc/self/mountinfo.
fn mount_options(point: &str) -> Result<Option<Vec<String>>, Outcome> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| Outcome::Error(format!("read /proc/self/mountinfo: {e}")))?;
    Ok(info.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 5 && f[4] == point).then(|| f[5].split(',').map(String::from).collect())
    }))
}

fn mount_flags(args: &[String]) -> Outcome {
    let Some((point, flags)) = args.split_first() else {
        return Outcome::Error("missing argument PATH".into());
    };
    let opts = match mount_options(point) {
        Ok(Some(o)) => o,
        Ok(None) => return escaped(format!("{point} is not a mount point of its own")),
        Err(o) => return o,
    };
    let missing: Vec<&String> = flags.iter().filter(|f| !opts.contains(f)).collect();
    if missing.is_empty() {
        blocked(format!("{point} has {}", flags.join(",")))
    } else {
        escaped(format!(
            "{point} mounted {} (missing {missing:?})",
            opts.join(",")
        ))
    }
}

fn open_device(path: &str) -> Outcome {
    let fd = open_raw(path, libc::O_RDONLY | libc::O_NONBLOCK);
    close(fd);
    must_fail(fd, |_| format!("opened {path}"))
}

fn dev_list(_: &[String]) -> Outcome {
    let allowed: &[(u32, u32)] = &[(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)];
    let mut unexpected = Vec::new();
    let mut stack = vec![std::path::PathBuf::from("/dev")];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let Ok(md) = e.path().symlink_metadata() else {
                continue;
            };
            use std::os::unix::fs::{FileTypeExt, MetadataExt};
            let ft = md.file_type();
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_block_device() || ft.is_char_device() {
                let (maj, min) = (libc::major(md.rdev()), libc::minor(md.rdev()));
                let pty = maj == 136;
                if ft.is_block_device() || !(allowed.contains(&(maj, min)) || pty) {
                    unexpected.push(format!("{}({maj}:{min})", e.path().display()));
                }
            }
        }
    }
    if unexpected.is_empty() {
        blocked("only null zero full random urandom tty ptmx")
    } else {
        escaped(format!("device nodes: {}", unexpected.join(" ")))
    }
}

fn sysv_shm(args: &[String]) -> Outcome {
    let key: libc::key_t = match required(args, "KEY").map(str::parse) {
        Ok(Ok(k)) => k,
        _ => return Outcome::Error("KEY must be a number".into()),
    };
    // SAFETY: shmget only looks the key up (no IPC_CREAT).
    let r = unsafe { libc::shmget(key, 0, 0) };
    must_fail(r.into(), |id| {
        format!("found host SysV shm segment {id} for key {key}")
    })
}

fn uts(args: &[String]) -> Outcome {
    let host = match required(args, "HOST_HOSTNAME") {
        Ok(h) => h,
        Err(o) => return o,
    };
    // SAFETY: u is a plain C struct written by uname.
    let mut u: libc::utsname = unsafe { zeroed() };
    // SAFETY: u is a valid out pointer.
    unsafe { libc::uname(&mut u) };
    // SAFETY: uname NUL-terminates nodename.
    let name = unsafe { CStr::from_ptr(u.nodename.as_ptr()) }.to_string_lossy();
    if name == host {
        escaped(format!("sees the host hostname {name}"))
    } else {
        blocked(format!("own hostname {name}"))
    }
}

// ---------------------------------------------------------------------------------------
// resource exhaustion

fn max_arg(args: &[String], default: u64) -> u64 {
    args.first().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Forks a detached daemon (new session, deaf to SIGHUP and SIGTERM) that sleeps forever.
/// Its command line holds the caller's TOKEN, so the host can look for it afterwards.
fn spawn_daemon() -> Result<(), Outcome> {
    // SAFETY: the child only calls async-signal-safe functions before _exit or pause.
    match unsafe { libc::fork() } {
        -1 => Err(Outcome::Error(format!("fork: {}", ename(errno())))),
        0 => {
            // SAFETY: async-signal-safe calls only; the grandchild never returns.
            unsafe {
                libc::setsid();
                if libc::fork() == 0 {
                    libc::signal(libc::SIGHUP, libc::SIG_IGN);
                    libc::signal(libc::SIGTERM, libc::SIG_IGN);
                    loop {
                        libc::pause();
                    }
                }
                libc::_exit(0);
            }
        }
        child => {
            // SAFETY: reaping our own child.
            unsafe { libc::waitpid(child, ptr::null_mut(), 0) };
            Ok(())
        }
    }
}

fn daemonize(args: &[String]) -> Outcome {
    if let Err(o) = required(args, "TOKEN") {
        return o;
    }
    match spawn_daemon() {
        // Whether it outlives the sandbox only the host can tell.
        Ok(()) => blocked("daemon detached, the host must find it gone"),
        Err(o) => o,
    }
}

fn linger(args: &[String]) -> Outcome {
    if let Err(o) = required(args, "TOKEN") {
        return o;
    }
    if let Err(o) = spawn_daemon() {
        return o;
    }
    // SAFETY: ignoring the polite signals; only SIGKILL (or the namespace's end) stops us.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
    eprintln!("probe linger: daemon detached, sleeping forever");
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn output_flood(_: &[String]) -> Outcome {
    let chunk = vec![b'x'; 64 << 10];
    let mut out = std::io::stdout().lock();
    let mut total = 0u64;
    loop {
        if let Err(e) = out.write_all(&chunk) {
            drop(out);
            return Outcome::Error(format!("stdout closed after {total} bytes: {e}"));
        }
        total += chunk.len() as u64;
        if total >= 16 << 30 {
            return escaped(format!("wrote {total} bytes without being stopped"));
        }
    }
}

fn fork_bomb(args: &[String]) -> Outcome {
    let max = max_arg(args, 4096);
    let mut children = Vec::new();
    let mut failure = None;
    while (children.len() as u64) < max {
        // SAFETY: the child only calls async-signal-safe pause() until it is killed.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            loop {
                // SAFETY: pause has no preconditions.
                unsafe { libc::pause() };
            }
        }
        if pid < 0 {
            failure = Some(errno());
            break;
        }
        children.push(pid);
    }
    eprintln!("probe fork-bomb: {} children forked", children.len());
    for &pid in &children {
        // SAFETY: killing and reaping our own children.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, ptr::null_mut(), 0);
        }
    }
    match failure {
        Some(e) => blocked(ename(e)),
        None => escaped(format!("forked {max} processes without hitting a limit")),
    }
}

fn memory_bomb(args: &[String]) -> Outcome {
    const CHUNK: usize = 64 << 20;
    let max_mib = max_arg(args, 2048);
    let mut total_mib = 0u64;
    while total_mib < max_mib {
        // SAFETY: anonymous private mapping, no file involved.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                CHUNK,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return blocked_errno();
        }
        let bytes = p.cast::<u8>();
        for off in (0..CHUNK).step_by(4096) {
            // SAFETY: off < CHUNK, inside the mapping we own; the mapping is never freed
            // (the point is to hold it).
            unsafe { bytes.add(off).write_volatile(1) };
        }
        total_mib += (CHUNK >> 20) as u64;
        eprintln!("probe memory-bomb: {total_mib} MiB touched");
    }
    escaped(format!("touched {total_mib} MiB without being stopped"))
}

fn fill_dir(dir: &str, args: &[String]) -> Outcome {
    let max_mib = max_arg(args, 4096);
    // RLIMIT_FSIZE sends SIGXFSZ; ignore it to see EFBIG instead of dying.
    // SAFETY: setting a signal disposition to SIG_IGN.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    let path = format!("{dir}/hatchery-probe-fill");
    let mut f = match std::fs::File::create(&path) {
        Ok(f) => f,
        Err(e) => return Outcome::Error(format!("create {path}: {e}")),
    };
    let chunk = vec![0x5au8; 1 << 20];
    // Counted in bytes, the last short write included: the suite checks the total against
    // the filesystem's size.
    let mut written = 0u64;
    let mut offset = 0;
    let out = loop {
        if written >= max_mib << 20 {
            break escaped(format!(
                "wrote {} MiB to {dir} without hitting a limit",
                written >> 20
            ));
        }
        match f.write(&chunk[offset..]) {
            Ok(0) => break Outcome::Error(format!("write to {path} wrote nothing")),
            Ok(n) => {
                written += n as u64;
                offset = (offset + n) % chunk.len();
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => break io_outcome(&e),
        }
    };
    // One write, so the line reaches the pipe whole.
    let line = format!("probe fill: {written} bytes written to {dir}\n");
    let _ = std::io::stderr().write_all(line.as_bytes());
    drop(f);
    let _ = std::fs::remove_file(&path);
    out
}

fn exhaust_fds(args: &[String]) -> Outcome {
    let max = max_arg(args, 1 << 20);
    let mut fds = Vec::new();
    let out = loop {
        if fds.len() as u64 >= max {
            break escaped(format!("opened {max} descriptors without hitting a limit"));
        }
        let fd = open_raw("/dev/null", libc::O_RDONLY);
        if fd < 0 {
            break blocked_errno();
        }
        fds.push(fd);
    };
    eprintln!("probe exhaust-fds: {} descriptors opened", fds.len());
    for fd in fds {
        close(fd);
    }
    out
}
