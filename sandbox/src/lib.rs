//! Hatchery's sandbox runtime: runs one process tree confined by Linux namespaces, a
//! cgroup (v2, or v1 on hybrid hosts), a read-only root filesystem, dropped capabilities,
//! `no_new_privs`, rlimits and a seccomp allow-list.
//!
//! The crate is usable on its own (the `sandbox` binary is a thin layer over [`run::run`])
//! and is the base the warm pool and the per-host agent build on.
//!
//! | module | owns |
//! |---|---|
//! | [`cgroup`] | sandbox cgroups under Hatchery's parent, v1 and v2 behind one interface |
//! | [`spec`] | what runs inside and how it is confined |
//! | [`run`] | the supervisor: clone, place, release, watch, kill, clean up |
//! | [`container`] | the inside: the fixed containment sequence of init and worker |
//! | [`mounts`] | the root filesystem, `/proc`, `/dev`, tmpfs, pivot_root |
//! | [`seccomp`] | OCI seccomp profiles compiled with libseccomp |
//! | [`gc`] | reaping the leftovers of killed supervisors |
//! | [`report`] | how a run ended, and the exit code rules |
//! | [`pool`], [`zygote`] | the warm pool of frozen sandboxes forked from a zygote, and the claim |
//! | [`upstream`] | the frames a sandbox sends its owner, read as hostile input |

pub mod artifacts;
pub mod cgroup;
pub mod channel;
pub mod container;
pub mod frame;
pub mod gc;
pub mod limits;
pub mod mounts;
pub mod pool;
pub mod py;
pub mod r;
pub mod report;
pub mod run;
pub mod seccomp;
pub mod spec;
pub mod upstream;
pub mod zygote;

pub use limits::Limits;
pub use report::{Report, Status};
pub use run::{run, RunOptions};
pub use spec::SandboxSpec;

/// Where `rootfs-builder` puts the default image (a symlink to the current build).
pub const DEFAULT_ROOTFS: &str = "/var/lib/hatchery/rootfs/r";
