//! Control groups for sandboxes, on cgroup v2 and on cgroup v1 / hybrid hosts, behind one
//! interface.
//!
//! This module owns every cgroup Hatchery creates: all of them live under one parent
//! (`hatchery/` by default) in each hierarchy, one child per sandbox. The setup of the host
//! (pure v2, or v1 controllers as on hybrid hosts) is detected once by [`CgroupRoot::detect`].
//! Creation, limits and task attachment go through `cgroups-rs`; the parts that crate does not
//! cover (freezing with a wait for the kernel to confirm, `cgroup.kill`, OOM-kill counters,
//! peak memory, the directory fd that `clone3(CLONE_INTO_CGROUP)` needs) are written here,
//! one function per version in [`v1`] and [`v2`].
//!
//! It must never touch a cgroup outside its parent.

pub mod v1;
pub mod v2;

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use cgroups_rs::fs::cgroup::Cgroup;
use cgroups_rs::fs::cpu::CpuController;
use cgroups_rs::fs::hierarchies::{self, V1, V2};
use cgroups_rs::fs::memory::MemController;
use cgroups_rs::fs::pid::PidController;
use cgroups_rs::fs::{Controllers, Hierarchy, MaxValue};
use serde::Serialize;

use crate::limits::Limits;

/// The controllers a sandbox cgroup is created in on v1 hosts. `cpuacct` gives the
/// user/system CPU split, `freezer` holds pooled sandboxes frozen.
pub const V1_CONTROLLERS: [&str; 5] = ["cpu", "cpuacct", "memory", "pids", "freezer"];
/// The controllers enabled for sandbox cgroups on v2 hosts (the freezer is built in).
pub const V2_CONTROLLERS: [&str; 3] = ["cpu", "memory", "pids"];

/// CFS period used to express fractional CPU limits as a quota.
pub const CPU_PERIOD_US: u64 = 100_000;

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("no usable cgroup hierarchy: {0}")]
    NoHierarchy(String),
    #[error("cgroup name {0:?} is not a plain name")]
    BadName(String),
    #[error("cannot create cgroup {path}: {source}")]
    Create {
        path: String,
        source: cgroups_rs::fs::error::Error,
    },
    #[error("cannot set {what} on cgroup {path}: {source}")]
    Limit {
        what: &'static str,
        path: String,
        source: cgroups_rs::fs::error::Error,
    },
    #[error("cannot move pid {pid} into cgroup {path}: {source}")]
    Attach {
        pid: i32,
        path: String,
        source: cgroups_rs::fs::error::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path} did not reach state {state} within {timeout:?}")]
    Timeout {
        path: PathBuf,
        state: &'static str,
        timeout: Duration,
    },
    #[error("cgroup {path} still has processes after being killed")]
    NotEmpty { path: PathBuf },
}

pub type Result<T> = std::result::Result<T, CgroupError>;

pub(crate) fn io_err(op: &'static str, path: &Path, source: std::io::Error) -> CgroupError {
    CgroupError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Which cgroup setup this host runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupVersion {
    /// v1 controllers (legacy or hybrid hosts).
    V1,
    /// Pure unified hierarchy.
    V2,
}

impl std::fmt::Display for CgroupVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CgroupVersion::V1 => "v1",
            CgroupVersion::V2 => "v2",
        })
    }
}

/// Resource usage read from a sandbox cgroup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub user_cpu_ns: u64,
    pub system_cpu_ns: u64,
    pub memory_current_bytes: u64,
    pub memory_peak_bytes: u64,
    /// How many processes the kernel OOM-killed in this cgroup.
    pub oom_kills: u64,
    pub pids_current: u64,
}

/// A cgroup's usage files, open ([`SandboxCgroup::usage_files`]). A file that could not
/// be opened reads as nothing, and its figures as 0, as [`SandboxCgroup::usage`] always did.
#[derive(Debug)]
pub struct UsageFiles {
    version: CgroupVersion,
    files: Vec<Option<fs::File>>,
}

impl UsageFiles {
    /// Reads every file from its start (a cgroup file is generated afresh at offset 0).
    pub fn read(&self) -> Usage {
        use std::os::unix::fs::FileExt;
        let texts: Vec<String> = self
            .files
            .iter()
            .map(|f| {
                let mut buf = [0u8; 2048];
                f.as_ref()
                    .and_then(|f| f.read_at(&mut buf, 0).ok())
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
                    .unwrap_or_default()
            })
            .collect();
        match self.version {
            CgroupVersion::V1 => v1::parse_usage(&texts),
            CgroupVersion::V2 => v2::parse_usage(&texts),
        }
    }
}

/// The parent cgroup Hatchery owns, in whichever setup the host has.
#[derive(Debug, Clone)]
pub struct CgroupRoot {
    version: CgroupVersion,
    /// Parent path relative to each hierarchy's root, e.g. `hatchery`.
    parent: String,
    /// v1: controller name → absolute directory of the parent. v2: the single directory.
    dirs: Vec<(String, PathBuf)>,
}

impl CgroupRoot {
    /// Detects the host's cgroup setup and returns a handle on Hatchery's parent cgroup
    /// (created on first use).
    pub fn detect(parent: &str) -> Result<CgroupRoot> {
        check_name_path(parent)?;
        if hierarchies::is_cgroup2_unified_mode() {
            let root = V2::new().root();
            let dirs = vec![("unified".to_string(), root.join(parent))];
            Ok(CgroupRoot {
                version: CgroupVersion::V2,
                parent: parent.to_string(),
                dirs,
            })
        } else {
            let v1 = V1::new();
            let mut dirs = Vec::new();
            for name in V1_CONTROLLERS {
                let controller = v1_controller(name);
                let (mount_point, _root) = v1.get_mount_point(controller).ok_or_else(|| {
                    CgroupError::NoHierarchy(format!(
                        "the v1 {name} controller is not mounted (cgroup v2 is not the \
                         unified setup either)"
                    ))
                })?;
                dirs.push((name.to_string(), mount_point.join(parent)));
            }
            Ok(CgroupRoot {
                version: CgroupVersion::V1,
                parent: parent.to_string(),
                dirs,
            })
        }
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    pub fn parent(&self) -> &str {
        &self.parent
    }

    /// The directory of the parent in the first (v1) or only (v2) hierarchy.
    pub fn parent_dir(&self) -> &Path {
        &self.dirs[0].1
    }

    fn hierarchy(&self) -> Box<dyn Hierarchy> {
        match self.version {
            CgroupVersion::V1 => Box::new(V1::new()),
            CgroupVersion::V2 => Box::new(V2::new()),
        }
    }

    fn controllers(&self) -> Vec<String> {
        match self.version {
            CgroupVersion::V1 => V1_CONTROLLERS.iter().map(|s| s.to_string()).collect(),
            CgroupVersion::V2 => V2_CONTROLLERS.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Creates the cgroup `name` under the parent, with no limits yet.
    pub fn create(&self, name: &str) -> Result<SandboxCgroup> {
        check_name(name)?;
        let rel = format!("{}/{}", self.parent, name);
        let cg = Cgroup::new_with_specified_controllers(
            self.hierarchy(),
            rel.clone(),
            Some(self.controllers()),
        )
        .map_err(|source| CgroupError::Create {
            path: rel.clone(),
            source,
        })?;
        let sandbox = SandboxCgroup {
            version: self.version,
            name: name.to_string(),
            dirs: self
                .dirs
                .iter()
                .map(|(c, d)| (c.clone(), d.join(name)))
                .collect(),
            cg,
            freezer: OnceLock::new(),
        };
        if self.version == CgroupVersion::V1 {
            // Keep the OOM killer on and memory hierarchical (the default on current kernels).
            let _ = v1::prepare(&sandbox);
        }
        Ok(sandbox)
    }

    /// Writes a ceiling into the parent itself (created if missing): memory and pids
    /// limits that hold for all of Hatchery's sandboxes on this host together, whatever
    /// each sandbox's own limits say (`None` lifts that ceiling). CPU is not capped here.
    pub fn set_ceiling(&self, memory_bytes: Option<u64>, pids: Option<u64>) -> Result<()> {
        let cg = self.create_parent()?;
        let parent = SandboxCgroup {
            version: self.version,
            name: self.parent.clone(),
            dirs: self.dirs.clone(),
            cg,
            freezer: OnceLock::new(),
        };
        parent.apply(&Limits {
            memory_bytes,
            cpus: None,
            pids,
        })
    }

    /// The parent itself, created if missing (with its controllers).
    fn create_parent(&self) -> Result<Cgroup> {
        Cgroup::new_with_specified_controllers(
            self.hierarchy(),
            self.parent.clone(),
            Some(self.controllers()),
        )
        .map_err(|source| CgroupError::Create {
            path: self.parent.clone(),
            source,
        })
    }

    /// cgroup v2: lets `owner` (host uid, gid) write the parent's `cgroup.procs` (the
    /// parent created if missing), or root alone again with `None`. A parent with
    /// controllers enabled for its children can hold no process itself, so this moves
    /// nothing into it: it is the common-ancestor permission that a zygote needs to fork
    /// sandboxes into their cgroups (see [`SandboxCgroup::let_procs_be_written_by`]).
    /// v1: nothing to do.
    pub fn let_procs_be_written_by(&self, owner: Option<(u32, u32)>) -> Result<()> {
        match self.version {
            CgroupVersion::V2 => {
                self.create_parent()?;
                v2::set_procs_owner(self.parent_dir(), owner)
            }
            CgroupVersion::V1 => Ok(()),
        }
    }

    /// Opens an existing sandbox cgroup (for cleanup of orphans).
    pub fn open(&self, name: &str) -> Result<SandboxCgroup> {
        check_name(name)?;
        let rel = format!("{}/{}", self.parent, name);
        let cg = Cgroup::load_with_specified_controllers(self.hierarchy(), rel, self.controllers());
        Ok(SandboxCgroup {
            version: self.version,
            name: name.to_string(),
            dirs: self
                .dirs
                .iter()
                .map(|(c, d)| (c.clone(), d.join(name)))
                .collect(),
            cg,
            freezer: OnceLock::new(),
        })
    }

    /// Removes the parent itself, in every hierarchy, if nothing is left in it; true when
    /// it is gone. Never touches anything but the parent's own directories. For tests
    /// and `sandbox gc`: a platform keeps its parent while it runs.
    pub fn remove_if_empty(&self) -> Result<bool> {
        for (_, dir) in &self.dirs {
            match fs::remove_dir(dir) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY) | Some(libc::ENOTEMPTY)) => {
                    return Ok(false)
                }
                Err(e) => return Err(io_err("remove cgroup parent", dir, e)),
            }
        }
        Ok(true)
    }

    /// Names of the sandbox cgroups that exist under the parent, in any hierarchy.
    pub fn children(&self) -> Vec<String> {
        let mut names: Vec<String> = Vec::new();
        for (_, dir) in &self.dirs {
            let Ok(entries) = fs::read_dir(dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
        names.sort();
        names
    }
}

fn v1_controller(name: &str) -> Controllers {
    match name {
        "cpu" => Controllers::Cpu,
        "cpuacct" => Controllers::CpuAcct,
        "memory" => Controllers::Mem,
        "pids" => Controllers::Pids,
        "freezer" => Controllers::Freezer,
        other => unreachable!("no v1 controller {other} is used"),
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(CgroupError::BadName(name.to_string()))
    }
}

fn check_name_path(path: &str) -> Result<()> {
    for part in path.split('/') {
        check_name(part)?;
    }
    Ok(())
}

/// A cgroup's CPU weight when nothing else is said (cgroup v2's `cpu.weight` default;
/// `cpu.shares` 1024 on v1).
pub const DEFAULT_CPU_WEIGHT: u32 = 100;

/// One sandbox's cgroup (a directory per controller on v1, one directory on v2).
#[derive(Debug)]
pub struct SandboxCgroup {
    version: CgroupVersion,
    name: String,
    dirs: Vec<(String, PathBuf)>,
    cg: Cgroup,
    /// The freezer's files, opened by the first freeze or thaw and kept (see
    /// [`FreezerFiles`]).
    freezer: OnceLock<FreezerFiles>,
}

/// The files a freeze or a thaw writes and reads, kept open: each open of a cgroupfs file
/// walks its path (~8 µs each on v1, more under load), and a claim's thaw would otherwise
/// open two. The first freeze of a pooled sandbox opens them, off any claim's path.
#[derive(Debug)]
struct FreezerFiles {
    /// v1: `freezer.state`; v2: `cgroup.freeze`.
    control: fs::File,
    /// Where the kernel confirms a change, when that is another file: v2's
    /// `cgroup.events`. v1 confirms in `freezer.state` itself.
    events: Option<fs::File>,
}

impl FreezerFiles {
    /// Writes `value` at the start of the control file, as one write.
    fn write(&self, value: &str) -> std::io::Result<()> {
        let n = self.control.write_at(value.as_bytes(), 0)?;
        if n == value.len() {
            Ok(())
        } else {
            Err(std::io::Error::other(format!(
                "short write: {n} of {} bytes",
                value.len()
            )))
        }
    }

    /// Reads the file that confirms a change whole from its start (`pread` into a buffer
    /// on the stack, so nothing is allocated on a claim's thaw) and hands its text to `f`.
    fn read_state<T>(&self, f: impl FnOnce(&str) -> T) -> std::io::Result<T> {
        let file = self.events.as_ref().unwrap_or(&self.control);
        let mut buf = [0u8; 512];
        let mut len = 0;
        while len < buf.len() {
            match file.read_at(&mut buf[len..], len as u64)? {
                0 => break,
                n => len += n,
            }
        }
        std::str::from_utf8(&buf[..len])
            .map(f)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

impl SandboxCgroup {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> CgroupVersion {
        self.version
    }

    /// The directory of `controller` (v1) or the only directory (v2).
    pub fn dir(&self, controller: &str) -> &Path {
        match self.version {
            CgroupVersion::V2 => &self.dirs[0].1,
            CgroupVersion::V1 => self
                .dirs
                .iter()
                .find(|(c, _)| c == controller)
                .map(|(_, d)| d.as_path())
                .unwrap_or(&self.dirs[0].1),
        }
    }

    /// The freezer's files, opened by the first call and kept (see [`FreezerFiles`]).
    fn freezer_files(&self) -> Result<&FreezerFiles> {
        if let Some(files) = self.freezer.get() {
            return Ok(files);
        }
        let files = match self.version {
            CgroupVersion::V1 => v1::open_freezer(self)?,
            CgroupVersion::V2 => v2::open_freezer(self)?,
        };
        Ok(self.freezer.get_or_init(|| files))
    }

    /// Every directory of this cgroup, one per hierarchy.
    pub fn dirs(&self) -> impl Iterator<Item = &Path> {
        self.dirs.iter().map(|(_, d)| d.as_path())
    }

    /// cgroup v2: lets `owner` (host uid, gid) write this cgroup's `cgroup.procs` — for as
    /// long as one fork into it takes — or root alone again with `None`. v1: nothing to do.
    pub fn let_procs_be_written_by(&self, owner: Option<(u32, u32)>) -> Result<()> {
        match self.version {
            CgroupVersion::V2 => v2::set_procs_owner(&self.dirs[0].1, owner),
            CgroupVersion::V1 => Ok(()),
        }
    }

    /// Writes memory (without swap), CPU quota and pids limits. Limits left `None` are
    /// reset to unlimited, so applying a new set of limits to a reused cgroup never keeps a
    /// stale value.
    pub fn apply(&self, limits: &Limits) -> Result<()> {
        let path = || self.cg.path().to_string();
        if let Some(mem) = self.cg.controller_of::<MemController>() {
            let bytes = limits.memory_bytes.map(|b| b as i64).unwrap_or(-1);
            match self.version {
                CgroupVersion::V2 => {
                    mem.set_limit(bytes).map_err(|source| CgroupError::Limit {
                        what: "memory.max",
                        path: path(),
                        source,
                    })?;
                    v2::set_swap_max(self, limits.memory_bytes.map(|_| 0))?;
                }
                CgroupVersion::V1 => v1::set_memory(self, mem, limits.memory_bytes)?,
            }
        }
        if let Some(cpu) = self.cg.controller_of::<CpuController>() {
            let quota = limits
                .cpus
                .map(|c| ((c * CPU_PERIOD_US as f64).round() as i64).max(1000))
                .unwrap_or(-1);
            cpu.set_cfs_quota_and_period(Some(quota), Some(CPU_PERIOD_US))
                .map_err(|source| CgroupError::Limit {
                    what: "cpu quota",
                    path: path(),
                    source,
                })?;
        }
        if let Some(pids) = self.cg.controller_of::<PidController>() {
            let max = match limits.pids {
                Some(n) => MaxValue::Value(n as i64),
                None => MaxValue::Max,
            };
            pids.set_pid_max(max).map_err(|source| CgroupError::Limit {
                what: "pids.max",
                path: path(),
                source,
            })?;
        }
        Ok(())
    }

    /// Sets this cgroup's share of CPU time against its siblings when CPUs are contended:
    /// `weight` on cgroup v2's scale (1–10000, default [`DEFAULT_CPU_WEIGHT`]); on v1 the
    /// same proportion of `cpu.shares` (default 1024). It limits nothing while CPUs are idle.
    pub fn set_cpu_weight(&self, weight: u32) -> Result<()> {
        let weight = weight.clamp(1, 10_000) as u64;
        let value = match self.version {
            CgroupVersion::V2 => weight,
            CgroupVersion::V1 => (weight * 1024 / DEFAULT_CPU_WEIGHT as u64).max(2),
        };
        match self.cg.controller_of::<CpuController>() {
            Some(cpu) => cpu.set_shares(value).map_err(|source| CgroupError::Limit {
                what: "cpu weight",
                path: self.cg.path().to_string(),
                source,
            }),
            None => Ok(()),
        }
    }

    /// Moves process `pid` (all its threads) into this cgroup.
    pub fn add_process(&self, pid: i32) -> Result<()> {
        self.cg
            .add_task_by_tgid(cgroups_rs::CgroupPid::from(pid as u64))
            .map_err(|source| CgroupError::Attach {
                pid,
                path: self.cg.path().to_string(),
                source,
            })
    }

    /// Pids in the cgroup (from the first hierarchy on v1; every task is in all of them).
    pub fn procs(&self) -> Vec<i32> {
        let file = self.dir("pids").join("cgroup.procs");
        fs::read_to_string(file)
            .map(|s| s.lines().filter_map(|l| l.trim().parse().ok()).collect())
            .unwrap_or_default()
    }

    pub fn is_empty(&self) -> bool {
        self.procs().is_empty()
    }

    /// Freezes every process and returns once the kernel reports the cgroup frozen.
    pub fn freeze(&self) -> Result<()> {
        match self.version {
            CgroupVersion::V1 => v1::freeze(self),
            CgroupVersion::V2 => v2::freeze(self),
        }
    }

    /// Thaws the cgroup and returns once the kernel reports it running.
    pub fn thaw(&self) -> Result<()> {
        match self.version {
            CgroupVersion::V1 => v1::thaw(self),
            CgroupVersion::V2 => v2::thaw(self),
        }
    }

    /// Kills every process in the cgroup, including ones that double-forked or called
    /// `setsid`, and waits until the cgroup is empty.
    pub fn kill_all(&self) -> Result<()> {
        match self.version {
            CgroupVersion::V1 => v1::kill_all(self),
            CgroupVersion::V2 => v2::kill_all(self),
        }
    }

    /// Reads CPU time, memory and OOM counters.
    pub fn usage(&self) -> Usage {
        self.usage_files().read()
    }

    /// Opens the files [`usage`](Self::usage) reads, to read them again and again with
    /// `pread`: each open of a cgroupfs file walks its path (~8 µs each on v1, six files).
    /// An execution's watcher opens them while the sandbox starts, so the result's final
    /// reading costs no open on its path.
    pub fn usage_files(&self) -> UsageFiles {
        let paths = match self.version {
            CgroupVersion::V1 => v1::usage_paths(self),
            CgroupVersion::V2 => v2::usage_paths(self),
        };
        UsageFiles {
            version: self.version,
            files: paths.iter().map(|p| fs::File::open(p).ok()).collect(),
        }
    }

    /// Kills whatever is left and removes the cgroup from every hierarchy.
    pub fn destroy(mut self) -> Result<()> {
        if !self.is_empty() {
            self.kill_all()?;
        }
        // Nothing of the cgroup stays open while it is removed.
        drop(self.freezer.take());
        let mut first_err = None;
        for dir in self.dirs() {
            if let Err(e) = remove_dir_retrying(dir) {
                first_err.get_or_insert(e);
            }
        }
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// rmdir of a cgroup can fail with EBUSY for a short while after its last process exited
/// (the kernel releases the css asynchronously).
fn remove_dir_retrying(dir: &Path) -> Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e)
                if e.raw_os_error() == Some(libc::EBUSY)
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(io_err("remove cgroup", dir, e)),
        }
    }
}

pub(crate) fn write_file(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|e| io_err("write", path, e))
}

/// Reads `key value` lines (flat keyed files such as `memory.events`, `cpu.stat`).
pub(crate) fn read_keyed(path: &Path, key: &str) -> Option<u64> {
    keyed(&fs::read_to_string(path).ok()?, key)
}

/// A file holding one number.
pub(crate) fn parse_u64(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// The value of `key` in `key value` lines.
pub(crate) fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        (it.next()? == key).then(|| it.next()?.parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain() {
        assert!(check_name("run-12-34-ab").is_ok());
        assert!(check_name("..").is_err());
        assert!(check_name("a/b").is_err());
        assert!(check_name("").is_err());
        assert!(check_name_path("hatchery/test-1").is_ok());
        assert!(check_name_path("hatchery/../x").is_err());
    }

    #[test]
    fn keyed_files_parse() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("memory.events");
        fs::write(&p, "low 0\nhigh 0\nmax 3\noom 1\noom_kill 2\n").unwrap();
        assert_eq!(read_keyed(&p, "oom_kill"), Some(2));
        assert_eq!(read_keyed(&p, "oom"), Some(1));
        assert_eq!(read_keyed(&p, "missing"), None);
    }
}
