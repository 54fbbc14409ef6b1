//! The cgroup backend, on whatever the host runs: v1/hybrid on development machines and
//! CI, pure v2 inside the VM harness (`scripts/vm-test.sh`, which sets
//! `HATCHERY_REQUIRE_CGROUP_V2=1` so that nothing is skipped there).
//!
//! Processes are placed in a cgroup by writing `0` to its `cgroup.procs` from the child
//! between fork and exec (async-signal-safe: pre-built paths, open/write/close only), or, on
//! v2, born into it with `clone3(CLONE_INTO_CGROUP)`.

use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hatchery_sandbox::cgroup::{CgroupRoot, CgroupVersion, SandboxCgroup};
use hatchery_sandbox::gc::unique_name;
use hatchery_sandbox::Limits;

fn require_root() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "the cgroup tests create cgroups and must run as root (CI does)"
    );
}

/// The parent of one test's cgroups (see [`TestParent`]).
fn root() -> TestParent {
    TestParent::new("cgroups")
}

/// True when the test can run; on a v1 host a v2-only test says why it is skipped, and
/// fails instead when the run demands v2 (inside the VM).
fn v2_available(root: &CgroupRoot, test: &str) -> bool {
    if root.version() == CgroupVersion::V2 {
        return true;
    }
    hatchery_tests::skip(
        test,
        "needs cgroup v2 controllers; this host is v1/hybrid (the VM run covers it)",
        "HATCHERY_REQUIRE_CGROUP_V2",
    );
    false
}

/// The file that limits the swap of `cg` (`memory.memsw.limit_in_bytes` on v1,
/// `memory.swap.max` on v2), which exists only where the kernel accounts swap per cgroup.
/// Without it the swap limit cannot be checked: `test` records a skip, fatal where the
/// file must exist (`HATCHERY_REQUIRE_CGROUP_V2`: the VM's v2 kernel has it;
/// `HATCHERY_REQUIRE_SWAP_ACCOUNTING` for a v1 host that must have it).
fn swap_limit_file(root: &CgroupRoot, cg: &SandboxCgroup, test: &str) -> Option<PathBuf> {
    let (file, required) = match root.version() {
        CgroupVersion::V1 => (
            "memory.memsw.limit_in_bytes",
            "HATCHERY_REQUIRE_SWAP_ACCOUNTING",
        ),
        CgroupVersion::V2 => ("memory.swap.max", "HATCHERY_REQUIRE_CGROUP_V2"),
    };
    let path = cg.dir("memory").join(file);
    if path.exists() {
        return Some(path);
    }
    hatchery_tests::skip(
        &format!("{test} (swap limit)"),
        &format!(
            "no {file}: this kernel does not account swap per cgroup (swapaccount=0 or \
             built without it), so swap is not limited"
        ),
        required,
    );
    None
}

/// A test cgroup that is removed (with anything inside killed) even when the test fails.
struct TestCgroup(Option<SandboxCgroup>);

impl TestCgroup {
    fn new(root: &CgroupRoot) -> TestCgroup {
        TestCgroup(Some(
            root.create(&unique_name("test")).expect("create cgroup"),
        ))
    }
}

impl std::ops::Deref for TestCgroup {
    type Target = SandboxCgroup;
    fn deref(&self) -> &SandboxCgroup {
        self.0.as_ref().unwrap()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            let dirs: Vec<_> = cg.dirs().map(|d| d.to_path_buf()).collect();
            cg.destroy().expect("destroy test cgroup");
            for d in dirs {
                assert!(!d.exists(), "{} left behind", d.display());
            }
        }
    }
}

/// Kills and reaps a child on drop.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Spawns `sh -c script` already inside `cg`.
fn spawn_in(cg: &SandboxCgroup, script: &str) -> Reaped {
    spawn_in_with(cg, script, Stdio::null())
}

fn spawn_in_with(cg: &SandboxCgroup, script: &str, stdout: Stdio) -> Reaped {
    let procs: Vec<CString> = cg
        .dirs()
        .map(|d| CString::new(d.join("cgroup.procs").to_str().unwrap()).unwrap())
        .collect();
    let mut cmd = Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(script)
        .stdout(stdout)
        .stderr(Stdio::null());
    // SAFETY: the closure runs between fork and exec and only calls open/write/close on
    // paths built before the fork: async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            for p in &procs {
                let fd = libc::open(p.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let ok = libc::write(fd, b"0".as_ptr().cast(), 1) == 1;
                libc::close(fd);
                if !ok {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    Reaped(cmd.spawn().expect("spawn into cgroup"))
}

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read(path: std::path::PathBuf) -> String {
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_string()
}

#[test]
fn limits_are_written_and_reset_to_unlimited() {
    let root = root();
    let cg = TestCgroup::new(&root);
    let swap = swap_limit_file(&root, &cg, "limits_are_written_and_reset_to_unlimited");
    cg.apply(&Limits {
        memory_bytes: Some(64 << 20),
        cpus: Some(0.5),
        pids: Some(10),
    })
    .unwrap();
    match root.version() {
        CgroupVersion::V1 => {
            let mem = cg.dir("memory");
            assert_eq!(
                read(mem.join("memory.limit_in_bytes")),
                (64 << 20).to_string()
            );
            if let Some(memsw) = &swap {
                assert_eq!(
                    read(memsw.clone()),
                    (64 << 20).to_string(),
                    "memory + swap must equal memory: no swap"
                );
            }
            assert_eq!(read(cg.dir("cpu").join("cpu.cfs_quota_us")), "50000");
            assert_eq!(read(cg.dir("cpu").join("cpu.cfs_period_us")), "100000");
            assert_eq!(read(cg.dir("pids").join("pids.max")), "10");
        }
        CgroupVersion::V2 => {
            let d = cg.dir("memory");
            assert_eq!(read(d.join("memory.max")), (64 << 20).to_string());
            if let Some(swap_max) = &swap {
                assert_eq!(read(swap_max.clone()), "0", "swap must be off");
            }
            assert_eq!(read(d.join("cpu.max")), "50000 100000");
            assert_eq!(read(d.join("pids.max")), "10");
        }
    }
    // Raising and then clearing must work in both directions (v1 orders memsw writes).
    cg.apply(&Limits {
        memory_bytes: Some(512 << 20),
        cpus: Some(2.0),
        pids: Some(100),
    })
    .unwrap();
    cg.apply(&Limits::UNLIMITED).unwrap();
    match root.version() {
        CgroupVersion::V1 => {
            let mem = cg.dir("memory");
            let unlimited: u64 = read(mem.join("memory.limit_in_bytes")).parse().unwrap();
            assert!(unlimited > 1 << 50, "memory limit not reset: {unlimited}");
            if let Some(memsw) = &swap {
                let unlimited: u64 = read(memsw.clone()).parse().unwrap();
                assert!(
                    unlimited > 1 << 50,
                    "memory + swap limit not reset: {unlimited}"
                );
            }
            assert_eq!(read(cg.dir("cpu").join("cpu.cfs_quota_us")), "-1");
            assert_eq!(read(cg.dir("pids").join("pids.max")), "max");
        }
        CgroupVersion::V2 => {
            let d = cg.dir("memory");
            assert_eq!(read(d.join("memory.max")), "max");
            if let Some(swap_max) = &swap {
                assert_eq!(read(swap_max.clone()), "max", "swap limit not reset");
            }
            assert_eq!(read(d.join("cpu.max")), "max 100000");
            assert_eq!(read(d.join("pids.max")), "max");
        }
    }
}

#[test]
fn memory_limit_oom_kills_and_is_counted() {
    let root = root();
    let cg = TestCgroup::new(&root);
    cg.apply(&Limits {
        memory_bytes: Some(32 << 20),
        ..Limits::UNLIMITED
    })
    .unwrap();
    // `tail` buffers a newline-free stream forever: an unbounded allocation.
    let mut hog = spawn_in(&cg, "exec tail /dev/zero");
    let status = hog.0.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "hog ended with {status:?}"
    );
    let usage = cg.usage();
    assert!(usage.oom_kills >= 1, "no OOM kill counted: {usage:?}");
    assert!(
        usage.memory_peak_bytes <= 33 << 20 && usage.memory_peak_bytes >= 16 << 20,
        "peak {} outside the limit's range",
        usage.memory_peak_bytes
    );
}

/// A parent cgroup of one test's own, at the top of each hierarchy (`hatchery-test-…`,
/// not the platform's shared `hatchery/`), removed (after its children) on drop, also
/// when the test fails: a test leaves no cgroup behind, not even an empty parent.
struct TestParent(CgroupRoot);

impl TestParent {
    fn new(tag: &str) -> TestParent {
        require_root();
        let parent = unique_name(&format!("hatchery-test-{tag}"));
        TestParent(CgroupRoot::detect(&parent).expect("detect cgroups"))
    }
}

impl std::ops::Deref for TestParent {
    type Target = CgroupRoot;
    fn deref(&self) -> &CgroupRoot {
        &self.0
    }
}

impl Drop for TestParent {
    fn drop(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.0.remove_if_empty().unwrap_or(false) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The host-wide ceiling written into Hatchery's parent holds over every sandbox's own,
/// larger limit: 48 MiB for all, 512 MiB for the sandbox, an unbounded allocation ends
/// OOM-killed at the ceiling; the pids ceiling refuses forks the same way.
#[test]
fn the_parent_ceiling_caps_every_sandbox_below_it() {
    let parent = TestParent::new("ceiling");
    parent
        .set_ceiling(Some(48 << 20), Some(8))
        .expect("write the ceiling");
    let cg = TestCgroup::new(&parent);
    cg.apply(&Limits {
        memory_bytes: Some(512 << 20),
        cpus: None,
        pids: Some(1000),
    })
    .unwrap();
    let mut hog = spawn_in(&cg, "exec tail /dev/zero");
    let status = hog.0.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "hog ended with {status:?}"
    );
    let usage = cg.usage();
    assert!(
        usage.memory_peak_bytes <= 49 << 20,
        "peak {} above the parent's 48 MiB ceiling",
        usage.memory_peak_bytes
    );
    // Eight tasks for the whole parent: twenty background sleeps cannot all start (the
    // shell gives up at the first refused fork); count what lives in the cgroup.
    let mut forks = spawn_in(
        &cg,
        "i=0; while [ $i -lt 20 ]; do sleep 30 >/dev/null 2>&1 & i=$((i+1)); done; wait",
    );
    wait_until("the forks to stop growing", Duration::from_secs(10), || {
        matches!(forks.0.try_wait(), Ok(Some(_))) || cg.procs().len() >= 20
    });
    let alive = cg.procs().len();
    assert!(
        (1..8).contains(&alive),
        "{alive} processes in a sandbox under a parent ceiling of 8 tasks"
    );
    drop(cg);
    parent.set_ceiling(None, None).expect("lift the ceiling");
}

#[test]
fn cpu_quota_throttles_a_busy_loop_to_about_half_a_core() {
    let root = root();
    let cg = TestCgroup::new(&root);
    cg.apply(&Limits {
        cpus: Some(0.5),
        ..Limits::UNLIMITED
    })
    .unwrap();
    let before = cg.usage();
    let start = Instant::now();
    let _busy = spawn_in(&cg, "while :; do :; done");
    std::thread::sleep(Duration::from_millis(1500));
    let used = cg.usage();
    let wall = start.elapsed().as_secs_f64();
    let cpu = (used.user_cpu_ns + used.system_cpu_ns - before.user_cpu_ns - before.system_cpu_ns)
        as f64
        / 1e9;
    let share = cpu / wall;
    // The quota is a ceiling; a loaded test machine may give less, never more.
    assert!(
        (0.2..=0.6).contains(&share),
        "busy loop got {share:.2} of a core under a 0.5 quota"
    );
}

#[test]
fn pids_limit_refuses_forks_beyond_it() {
    let root = root();
    let cg = TestCgroup::new(&root);
    cg.apply(&Limits {
        pids: Some(5),
        ..Limits::UNLIMITED
    })
    .unwrap();
    let _sh = spawn_in(
        &cg,
        "for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done; sleep 30",
    );
    wait_until("forks to hit the limit", Duration::from_secs(5), || {
        cg.usage().pids_current >= 5
    });
    std::thread::sleep(Duration::from_millis(200));
    assert!(cg.usage().pids_current <= 5, "pids.max was exceeded");
    assert!(cg.procs().len() <= 5);
    // The kernel counts the refused forks.
    let events = read(cg.dir("pids").join("pids.events"));
    let refused: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("max "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(refused >= 1, "no fork was refused: {events}");
}

/// Usage files opened once are read afresh every time (a watcher opens them when the
/// execution starts and reads them at every sample and at the end).
#[test]
fn usage_files_opened_once_read_fresh_figures() {
    let root = root();
    let cg = TestCgroup::new(&root);
    let files = cg.usage_files();
    let empty = files.read();
    assert_eq!((empty.pids_current, empty.oom_kills), (0, 0), "{empty:?}");
    let _busy = spawn_in(&cg, "while :; do :; done");
    wait_until(
        "the loop's CPU in the open files",
        Duration::from_secs(5),
        || files.read().user_cpu_ns > 10_000_000,
    );
    let busy = files.read();
    assert!(busy.pids_current >= 1, "{busy:?}");
    assert!(busy.memory_current_bytes > 0, "{busy:?}");
    // The same figures as a reading that opens the files.
    let fresh = cg.usage();
    assert_eq!(busy.pids_current, fresh.pids_current);
    assert!(fresh.user_cpu_ns + fresh.system_cpu_ns >= busy.user_cpu_ns + busy.system_cpu_ns);
}

#[test]
fn freeze_and_thaw_are_confirmed_and_stop_cpu_use() {
    let root = root();
    let cg = TestCgroup::new(&root);
    let _busy = spawn_in(&cg, "while :; do :; done");
    let _thaw = ThawOnDrop(root.open(cg.name()).unwrap());
    wait_until("the loop to burn cpu", Duration::from_secs(5), || {
        cg.usage().user_cpu_ns > 10_000_000
    });
    cg.freeze().unwrap();
    assert!(
        reads_frozen(&cg),
        "the kernel does not report the cgroup frozen"
    );
    let a = cg.usage();
    std::thread::sleep(Duration::from_millis(300));
    let b = cg.usage();
    let burnt = (b.user_cpu_ns + b.system_cpu_ns) - (a.user_cpu_ns + a.system_cpu_ns);
    assert!(burnt < 5_000_000, "a frozen cgroup used {burnt} ns of cpu");
    cg.thaw().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let c = cg.usage();
    assert!(
        c.user_cpu_ns + c.system_cpu_ns > b.user_cpu_ns + b.system_cpu_ns + 20_000_000,
        "the thawed loop did not run again"
    );
}

/// Thaws a cgroup when dropped (if it still exists): a process frozen in it can then be
/// killed and reaped.
struct ThawOnDrop(SandboxCgroup);

impl Drop for ThawOnDrop {
    fn drop(&mut self) {
        if self.0.dirs().all(|d| d.exists()) {
            let _ = self.0.thaw();
        }
    }
}

/// Whether the kernel reports `cg` frozen (v1 `freezer.state` FROZEN, v2 `cgroup.events`
/// `frozen 1`), read through a fresh open of the file.
fn reads_frozen(cg: &SandboxCgroup) -> bool {
    match cg.version() {
        CgroupVersion::V1 => read(cg.dir("freezer").join("freezer.state")) == "FROZEN",
        CgroupVersion::V2 => read(cg.dir("freezer").join("cgroup.events"))
            .lines()
            .any(|l| l == "frozen 1"),
    }
}

/// This process's descriptors open on files of `cg`.
fn fds_into(cg: &SandboxCgroup) -> usize {
    let dirs: Vec<_> = cg.dirs().map(|d| d.to_path_buf()).collect();
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| dirs.iter().any(|d| target.starts_with(d)))
        .count()
}

#[test]
fn freezing_again_and_again_opens_the_freezer_once_and_destroy_closes_it() {
    let root = root();
    let mut cg = TestCgroup::new(&root);
    let _busy = spawn_in(&cg, "while :; do :; done");
    // Dropped before `_busy`, so a failed assertion while frozen does not leave `_busy`
    // waiting for a frozen process forever.
    let _thaw = ThawOnDrop(root.open(cg.name()).unwrap());
    assert_eq!(fds_into(&cg), 0, "nothing is open before the first freeze");
    cg.freeze().unwrap();
    // v1: freezer.state; v2: cgroup.freeze and cgroup.events.
    let kept = fds_into(&cg);
    let want = match root.version() {
        CgroupVersion::V1 => 1,
        CgroupVersion::V2 => 2,
    };
    assert_eq!(kept, want, "the freezer's files are kept open");
    for round in 0..20 {
        cg.thaw().unwrap();
        assert!(!reads_frozen(&cg), "round {round}: not thawed");
        cg.freeze().unwrap();
        assert!(reads_frozen(&cg), "round {round}: not frozen");
        assert_eq!(fds_into(&cg), kept, "round {round}: a file opened again");
    }
    // Still frozen: no CPU used.
    let a = cg.usage();
    std::thread::sleep(Duration::from_millis(200));
    let b = cg.usage();
    let burnt = (b.user_cpu_ns + b.system_cpu_ns) - (a.user_cpu_ns + a.system_cpu_ns);
    assert!(burnt < 5_000_000, "a frozen cgroup used {burnt} ns of cpu");
    let cg = cg.0.take().unwrap();
    let dirs: Vec<_> = cg.dirs().map(|d| d.to_path_buf()).collect();
    cg.destroy().unwrap();
    for d in &dirs {
        assert!(!d.exists(), "{} left behind", d.display());
    }
    assert_eq!(fds_into(&_thaw.0), 0, "a descriptor outlived the cgroup");
}

#[test]
fn kill_all_kills_a_double_forked_setsid_tree() {
    let root = root();
    let cg = TestCgroup::new(&root);
    let _sh = spawn_in(
        &cg,
        "(setsid sh -c 'sleep 300 & sleep 300' &); sleep 300 & sleep 300",
    );
    wait_until("the tree to grow", Duration::from_secs(5), || {
        cg.procs().len() >= 4
    });
    if root.version() == CgroupVersion::V2 {
        assert!(
            cg.dir("pids").join("cgroup.kill").exists(),
            "no cgroup.kill"
        );
    }
    cg.kill_all().unwrap();
    assert!(cg.is_empty(), "left: {:?}", cg.procs());
}

#[test]
fn limits_changed_on_a_frozen_cgroup_apply_after_thaw() {
    let root = root();
    let cg = TestCgroup::new(&root);
    // A process waiting (as a pooled sandbox does) for its go signal, then allocating.
    let (r, w) = nix::unistd::pipe().unwrap();
    let script = format!("read x <&{fd}; exec tail /dev/zero", fd = r.as_raw_fd());
    let mut hog = spawn_in(&cg, &script);
    drop(r);
    wait_until("the waiter to start", Duration::from_secs(5), || {
        !cg.is_empty()
    });
    cg.freeze().unwrap();
    cg.apply(&Limits {
        memory_bytes: Some(24 << 20),
        cpus: Some(0.25),
        pids: Some(4),
    })
    .unwrap();
    cg.thaw().unwrap();
    nix::unistd::write(&w, b"go\n").unwrap();
    let status = hog.0.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    assert!(
        cg.usage().oom_kills >= 1,
        "the new memory limit did not hold"
    );
}

#[test]
fn destroy_removes_every_hierarchy_even_with_processes_inside() {
    let root = root();
    let cg = root.create(&unique_name("test")).unwrap();
    let dirs: Vec<_> = cg.dirs().map(|d| d.to_path_buf()).collect();
    let _s = spawn_in(&cg, "sleep 300");
    wait_until("sleep to start", Duration::from_secs(5), || !cg.is_empty());
    cg.destroy().unwrap();
    for d in dirs {
        assert!(!d.exists(), "{} still exists", d.display());
    }
}

/// clone3(CLONE_INTO_CGROUP) (v2 only): the child starts life in `cg`, never outside it.
/// The child only calls async-signal-safe functions (dup2, execve, _exit).
fn clone_into(cg: &SandboxCgroup, argv: &[&str], stdout: Option<&OwnedFd>) -> i32 {
    let dir = std::fs::File::open(cg.dir("pids")).unwrap();
    let c_argv: Vec<CString> = argv.iter().map(|a| CString::new(*a).unwrap()).collect();
    let mut ptrs: Vec<*const libc::c_char> = c_argv.iter().map(|a| a.as_ptr()).collect();
    ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
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
    let mut args = CloneArgs {
        flags: 0x2_0000_0000, // CLONE_INTO_CGROUP
        exit_signal: libc::SIGCHLD as u64,
        cgroup: dir.as_raw_fd() as u64,
        ..Default::default()
    };
    let out = stdout.map(|f| f.as_raw_fd()).unwrap_or(-1);
    // SAFETY: fork-like clone3 (no CLONE_VM, no stack). The child only calls dup2, execve
    // and _exit on data prepared before the call.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone3,
            &mut args as *mut CloneArgs,
            std::mem::size_of::<CloneArgs>(),
        )
    };
    assert!(pid >= 0, "clone3: {}", std::io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: see above.
        unsafe {
            if out >= 0 {
                libc::dup2(out, 1);
            }
            libc::execve(ptrs[0], ptrs.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    pid as i32
}

fn reap(pid: i32) {
    // SAFETY: kill/waitpid on a child this test created.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

#[test]
fn clone3_into_cgroup_starts_the_child_inside() {
    let root = root();
    if !v2_available(&root, "clone3_into_cgroup_starts_the_child_inside") {
        return;
    }
    let cg = TestCgroup::new(&root);
    let pid = clone_into(&cg, &["/bin/sleep", "300"], None);
    let membership = read(format!("/proc/{pid}/cgroup").into());
    reap(pid);
    assert!(
        membership.contains(cg.name()),
        "child is in {membership}, not in {}",
        cg.name()
    );
}

#[test]
fn clone3_into_a_frozen_cgroup_is_born_frozen() {
    let root = root();
    if !v2_available(&root, "clone3_into_a_frozen_cgroup_is_born_frozen") {
        return;
    }
    let cg = TestCgroup::new(&root);
    cg.freeze().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let pid = clone_into(&cg, &["/bin/echo", "born"], Some(&w));
    drop(w);
    // SAFETY: r is a pipe read end we own; O_NONBLOCK so the check does not hang.
    unsafe {
        let fl = libc::fcntl(r.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(r.as_raw_fd(), libc::F_SETFL, fl | libc::O_NONBLOCK);
    }
    let mut file = std::fs::File::from(r);
    std::thread::sleep(Duration::from_millis(300));
    let mut buf = [0u8; 16];
    let early = file.read(&mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a child born into a frozen cgroup ran: {early:?}"
    );
    assert_eq!(cg.procs(), vec![pid]);
    cg.thaw().unwrap();
    let mut out = String::new();
    wait_until("the thawed child to write", Duration::from_secs(5), || {
        let mut b = [0u8; 16];
        if let Ok(n) = file.read(&mut b) {
            out.push_str(&String::from_utf8_lossy(&b[..n]));
        }
        out.contains("born")
    });
    reap(pid);
}
