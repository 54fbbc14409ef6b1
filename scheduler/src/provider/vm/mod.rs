//! Linux VMs under qemu for tests and for the `qemu` provider's hosts
//! ([`super::qemu`]): boot Debian's kernel with a pure cgroup v2 hierarchy, run a host
//! command inside, get its exit status and output back.
//!
//! The guest needs no disk image. Its initramfs (generated per run) holds a static
//! busybox, the modules for virtio-9p and overlayfs, and an `/init` that mounts the host's
//! `/` read-only over virtio-9p, puts a tmpfs overlay on top, mounts cgroup2 at
//! `/sys/fs/cgroup` and `chroot`s into the result, so the binaries under test run unchanged,
//! at their host paths, as root. Results travel back over the serial console between
//! per-boot markers; the guest has no network unless asked for qemu's user-mode one
//! ([`GuestOptions::network`]).
//!
//! Why all of `/` rather than a list of directories: the binaries under test, their shared
//! libraries, the sandbox root filesystems in `/var/lib/hatchery` and the working
//! directory are wherever the host has them, and no list has to be kept in sync. The guest
//! runs them as root with the host's files, which is the trust of running them as root on
//! the host, but cannot change anything there: qemu exports the tree with `readonly=on` and
//! the overlay's writes live in guest memory. `/run`, `/dev` and `/dev/shm` are fresh in
//! the guest; `/tmp` and `/var/tmp` show the host's files (a checkout under `/tmp` must be
//! reachable as the working directory) with writes in guest memory too. Results that must
//! reach the host go through the console or a writable [`GuestShare`].
//!
//! | module | owns |
//! |---|---|
//! | [`kernel`] | picking the kernel; decompressing a `bzImage` into a PVH-bootable `vmlinux` |
//! | [`modules`] | `modules.dep`: the modules the guest loads, dependencies first |
//! | [`cpio`] | the `newc` archive writer |
//! | [`initramfs`] | the initramfs: busybox, modules, `/init`, the job script |
//! | [`qemu`] | one qemu process: KVM or TCG, time limit, always killed and reaped |
//! | [`serial`] | the console markers and the incremental scanner |
//! | [`guest`] | one command in one fresh VM, and the cgroup v2 check |
//!
//! Nothing here mounts, loads modules or touches cgroups on the host: all of that happens
//! inside the guest. Teardown is guaranteed by [`qemu::RunningVm`]'s `Drop` (SIGKILL to
//! qemu's process group, then reap) and by temporary directories that remove themselves.

pub mod cpio;
pub mod guest;
pub mod initramfs;
pub mod kernel;
pub mod modules;
pub mod qemu;
pub mod serial;

pub use guest::{
    cgroup_check_command, run_in_guest, BootImage, CgroupCheck, GuestError, GuestExit,
    GuestOptions, GuestOutcome, GuestProgress, GuestShare,
};
pub use initramfs::{GuestCommand, GUEST_BUSYBOX};
pub use kernel::Kernel;
pub use qemu::{Accel, AccelChoice, RunningVm, Share, Vm, VmError, VmExit, VmSpec};
