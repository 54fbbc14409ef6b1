//! The cgroup v2 half of [`SandboxCgroup`](super::SandboxCgroup): `memory.swap.max`,
//! `cgroup.freeze` confirmed through `cgroup.events`, `cgroup.kill`, and what
//! `clone3(CLONE_INTO_CGROUP)` needs: the directory fd, and `cgroup.procs` writable by the
//! caller.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::fcntl::{open, OFlag};
use nix::sys::stat::Mode;

use super::{
    io_err, keyed, parse_u64, read_keyed, write_file, CgroupError, FreezerFiles, Result,
    SandboxCgroup, Usage,
};

const STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// `memory.swap.max`: `Some(0)` forbids swap, `None` resets it to `max`. Absent on kernels
/// built without swap accounting, where there is nothing to limit.
pub(super) fn set_swap_max(cg: &SandboxCgroup, bytes: Option<u64>) -> Result<()> {
    let file = cg.dir("memory").join("memory.swap.max");
    if !file.exists() {
        return Ok(());
    }
    let value = bytes.map(|b| b.to_string()).unwrap_or_else(|| "max".into());
    write_file(&file, &value)
}

pub(super) fn freeze(cg: &SandboxCgroup) -> Result<()> {
    set_frozen(cg, true)
}

pub(super) fn thaw(cg: &SandboxCgroup) -> Result<()> {
    set_frozen(cg, false)
}

/// `cgroup.freeze` to be written and `cgroup.events` to be read, again and again.
pub(super) fn open_freezer(cg: &SandboxCgroup) -> Result<FreezerFiles> {
    let dir = cg.dir("freezer");
    let control = dir.join("cgroup.freeze");
    let events = dir.join("cgroup.events");
    Ok(FreezerFiles {
        control: std::fs::OpenOptions::new()
            .write(true)
            .open(&control)
            .map_err(|e| io_err("open", &control, e))?,
        events: Some(std::fs::File::open(&events).map_err(|e| io_err("open", &events, e))?),
    })
}

/// Writes `cgroup.freeze` and waits for `cgroup.events` to report `frozen 1` (or `0`): the
/// write only requests the change; the kernel confirms it once every task has stopped.
fn set_frozen(cg: &SandboxCgroup, frozen: bool) -> Result<()> {
    let files = cg.freezer_files()?;
    let dir = cg.dir("freezer");
    let events = || dir.join("cgroup.events");
    files
        .write(if frozen { "1" } else { "0" })
        .map_err(|e| io_err("write", &dir.join("cgroup.freeze"), e))?;
    let want = u64::from(frozen);
    let deadline = Instant::now() + STATE_TIMEOUT;
    let mut pause = Duration::from_micros(20);
    loop {
        let now = files
            .read_state(|text| keyed(text, "frozen"))
            .map_err(|e| io_err("read", &events(), e))?;
        match now {
            Some(v) if v == want => return Ok(()),
            Some(_) => {}
            None => {
                return Err(io_err(
                    "read frozen from",
                    &events(),
                    std::io::Error::other("no frozen key"),
                ))
            }
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Timeout {
                path: events(),
                state: if frozen { "frozen" } else { "thawed" },
                timeout: STATE_TIMEOUT,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// `cgroup.kill` (Linux 5.14+) kills every process in the subtree atomically, so nothing
/// can escape by forking during the kill; then waits for `populated 0`.
pub(super) fn kill_all(cg: &SandboxCgroup) -> Result<()> {
    let dir = cg.dir("pids");
    let kill = dir.join("cgroup.kill");
    if kill.exists() {
        write_file(&kill, "1")?;
    } else {
        // Older kernels: freeze, signal, thaw, as on v1.
        let frozen = freeze(cg).is_ok();
        for pid in cg.procs() {
            // SAFETY: kill(2) with a pid read from this (frozen) cgroup's procs file.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if frozen {
            thaw(cg)?;
        }
    }
    let events = dir.join("cgroup.events");
    let deadline = Instant::now() + STATE_TIMEOUT;
    while read_keyed(&events, "populated").unwrap_or(0) != 0 {
        if Instant::now() >= deadline {
            return Err(CgroupError::NotEmpty {
                path: dir.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

/// The files of [`parse_usage`], in its order.
pub(super) fn usage_paths(cg: &SandboxCgroup) -> Vec<PathBuf> {
    let dir = cg.dir("memory");
    [
        "cpu.stat",
        "memory.current",
        "memory.peak",
        "memory.events",
        "pids.current",
    ]
    .iter()
    .map(|f| dir.join(f))
    .collect()
}

/// Usage from the texts of [`usage_paths`]' files.
pub(super) fn parse_usage(texts: &[String]) -> Usage {
    let text = |i: usize| texts.get(i).map(String::as_str).unwrap_or("");
    let current = parse_u64(text(1)).unwrap_or(0);
    Usage {
        user_cpu_ns: keyed(text(0), "user_usec").unwrap_or(0) * 1000,
        system_cpu_ns: keyed(text(0), "system_usec").unwrap_or(0) * 1000,
        memory_current_bytes: current,
        // memory.peak exists from Linux 5.19.
        memory_peak_bytes: parse_u64(text(2)).unwrap_or(current),
        oom_kills: keyed(text(3), "oom_kill").unwrap_or(0),
        pids_current: parse_u64(text(4)).unwrap_or(0),
    }
}

/// An `O_PATH` directory fd of the cgroup, for `clone3(CLONE_INTO_CGROUP)`.
pub fn dir_fd(cg: &SandboxCgroup) -> Result<OwnedFd> {
    let dir = cg.dir("pids");
    open(
        dir,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io_err("open", dir, e.into()))
}

/// Makes `cgroup.procs` in `dir` writable by `owner` (host uid, gid) alone, or by root
/// alone again with `None`. A caller without root's privileges may be born in a cgroup
/// (`clone3(CLONE_INTO_CGROUP)`) only if it may write that file in the target cgroup and
/// in the closest common ancestor of its own cgroup and the target.
pub(super) fn set_procs_owner(dir: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    let (uid, gid) = owner.unwrap_or((0, 0));
    let path = dir.join("cgroup.procs");
    nix::unistd::chown(
        &path,
        Some(nix::unistd::Uid::from_raw(uid)),
        Some(nix::unistd::Gid::from_raw(gid)),
    )
    .map_err(|e| io_err("chown", &path, e.into()))
}
