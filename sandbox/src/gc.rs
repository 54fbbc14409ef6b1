//! Reaping sandboxes whose supervisor died.
//!
//! Every sandbox cgroup is named `<kind>-<owner pid>-<owner start time>-<random>`. A
//! supervisor killed with SIGKILL takes its sandbox down with it (the sandbox's init has a
//! parent-death signal, and the pid namespace dies with its init), but the cgroup stays
//! behind. Any later start, or `sandbox gc`, finds cgroups whose owner is gone (or whose pid
//! now belongs to a different process: the start time differs) and removes them, killing
//! whatever is still inside.

use std::fs;

use crate::cgroup::{CgroupError, CgroupRoot};

/// A cgroup name's owner: pid and the process's start time in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    pub pid: i32,
    pub start_time: u64,
}

impl Owner {
    /// The calling process.
    pub fn current() -> Owner {
        let pid = std::process::id() as i32;
        Owner {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
        }
    }

    /// The process exists, is the same one (start time), and is not a zombie (a dead
    /// owner whose parent has not reaped it yet is dead for us).
    pub fn is_alive(&self) -> bool {
        match process_stat(self.pid) {
            Some((state, start)) => start == self.start_time && state != 'Z' && state != 'X',
            None => false,
        }
    }
}

/// A fresh cgroup name for a sandbox of `kind` owned by the calling process.
pub fn unique_name(kind: &str) -> String {
    let owner = Owner::current();
    let mut rnd = [0u8; 6];
    // getrandom never fails for small buffers on Linux ≥ 3.17; a zero suffix would only
    // make a collision with a concurrent run of the same pid impossible anyway.
    // SAFETY: getrandom writes at most rnd.len() bytes into rnd.
    unsafe { libc::getrandom(rnd.as_mut_ptr().cast(), rnd.len(), 0) };
    let hex: String = rnd.iter().map(|b| format!("{b:02x}")).collect();
    format!("{kind}-{}-{}-{hex}", owner.pid, owner.start_time)
}

/// Parses the owner out of a name made by [`unique_name`].
pub fn owner_of(name: &str) -> Option<Owner> {
    let mut parts = name.splitn(4, '-');
    let _kind = parts.next()?;
    let pid = parts.next()?.parse().ok()?;
    let start_time = parts.next()?.parse().ok()?;
    parts.next()?;
    Some(Owner { pid, start_time })
}

/// Field 22 of `/proc/<pid>/stat`.
pub fn process_start_time(pid: i32) -> Option<u64> {
    process_stat(pid).map(|(_, start)| start)
}

/// State (field 3) and start time (field 22) of `/proc/<pid>/stat`.
fn process_stat(pid: i32) -> Option<(char, u64)> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// What a collection found and did.
#[derive(Debug, Default)]
pub struct GcSummary {
    pub removed: Vec<String>,
    pub failed: Vec<(String, CgroupError)>,
    /// Sandbox cgroups whose owner still runs.
    pub kept: usize,
    /// Directories that are not sandbox cgroups (nested parents such as a test's).
    pub other: usize,
}

/// Removes every sandbox cgroup under `root` whose owner is dead.
pub fn collect(root: &CgroupRoot) -> GcSummary {
    let mut summary = GcSummary::default();
    // Pooled sandboxes (`sb-`) before everything else: a zygote's pid namespace cannot end
    // while a (frozen) sandbox forked from it still exists.
    let mut names = root.children();
    names.sort_by_key(|n| !n.starts_with("sb-"));
    for name in names {
        match owner_of(&name) {
            Some(owner) if !owner.is_alive() => match root.open(&name).and_then(|c| c.destroy()) {
                Ok(()) => summary.removed.push(name),
                Err(e) => summary.failed.push((name, e)),
            },
            Some(_) => summary.kept += 1,
            None => summary.other += 1,
        }
    }
    summary
}

/// Waits until process `pid` is gone, then collects its leftovers (and every other
/// orphan). `sandbox reap-after` runs this for a pool owner that might be killed.
pub fn reap_after(pid: i32, root: &CgroupRoot) -> std::io::Result<GcSummary> {
    // SAFETY: pidfd_open with a pid and no flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd >= 0 {
        let mut pfd = libc::pollfd {
            fd: fd as i32,
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one pollfd we own; infinite timeout.
            let r = unsafe { libc::poll(&mut pfd, 1, -1) };
            if r > 0
                || (r < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR))
            {
                break;
            }
        }
        // SAFETY: closing the pidfd we opened.
        unsafe { libc::close(fd as i32) };
    } else if std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH) {
        return Err(std::io::Error::last_os_error());
    }
    Ok(collect(root))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_their_owner() {
        let name = unique_name("run");
        let owner = owner_of(&name).unwrap();
        assert_eq!(owner, Owner::current());
        assert!(owner.is_alive());
        assert!(owner_of("stranger").is_none());
        assert!(owner_of("run-1-2").is_none());
    }

    #[test]
    fn a_zombie_owner_is_dead() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id() as i32;
        let owner = Owner {
            pid,
            start_time: process_start_time(pid).unwrap_or(0),
        };
        // Not reaped yet: a zombie once it has exited.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while process_stat(pid).map(|s| s.0) != Some('Z') {
            assert!(std::time::Instant::now() < deadline, "child never exited");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!owner.is_alive());
        child.wait().unwrap();
    }

    #[test]
    fn a_dead_or_recycled_pid_is_not_alive() {
        let me = Owner::current();
        let recycled = Owner {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(!recycled.is_alive());
        let dead = Owner {
            pid: i32::MAX,
            start_time: 1,
        };
        assert!(!dead.is_alive());
    }
}
