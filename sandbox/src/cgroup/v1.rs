//! The cgroup v1 half of [`SandboxCgroup`](super::SandboxCgroup): the memory + memsw pair,
//! `freezer.state`, and counters spread over `cpuacct`, `memory` and `pids`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cgroups_rs::fs::memory::MemController;

use super::{
    io_err, keyed, parse_u64, write_file, CgroupError, FreezerFiles, Result, SandboxCgroup, Usage,
};

const STATE_TIMEOUT: Duration = Duration::from_secs(5);

/// Best-effort defaults for a fresh cgroup: never swap a sandbox's memory out.
pub(super) fn prepare(cg: &SandboxCgroup) -> Result<()> {
    write_file(&cg.dir("memory").join("memory.swappiness"), "0")
}

/// Sets `memory.limit_in_bytes` and, where swap accounting exists, `memory.memsw.limit_in_bytes`
/// to the same value, so the limit covers memory + swap (no swap). The kernel requires
/// limit ≤ memsw at every moment, so the order of the two writes depends on the direction.
pub(super) fn set_memory(
    cg: &SandboxCgroup,
    mem: &MemController,
    bytes: Option<u64>,
) -> Result<()> {
    let value = bytes.map(|b| b as i64).unwrap_or(-1);
    let memsw = cg.dir("memory").join("memory.memsw.limit_in_bytes");
    let has_memsw = memsw.exists();
    let set_limit = || {
        mem.set_limit(value).map_err(|source| CgroupError::Limit {
            what: "memory.limit_in_bytes",
            path: cg.name().to_string(),
            source,
        })
    };
    if !has_memsw {
        return set_limit();
    }
    let set_memsw = || write_file(&memsw, &value.to_string());
    // Lowering (or setting from unlimited): limit first. Raising: memsw first.
    if set_limit().is_ok() {
        set_memsw()
    } else {
        set_memsw()?;
        set_limit()
    }
}

pub(super) fn freeze(cg: &SandboxCgroup) -> Result<()> {
    set_freezer_state(cg, "FROZEN")
}

pub(super) fn thaw(cg: &SandboxCgroup) -> Result<()> {
    set_freezer_state(cg, "THAWED")
}

/// `freezer.state`, opened to be written and read again and again.
pub(super) fn open_freezer(cg: &SandboxCgroup) -> Result<FreezerFiles> {
    let path = cg.dir("freezer").join("freezer.state");
    let control = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| io_err("open", &path, e))?;
    Ok(FreezerFiles {
        control,
        events: None,
    })
}

/// Writes `state` and waits until `freezer.state` reads it back. While the kernel reports
/// `FREEZING` (a task could not be frozen yet) the write is repeated, as youki does.
fn set_freezer_state(cg: &SandboxCgroup, state: &'static str) -> Result<()> {
    let files = cg.freezer_files()?;
    let path = || cg.dir("freezer").join("freezer.state");
    let deadline = Instant::now() + STATE_TIMEOUT;
    let mut pause = Duration::from_micros(20);
    loop {
        files
            .write(state)
            .map_err(|e| io_err("write", &path(), e))?;
        let reached = files
            .read_state(|now| now.trim() == state)
            .map_err(|e| io_err("read", &path(), e))?;
        if reached {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::Timeout {
                path: path(),
                state,
                timeout: STATE_TIMEOUT,
            });
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

/// v1 has no `cgroup.kill`: freeze so nothing can fork, SIGKILL every member, thaw so the
/// signals are delivered, then wait for the cgroup to empty.
pub(super) fn kill_all(cg: &SandboxCgroup) -> Result<()> {
    let deadline = Instant::now() + STATE_TIMEOUT;
    loop {
        let frozen = freeze(cg).is_ok();
        for pid in cg.procs() {
            // SAFETY: kill(2) with a pid read from this cgroup's procs file; the process is
            // frozen, so the pid cannot be recycled before the signal is queued.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        if frozen {
            thaw(cg)?;
        }
        let wait_until = Instant::now() + Duration::from_millis(500);
        while Instant::now() < wait_until {
            if cg.is_empty() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if Instant::now() >= deadline {
            return Err(CgroupError::NotEmpty {
                path: cg.dir("pids").to_path_buf(),
            });
        }
    }
}

/// The files of [`parse_usage`], in its order.
pub(super) fn usage_paths(cg: &SandboxCgroup) -> Vec<PathBuf> {
    let acct = cg.dir("cpuacct");
    let mem = cg.dir("memory");
    vec![
        acct.join("cpuacct.usage_user"),
        acct.join("cpuacct.usage_sys"),
        mem.join("memory.usage_in_bytes"),
        mem.join("memory.max_usage_in_bytes"),
        mem.join("memory.oom_control"),
        cg.dir("pids").join("pids.current"),
    ]
}

/// Usage from the texts of [`usage_paths`]' files.
pub(super) fn parse_usage(texts: &[String]) -> Usage {
    let text = |i: usize| texts.get(i).map(String::as_str).unwrap_or("");
    Usage {
        user_cpu_ns: parse_u64(text(0)).unwrap_or(0),
        system_cpu_ns: parse_u64(text(1)).unwrap_or(0),
        memory_current_bytes: parse_u64(text(2)).unwrap_or(0),
        memory_peak_bytes: parse_u64(text(3)).unwrap_or(0),
        oom_kills: keyed(text(4), "oom_kill").unwrap_or(0),
        pids_current: parse_u64(text(5)).unwrap_or(0),
    }
}
