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

    pub fn is_alive(&self) -> bool {
        process_start_time(self.pid) == Some(self.start_time)
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
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// What a collection found and did.
#[derive(Debug, Default)]
pub struct GcSummary {
    pub removed: Vec<String>,
    pub failed: Vec<(String, CgroupError)>,
    pub kept: usize,
}

/// Removes every sandbox cgroup under `root` whose owner is dead.
pub fn collect(root: &CgroupRoot) -> GcSummary {
    let mut summary = GcSummary::default();
    for name in root.children() {
        match owner_of(&name) {
            Some(owner) if !owner.is_alive() => match root.open(&name).and_then(|c| c.destroy()) {
                Ok(()) => summary.removed.push(name),
                Err(e) => summary.failed.push((name, e)),
            },
            _ => summary.kept += 1,
        }
    }
    summary
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
