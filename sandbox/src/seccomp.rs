//! Seccomp: OCI `LinuxSeccomp` profiles (the JSON files in `seccomp-profiles/`) turned into a
//! kernel filter.
//!
//! This module owns parsing and validating a profile ([`Profile`]), compiling it with libseccomp
//! ([`Profile::compile`], done in the parent before fork: it allocates and costs about a
//! millisecond) and installing the result in the calling thread.
//!
//! Two ways to install a compiled [`Filter`]:
//!
//! * [`Filter::load`] asks libseccomp to generate and load the program. It allocates, so it is
//!   for processes that have not just forked from a multi-threaded parent.
//! * [`Filter::export_bpf`] renders the program once, in the parent, into a [`BpfProgram`];
//!   [`BpfProgram::load`] (or [`load_bpf`]) installs it with a single `seccomp(2)` call and is
//!   async-signal-safe, so a forked child can use it between fork and exec.
//!
//! What this module must never do: set `no_new_privs` (the runtime sets it itself, in its fixed
//! containment order, before loading the filter), synchronise other threads (no TSYNC: a filter
//! applies to the thread that loads it and to what that thread forks), or allocate on the
//! [`BpfProgram::load`] path.
//!
//! Syscall names a profile lists but libseccomp does not know on this architecture are skipped
//! and reported by [`Filter::skipped_syscalls`]: Docker-style profiles carry names of other
//! architectures. Architectures missing from a profile's `architectures` list are refused with
//! `SCMP_ACT_KILL_PROCESS` (the bad-architecture action), so 32-bit `int 0x80` and x32 system
//! calls cannot sidestep an x86_64 allow-list.

use std::fmt;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use libseccomp::{
    ScmpAction, ScmpArch, ScmpArgCompare, ScmpCompareOp, ScmpFilterContext, ScmpSyscall,
};
use nix::errno::Errno;
use nix::sys::memfd::{memfd_create, MFdFlags};
use oci_spec::runtime::{
    Arch, LinuxSeccomp, LinuxSeccompAction, LinuxSeccompArg, LinuxSeccompFilterFlag,
    LinuxSeccompOperator,
};

/// The default profile, `seccomp-profiles/default.json`, compiled into the binary.
pub const DEFAULT_PROFILE_JSON: &str = include_str!("../../seccomp-profiles/default.json");

/// `errnoRet` when a profile gives none, as the OCI runtime spec says.
const DEFAULT_ERRNO: u32 = libc::EPERM as u32;
/// The largest value the kernel treats as an errno (`MAX_ERRNO`).
const MAX_ERRNO: u32 = 4095;
/// System calls take at most six arguments.
const MAX_SYSCALL_ARGS: usize = 6;
/// The kernel refuses classic BPF programs longer than this (`BPF_MAXINSNS`).
const MAX_BPF_INSTRUCTIONS: usize = libc::BPF_MAXINSNS as usize;

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot read seccomp profile {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid seccomp profile: {0}")]
    Parse(#[from] serde_json::Error),
    #[error("unsupported seccomp action {action} in {place}")]
    UnsupportedAction {
        action: LinuxSeccompAction,
        place: String,
    },
    #[error("{place} sets an errno but its action {action} returns none")]
    ErrnoWithoutErrnoAction {
        action: LinuxSeccompAction,
        place: String,
    },
    #[error("errno {errno} in {place} is out of range (0 to {max})")]
    ErrnoOutOfRange { errno: u32, max: u32, place: String },
    #[error("argument index {index} in {place} is out of range (0 to 5)")]
    ArgIndexOutOfRange { index: usize, place: String },
    #[error("unsupported seccomp flag {0}")]
    UnsupportedFlag(LinuxSeccompFilterFlag),
    #[error("seccomp notification (listenerPath) is not supported")]
    ListenerUnsupported,
    #[error("libseccomp cannot {what}: {source}")]
    Libseccomp {
        what: String,
        #[source]
        source: libseccomp::error::SeccompError,
    },
    #[error("cannot export the seccomp program: {0}")]
    Export(#[source] std::io::Error),
    #[error("the seccomp program has {0} instructions, the kernel accepts 1 to 4096")]
    ProgramSize(usize),
}

/// Wraps a libseccomp error with what we were doing.
fn libseccomp_err(
    what: impl Into<String>,
) -> impl FnOnce(libseccomp::error::SeccompError) -> SeccompError {
    let what = what.into();
    move |source| SeccompError::Libseccomp { what, source }
}

/// A parsed and validated OCI `LinuxSeccomp` profile.
#[derive(Debug, Clone)]
pub struct Profile {
    spec: LinuxSeccomp,
}

impl Profile {
    /// The built-in default profile ([`DEFAULT_PROFILE_JSON`]).
    pub fn default_profile() -> Result<Profile, SeccompError> {
        Self::from_json(DEFAULT_PROFILE_JSON)
    }

    /// Reads a profile from a JSON file (the `linux.seccomp` object of an OCI config).
    pub fn from_file(path: &Path) -> Result<Profile, SeccompError> {
        let json = std::fs::read_to_string(path).map_err(|source| SeccompError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(&json)
    }

    /// Parses a profile from JSON and validates every action, errno and argument.
    pub fn from_json(json: &str) -> Result<Profile, SeccompError> {
        Self::from_spec(serde_json::from_str(json)?)
    }

    /// Validates an already-deserialised profile.
    pub fn from_spec(spec: LinuxSeccomp) -> Result<Profile, SeccompError> {
        if spec.listener_path().is_some() {
            return Err(SeccompError::ListenerUnsupported);
        }
        kernel_flags(spec.flags().as_deref().unwrap_or_default())?;
        to_action(
            spec.default_action(),
            spec.default_errno_ret(),
            "the default action",
        )?;
        for (i, rule) in spec.syscalls().iter().flatten().enumerate() {
            let place = rule_place(i, rule.names());
            to_action(rule.action(), rule.errno_ret(), &place)?;
            for arg in rule.args().iter().flatten() {
                to_condition(arg, &place)?;
            }
        }
        Ok(Profile { spec })
    }

    /// The profile as the OCI runtime spec describes it.
    pub fn spec(&self) -> &LinuxSeccomp {
        &self.spec
    }

    /// Builds the libseccomp filter. Done in the parent before fork (costly part).
    ///
    /// Each `syscalls[]` entry becomes one conditional rule per name, its `args` ANDed, as runc
    /// does. Entries whose action equals the default action are no-ops and are left out
    /// (libseccomp refuses them). Names unknown on this architecture are skipped and listed in
    /// [`Filter::skipped_syscalls`].
    pub fn compile(&self) -> Result<Filter, SeccompError> {
        let spec = &self.spec;
        let default_action = to_action(
            spec.default_action(),
            spec.default_errno_ret(),
            "the default action",
        )?;
        let mut ctx =
            ScmpFilterContext::new(default_action).map_err(libseccomp_err("create a filter"))?;
        // The runtime sets no_new_privs itself, in its containment order; libseccomp must not.
        ctx.set_ctl_nnp(false)
            .map_err(libseccomp_err("leave no_new_privs to the runtime"))?;
        ctx.set_ctl_tsync(false)
            .map_err(libseccomp_err("turn thread synchronisation off"))?;
        // A system call from an architecture the profile does not list (i386 via int 0x80, x32)
        // ends the whole process rather than only the calling thread.
        ctx.set_act_badarch(ScmpAction::KillProcess)
            .map_err(libseccomp_err("set the bad-architecture action"))?;

        // The native architecture is always in the filter (seccomp_init adds it); listed ones
        // are added to it.
        let mut arches = vec![ScmpArch::native()];
        for arch in spec.architectures().iter().flatten() {
            let arch = to_arch(*arch);
            if !arches.contains(&arch) {
                arches.push(arch);
                ctx.add_arch(arch)
                    .map_err(libseccomp_err(format!("add architecture {arch:?}")))?;
            }
        }

        let flags = spec.flags().as_deref().unwrap_or_default();
        let kernel_flags = kernel_flags(flags)?;
        if kernel_flags & libc::SECCOMP_FILTER_FLAG_LOG != 0 {
            ctx.set_ctl_log(true)
                .map_err(libseccomp_err("turn logging on"))?;
        }
        if kernel_flags & libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW != 0 {
            ctx.set_ctl_ssb(true)
                .map_err(libseccomp_err("allow speculative store bypass"))?;
        }

        let mut rule_count = 0;
        let mut skipped: Vec<String> = Vec::new();
        for (i, rule) in spec.syscalls().iter().flatten().enumerate() {
            let place = rule_place(i, rule.names());
            let action = to_action(rule.action(), rule.errno_ret(), &place)?;
            if action == default_action {
                continue;
            }
            let conditions = rule
                .args()
                .iter()
                .flatten()
                .map(|arg| to_condition(arg, &place))
                .collect::<Result<Vec<_>, _>>()?;
            for name in rule.names() {
                let Some(syscall) = resolve_syscall(name, &arches) else {
                    if !skipped.contains(name) {
                        skipped.push(name.clone());
                    }
                    continue;
                };
                ctx.add_rule_conditional(action, syscall, &conditions)
                    .map_err(libseccomp_err(format!(
                        "add the rule for {name} in {place}"
                    )))?;
                rule_count += 1;
            }
        }

        Ok(Filter {
            ctx,
            rule_count,
            skipped,
            kernel_flags,
        })
    }
}

/// "syscalls[3] (socket)": where a rule sits in the profile, for error messages.
fn rule_place(index: usize, names: &[String]) -> String {
    match names {
        [] => format!("syscalls[{index}]"),
        [name] => format!("syscalls[{index}] ({name})"),
        [name, ..] => format!("syscalls[{index}] ({name}, ...)"),
    }
}

/// Maps an OCI action to libseccomp's, with the errno (or trace message) it carries.
fn to_action(
    action: LinuxSeccompAction,
    errno_ret: Option<u32>,
    place: &str,
) -> Result<ScmpAction, SeccompError> {
    let value = |max: u32| {
        let errno = errno_ret.unwrap_or(DEFAULT_ERRNO);
        if errno > max {
            return Err(SeccompError::ErrnoOutOfRange {
                errno,
                max,
                place: place.to_string(),
            });
        }
        Ok(errno)
    };
    let scmp = match action {
        LinuxSeccompAction::ScmpActErrno => {
            return Ok(ScmpAction::Errno(value(MAX_ERRNO)? as i32));
        }
        // runc passes errnoRet as the message to the tracer; so do we.
        LinuxSeccompAction::ScmpActTrace => {
            return Ok(ScmpAction::Trace(value(u16::MAX as u32)? as u16));
        }
        LinuxSeccompAction::ScmpActAllow => ScmpAction::Allow,
        LinuxSeccompAction::ScmpActLog => ScmpAction::Log,
        LinuxSeccompAction::ScmpActTrap => ScmpAction::Trap,
        // SCMP_ACT_KILL is the old name of SCMP_ACT_KILL_THREAD.
        LinuxSeccompAction::ScmpActKill | LinuxSeccompAction::ScmpActKillThread => {
            ScmpAction::KillThread
        }
        LinuxSeccompAction::ScmpActKillProcess => ScmpAction::KillProcess,
        LinuxSeccompAction::ScmpActNotify => {
            return Err(SeccompError::UnsupportedAction {
                action,
                place: place.to_string(),
            })
        }
    };
    if errno_ret.is_some() {
        return Err(SeccompError::ErrnoWithoutErrnoAction {
            action,
            place: place.to_string(),
        });
    }
    Ok(scmp)
}

/// Maps an OCI argument comparison to libseccomp's. For `SCMP_CMP_MASKED_EQ`, `value` is the
/// mask and `valueTwo` the value the masked argument must equal (as in runc and Docker).
fn to_condition(arg: &LinuxSeccompArg, place: &str) -> Result<ScmpArgCompare, SeccompError> {
    let index = arg.index();
    if index >= MAX_SYSCALL_ARGS {
        return Err(SeccompError::ArgIndexOutOfRange {
            index,
            place: place.to_string(),
        });
    }
    let (op, datum) = match arg.op() {
        LinuxSeccompOperator::ScmpCmpNe => (ScmpCompareOp::NotEqual, arg.value()),
        LinuxSeccompOperator::ScmpCmpLt => (ScmpCompareOp::Less, arg.value()),
        LinuxSeccompOperator::ScmpCmpLe => (ScmpCompareOp::LessOrEqual, arg.value()),
        LinuxSeccompOperator::ScmpCmpEq => (ScmpCompareOp::Equal, arg.value()),
        LinuxSeccompOperator::ScmpCmpGe => (ScmpCompareOp::GreaterEqual, arg.value()),
        LinuxSeccompOperator::ScmpCmpGt => (ScmpCompareOp::Greater, arg.value()),
        LinuxSeccompOperator::ScmpCmpMaskedEq => (
            ScmpCompareOp::MaskedEqual(arg.value()),
            arg.value_two().unwrap_or(0),
        ),
    };
    Ok(ScmpArgCompare::new(index as u32, op, datum))
}

/// The `seccomp(2)` flags a profile asks for. TSYNC is refused (a sandbox loads its filter in
/// a single-threaded child, and the loader must not reach into other threads), and so is
/// WAIT_KILLABLE_RECV, which only matters for notification.
fn kernel_flags(flags: &[LinuxSeccompFilterFlag]) -> Result<libc::c_ulong, SeccompError> {
    let mut bits = 0;
    for flag in flags {
        bits |= match flag {
            LinuxSeccompFilterFlag::SeccompFilterFlagLog => libc::SECCOMP_FILTER_FLAG_LOG,
            LinuxSeccompFilterFlag::SeccompFilterFlagSpecAllow => {
                libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW
            }
            LinuxSeccompFilterFlag::SeccompFilterFlagTsync
            | LinuxSeccompFilterFlag::SeccompFilterFlagWaitKillableRecv => {
                return Err(SeccompError::UnsupportedFlag(*flag))
            }
        };
    }
    Ok(bits)
}

fn to_arch(arch: Arch) -> ScmpArch {
    match arch {
        Arch::ScmpArchNative => ScmpArch::native(),
        Arch::ScmpArchX86 => ScmpArch::X86,
        Arch::ScmpArchX86_64 => ScmpArch::X8664,
        Arch::ScmpArchX32 => ScmpArch::X32,
        Arch::ScmpArchArm => ScmpArch::Arm,
        Arch::ScmpArchAarch64 => ScmpArch::Aarch64,
        Arch::ScmpArchMips => ScmpArch::Mips,
        Arch::ScmpArchMips64 => ScmpArch::Mips64,
        Arch::ScmpArchMips64n32 => ScmpArch::Mips64N32,
        Arch::ScmpArchMipsel => ScmpArch::Mipsel,
        Arch::ScmpArchMipsel64 => ScmpArch::Mipsel64,
        Arch::ScmpArchMipsel64n32 => ScmpArch::Mipsel64N32,
        Arch::ScmpArchPpc => ScmpArch::Ppc,
        Arch::ScmpArchPpc64 => ScmpArch::Ppc64,
        Arch::ScmpArchPpc64le => ScmpArch::Ppc64Le,
        Arch::ScmpArchS390 => ScmpArch::S390,
        Arch::ScmpArchS390x => ScmpArch::S390X,
        Arch::ScmpArchParisc => ScmpArch::Parisc,
        Arch::ScmpArchParisc64 => ScmpArch::Parisc64,
        Arch::ScmpArchRiscv64 => ScmpArch::Riscv64,
        Arch::ScmpArchLoongarch64 => ScmpArch::Loongarch64,
        Arch::ScmpArchM68k => ScmpArch::M68k,
        Arch::ScmpArchSh => ScmpArch::Sh,
        Arch::ScmpArchSheb => ScmpArch::Sheb,
    }
}

/// The native syscall for `name`, or `None` when no architecture in the filter has it.
///
/// libseccomp resolves names of other architectures' calls (`socketcall` on x86_64) to negative
/// pseudo numbers; such a rule only matters when a listed architecture has the call for real.
fn resolve_syscall(name: &str, arches: &[ScmpArch]) -> Option<ScmpSyscall> {
    let syscall = ScmpSyscall::from_name(name).ok()?;
    if syscall.as_raw_syscall() >= 0 {
        return Some(syscall);
    }
    arches
        .iter()
        .any(|arch| {
            ScmpSyscall::from_name_by_arch(name, *arch)
                .is_ok_and(|on_arch| on_arch.as_raw_syscall() >= 0)
        })
        .then_some(syscall)
}

/// A compiled seccomp filter, ready to be loaded.
pub struct Filter {
    ctx: ScmpFilterContext,
    rule_count: usize,
    skipped: Vec<String>,
    kernel_flags: libc::c_ulong,
}

impl fmt::Debug for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Filter")
            .field("rule_count", &self.rule_count)
            .field("skipped", &self.skipped)
            .field("kernel_flags", &self.kernel_flags)
            .finish_non_exhaustive()
    }
}

impl Filter {
    /// Loads the filter into the calling thread. Must be called after no_new_privs is set
    /// (set_ctl_nnp(false) on the context: the runtime sets no_new_privs itself).
    ///
    /// libseccomp allocates here; between fork and exec use [`Filter::export_bpf`] in the
    /// parent and [`BpfProgram::load`] in the child instead.
    pub fn load(&self) -> Result<(), SeccompError> {
        self.ctx.load().map_err(libseccomp_err("load the filter"))
    }

    /// How many libseccomp rules the profile produced (one per syscall name per entry).
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }

    /// Names the profile lists that libseccomp does not know on this architecture.
    pub fn skipped_syscalls(&self) -> &[String] {
        &self.skipped
    }

    /// Renders the filter into a classic BPF program that [`BpfProgram::load`] installs
    /// without allocating.
    pub fn export_bpf(&self) -> Result<BpfProgram, SeccompError> {
        let bytes = export_to_memory(|fd| self.ctx.export_bpf(fd))?;
        let size = std::mem::size_of::<libc::sock_filter>();
        if bytes.len() % size != 0 {
            return Err(SeccompError::Export(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "libseccomp wrote {} bytes, not whole instructions",
                    bytes.len()
                ),
            )));
        }
        let instructions: Vec<libc::sock_filter> = bytes
            .chunks_exact(size)
            .map(|b| libc::sock_filter {
                code: u16::from_ne_bytes([b[0], b[1]]),
                jt: b[2],
                jf: b[3],
                k: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
            })
            .collect();
        if instructions.is_empty() || instructions.len() > MAX_BPF_INSTRUCTIONS {
            return Err(SeccompError::ProgramSize(instructions.len()));
        }
        Ok(BpfProgram {
            instructions,
            flags: self.kernel_flags,
        })
    }

    /// The filter in libseccomp's human-readable pseudo filter code, for debugging.
    pub fn export_pfc(&self) -> Result<String, SeccompError> {
        let bytes = export_to_memory(|fd| self.ctx.export_pfc(fd))?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }
}

/// Lets libseccomp write into a memfd and reads back what it wrote. (Debian's libseccomp 2.5
/// has no `seccomp_export_bpf_mem`.)
fn export_to_memory(
    write: impl FnOnce(BorrowedFd<'_>) -> Result<(), libseccomp::error::SeccompError>,
) -> Result<Vec<u8>, SeccompError> {
    let fd = memfd_create("hatchery-seccomp", MFdFlags::MFD_CLOEXEC)
        .map_err(|errno| SeccompError::Export(errno.into()))?;
    let mut file = File::from(fd);
    write(file.as_fd()).map_err(libseccomp_err("export the filter"))?;
    let mut bytes = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut bytes))
        .map_err(SeccompError::Export)?;
    Ok(bytes)
}

/// A filter rendered to classic BPF, with the `seccomp(2)` flags the profile asked for.
/// It is plain data: cheap to clone, `Send`, and loadable between fork and exec.
#[derive(Clone)]
pub struct BpfProgram {
    instructions: Vec<libc::sock_filter>,
    flags: libc::c_ulong,
}

impl fmt::Debug for BpfProgram {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BpfProgram")
            .field("instructions", &self.instructions.len())
            .field("flags", &self.flags)
            .finish()
    }
}

impl BpfProgram {
    pub fn instructions(&self) -> &[libc::sock_filter] {
        &self.instructions
    }

    /// `SECCOMP_FILTER_FLAG_*` bits passed to `seccomp(2)`.
    pub fn flags(&self) -> libc::c_ulong {
        self.flags
    }

    /// Installs the program in the calling thread. Async-signal-safe: one system call, no
    /// allocation. no_new_privs must already be set (or the thread must hold CAP_SYS_ADMIN).
    pub fn load(&self) -> Result<(), Errno> {
        load_bpf(&self.instructions, self.flags)
    }
}

/// Installs a classic BPF seccomp program in the calling thread with
/// `seccomp(SECCOMP_SET_MODE_FILTER, flags, &prog)`. Async-signal-safe: no allocation, one
/// system call, errno read back. no_new_privs must already be set (or the thread must hold
/// CAP_SYS_ADMIN), otherwise the kernel answers EACCES.
pub fn load_bpf(instructions: &[libc::sock_filter], flags: libc::c_ulong) -> Result<(), Errno> {
    if instructions.is_empty() || instructions.len() > MAX_BPF_INSTRUCTIONS {
        return Err(Errno::EINVAL);
    }
    let prog = libc::sock_fprog {
        len: instructions.len() as libc::c_ushort,
        // The kernel only reads through this pointer; the cast to *mut is what the C type asks.
        filter: instructions.as_ptr().cast_mut(),
    };
    // SAFETY: `prog` describes `instructions.len()` (checked to fit in u16 and the kernel's
    // limit) valid instructions borrowed for the whole call; the kernel copies the program
    // before returning and keeps no pointer to it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::c_ulong::from(libc::SECCOMP_SET_MODE_FILTER),
            flags,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(Errno::last())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::signal::Signal;
    use nix::sys::wait::WaitStatus;
    use std::collections::BTreeSet;

    const TIOCSTI: u64 = 0x5412;
    const TIOCLINUX: u64 = 0x541C;

    fn default_filter() -> Filter {
        Profile::default_profile()
            .expect("default profile parses")
            .compile()
            .expect("default profile compiles")
    }

    /// Names with an unconditional SCMP_ACT_ALLOW rule in the default profile.
    fn unconditionally_allowed(profile: &Profile) -> BTreeSet<String> {
        profile
            .spec()
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow)
            .filter(|r| r.args().as_deref().unwrap_or_default().is_empty())
            .flat_map(|r| r.names().iter().cloned())
            .collect()
    }

    /// Names with any SCMP_ACT_ALLOW rule, conditional or not.
    fn allowed_at_all(profile: &Profile) -> BTreeSet<String> {
        profile
            .spec()
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| r.action() == LinuxSeccompAction::ScmpActAllow)
            .flat_map(|r| r.names().iter().cloned())
            .collect()
    }

    #[test]
    fn default_profile_parses_and_compiles() {
        let profile = Profile::default_profile().unwrap();
        assert_eq!(
            profile.spec().default_action(),
            LinuxSeccompAction::ScmpActErrno
        );
        assert_eq!(profile.spec().default_errno_ret(), Some(1));
        let filter = profile.compile().unwrap();
        assert!(
            filter.skipped_syscalls().is_empty(),
            "libseccomp does not know {:?}",
            filter.skipped_syscalls()
        );
        let program = filter.export_bpf().unwrap();
        assert!(program.instructions().len() > 100);
        assert_eq!(program.flags(), 0);
        let pfc = filter.export_pfc().unwrap();
        assert!(pfc.contains("ioctl"), "{pfc}");
    }

    #[test]
    fn rule_count_matches_the_profile() {
        let profile = Profile::default_profile().unwrap();
        let expected: usize = profile
            .spec()
            .syscalls()
            .iter()
            .flatten()
            .filter(|r| {
                !(r.action() == LinuxSeccompAction::ScmpActErrno
                    && r.errno_ret().unwrap_or(DEFAULT_ERRNO) == 1)
            })
            .map(|r| r.names().len())
            .sum();
        let filter = profile.compile().unwrap();
        assert_eq!(filter.rule_count(), expected);
        // An R-capable allow-list is a few hundred rules, not a handful and not thousands.
        assert!((250..450).contains(&filter.rule_count()), "{filter:?}");
        let names = allowed_at_all(&profile);
        assert!((250..350).contains(&names.len()), "{} names", names.len());
    }

    #[test]
    fn default_profile_refuses_dangerous_calls() {
        let profile = Profile::default_profile().unwrap();
        let allowed = allowed_at_all(&profile);
        let refused = [
            "unshare",
            "setns",
            "mount",
            "umount2",
            "pivot_root",
            "chroot",
            "ptrace",
            "process_vm_readv",
            "process_vm_writev",
            "keyctl",
            "add_key",
            "request_key",
            "bpf",
            "perf_event_open",
            "userfaultfd",
            "io_uring_setup",
            "io_uring_enter",
            "io_uring_register",
            "open_by_handle_at",
            "name_to_handle_at",
            "kexec_load",
            "kexec_file_load",
            "init_module",
            "finit_module",
            "delete_module",
            "reboot",
            "swapon",
            "swapoff",
            "settimeofday",
            "clock_settime",
            "clock_adjtime",
            "adjtimex",
            "syslog",
            "acct",
            "quotactl",
            "quotactl_fd",
            "lookup_dcookie",
            "vhangup",
            "iopl",
            "ioperm",
            "fanotify_init",
            "nfsservctl",
            "uselib",
            "sysfs",
            "_sysctl",
            "move_mount",
            "fsopen",
            "fsconfig",
            "fsmount",
            "fspick",
            "open_tree",
            "mount_setattr",
            "pidfd_getfd",
            "kcmp",
            "get_robust_list",
            "modify_ldt",
            "sethostname",
            "setdomainname",
        ];
        for name in refused {
            assert!(!allowed.contains(name), "{name} is allowed");
        }
        let unconditional = unconditionally_allowed(&profile);
        for name in [
            "clone",
            "ioctl",
            "socket",
            "socketpair",
            "personality",
            "prlimit64",
            "mknod",
            "mknodat",
        ] {
            assert!(
                !unconditional.contains(name),
                "{name} must only be allowed with conditions"
            );
        }
        let clone3 = profile
            .spec()
            .syscalls()
            .iter()
            .flatten()
            .find(|r| r.names().iter().any(|n| n == "clone3"))
            .expect("clone3 rule");
        assert_eq!(clone3.action(), LinuxSeccompAction::ScmpActErrno);
        assert_eq!(clone3.errno_ret(), Some(libc::ENOSYS as u32));
    }

    /// The (mask, value) pairs over the low 32 bits that together match every 32-bit value
    /// except `excluded`, one per subtree of the binary trie that holds no excluded value.
    fn complement_masks(excluded: &[u32]) -> BTreeSet<(u64, u64)> {
        fn walk(depth: u32, prefix: u32, left: Vec<u32>, out: &mut BTreeSet<(u64, u64)>) {
            if left.is_empty() {
                let mask = if depth == 0 {
                    0
                } else {
                    u32::MAX << (32 - depth)
                };
                out.insert((mask as u64, prefix as u64));
                return;
            }
            if depth == 32 {
                return;
            }
            let bit = 1u32 << (31 - depth);
            let (ones, zeros): (Vec<u32>, Vec<u32>) = left.into_iter().partition(|v| v & bit != 0);
            walk(depth + 1, prefix, zeros, out);
            walk(depth + 1, prefix | bit, ones, out);
        }
        let mut out = BTreeSet::new();
        walk(0, 0, excluded.to_vec(), &mut out);
        out
    }

    #[test]
    fn ioctl_rules_are_the_complement_of_tiocsti_and_tioclinux() {
        let profile = Profile::default_profile().unwrap();
        let mut rules = BTreeSet::new();
        for rule in profile.spec().syscalls().iter().flatten() {
            if !rule.names().iter().any(|n| n == "ioctl") {
                continue;
            }
            assert_eq!(rule.names().len(), 1);
            assert_eq!(rule.action(), LinuxSeccompAction::ScmpActAllow);
            let args = rule.args().as_ref().expect("ioctl rules have conditions");
            assert_eq!(args.len(), 1);
            let arg = args[0];
            assert_eq!(arg.index(), 1);
            assert_eq!(arg.op(), LinuxSeccompOperator::ScmpCmpMaskedEq);
            assert!(rules.insert((arg.value(), arg.value_two().unwrap_or(0))));
        }
        assert_eq!(rules, complement_masks(&[TIOCSTI as u32, TIOCLINUX as u32]));
        // And spot-check the semantics, including bits above 32 that the kernel ignores.
        let allows = |request: u64| rules.iter().any(|&(m, v)| request & m == v);
        for low in 0..=0x1_0000u64 {
            for high in [0, 1u64 << 32, 0xffff_ffff_0000_0000] {
                let request = high | low;
                let refused = low == TIOCSTI || low == TIOCLINUX;
                assert_eq!(allows(request), !refused, "{request:#x}");
            }
        }
    }

    #[test]
    fn bad_action_is_an_error() {
        let json = r#"{"defaultAction": "SCMP_ACT_EXPLODE"}"#;
        assert!(matches!(
            Profile::from_json(json),
            Err(SeccompError::Parse(_))
        ));
        let json = r#"{"defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_MAYBE"}]}"#;
        assert!(matches!(
            Profile::from_json(json),
            Err(SeccompError::Parse(_))
        ));
        let json = r#"{"defaultAction": "SCMP_ACT_ERRNO",
            "syscalls": [{"names": ["read"], "action": "SCMP_ACT_NOTIFY"}]}"#;
        let err = Profile::from_json(json).unwrap_err();
        assert!(
            matches!(err, SeccompError::UnsupportedAction { .. }),
            "{err}"
        );
        assert_eq!(
            err.to_string(),
            "unsupported seccomp action SCMP_ACT_NOTIFY in syscalls[0] (read)"
        );
    }

    #[test]
    fn bad_operator_index_errno_and_flags_are_errors() {
        let json = r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"],
            "action": "SCMP_ACT_ALLOW", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_ABOUT"}]}]}"#;
        assert!(matches!(
            Profile::from_json(json),
            Err(SeccompError::Parse(_))
        ));
        let json = r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"],
            "action": "SCMP_ACT_ALLOW", "args": [{"index": 6, "value": 1, "op": "SCMP_CMP_EQ"}]}]}"#;
        assert!(matches!(
            Profile::from_json(json),
            Err(SeccompError::ArgIndexOutOfRange { index: 6, .. })
        ));
        let json = r#"{"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 70000}"#;
        assert!(matches!(
            Profile::from_json(json),
            Err(SeccompError::ErrnoOutOfRange { errno: 70000, .. })
        ));
        let json = r#"{"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": ["read"],
            "action": "SCMP_ACT_ALLOW", "errnoRet": 1}]}"#;
        assert!(matches!(
            Profile::from_json(json),
            Err(SeccompError::ErrnoWithoutErrnoAction { .. })
        ));
        let json = r#"{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_TSYNC"]}"#;
        assert!(matches!(
            Profile::from_json(json),
            Err(SeccompError::UnsupportedFlag(_))
        ));
        let json = r#"{"defaultAction": "SCMP_ACT_ALLOW", "flags": ["SECCOMP_FILTER_FLAG_LOG"]}"#;
        let program = Profile::from_json(json)
            .unwrap()
            .compile()
            .unwrap()
            .export_bpf()
            .unwrap();
        assert_eq!(program.flags(), libc::SECCOMP_FILTER_FLAG_LOG);
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Profile::from_file(Path::new("/nonexistent/hatchery.json")).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cannot read seccomp profile /nonexistent/hatchery.json: "),
            "{err}"
        );
    }

    #[test]
    fn from_file_reads_the_profile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("default.json");
        std::fs::write(&path, DEFAULT_PROFILE_JSON).unwrap();
        let from_file = Profile::from_file(&path).unwrap();
        assert_eq!(from_file.spec(), Profile::default_profile().unwrap().spec());
    }

    #[test]
    fn unknown_names_are_skipped_and_reported() {
        let json = r#"{"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [
              {"names": ["read", "hatchery_no_such_call", "socketcall", "write"], "action": "SCMP_ACT_ALLOW"},
              {"names": ["close"], "action": "SCMP_ACT_ERRNO"},
              {"names": ["getpid"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}
            ]}"#;
        let filter = Profile::from_json(json).unwrap().compile().unwrap();
        assert_eq!(
            filter.skipped_syscalls(),
            ["hatchery_no_such_call", "socketcall"]
        );
        // read, write, and getpid; close repeats the default action and is left out.
        assert_eq!(filter.rule_count(), 3);
    }

    #[test]
    fn load_bpf_refuses_empty_programs() {
        assert_eq!(load_bpf(&[], 0), Err(Errno::EINVAL));
    }

    /// Runs `body` in a fresh thread that sets no_new_privs and loads the default profile with
    /// [`Filter::load`]. Filters and no_new_privs are per thread, so other tests are untouched.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn filter_load_applies_to_the_calling_thread() {
        let outcome = std::thread::spawn(|| {
            let filter = default_filter();
            assert!(set_no_new_privs());
            filter.load().unwrap();
            // SAFETY: unshare with an integer flag; refused by the filter before it acts.
            let unshare = unsafe { libc::unshare(libc::CLONE_NEWNS) };
            let unshare_errno = Errno::last();
            // SAFETY: getpid has no arguments and cannot fail.
            let pid = unsafe { libc::getpid() };
            (unshare, unshare_errno, pid)
        })
        .join()
        .unwrap();
        assert_eq!(outcome.0, -1);
        assert_eq!(outcome.1, Errno::EPERM);
        assert_eq!(outcome.2, std::process::id() as i32);
    }

    /// Sets no_new_privs on the calling thread; true on success. Async-signal-safe.
    fn set_no_new_privs() -> bool {
        let one: libc::c_ulong = 1;
        let zero: libc::c_ulong = 0;
        // SAFETY: prctl with full-width integer arguments (prctl reads them as unsigned long);
        // it only changes the calling thread.
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, one, zero, zero, zero) == 0 }
    }

    /// Outcome of a probe in the filtered child: 0 for success, otherwise the errno.
    type Probe = (&'static str, i32, fn() -> i32);

    /// A raw system call; 0 if it succeeded, else its errno. Probes pass only integers, null
    /// pointers and pointers to live data, and pick arguments that fail harmlessly (ENOENT,
    /// EBADF, EINVAL) should the filter ever let them through, since tests run as root.
    fn raw(nr: libc::c_long, args: [u64; 6]) -> i32 {
        // SAFETY: see above: every pointer argument is null or points to data that outlives
        // the call, and the kernel validates all of them.
        let rc = unsafe { libc::syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) };
        if rc == -1 {
            Errno::last_raw()
        } else {
            0
        }
    }

    /// clone with `flags` and no new stack (fork semantics). A child, should one be created,
    /// exits at once; the caller reaps it.
    fn raw_clone(flags: u64) -> i32 {
        // SAFETY: clone without CLONE_VM duplicates the address space like fork; the child
        // only calls _exit.
        let pid = unsafe { libc::syscall(libc::SYS_clone, flags, 0u64, 0u64, 0u64, 0u64) };
        match pid {
            -1 => Errno::last_raw(),
            0 => {
                // SAFETY: _exit is async-signal-safe and does not return.
                unsafe { libc::_exit(0) }
            }
            pid => reap(pid as libc::pid_t),
        }
    }

    /// Waits for `pid`; 0 if it exited with status 0, otherwise -1.
    fn reap(pid: libc::pid_t) -> i32 {
        let mut status = 0;
        // SAFETY: waitpid writes the status into a live local.
        let rc = unsafe { libc::waitpid(pid, &mut status, 0) };
        if rc == pid && libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
            0
        } else {
            -1
        }
    }

    fn cstr(bytes: &'static [u8]) -> u64 {
        assert_eq!(bytes.last(), Some(&0));
        bytes.as_ptr() as u64
    }

    const NONEXISTENT: &[u8] = b"/nonexistent-hatchery-probe\0";
    const NONEXISTENT_CHILD: &[u8] = b"/nonexistent-hatchery-probe/x\0";
    const AT_FDCWD: u64 = libc::AT_FDCWD as i64 as u64;
    const BAD_FD: u64 = -1i64 as u64;
    const EPERM: i32 = libc::EPERM;

    const PROBES: &[Probe] = &[
        ("getpid", 0, || raw(libc::SYS_getpid, [0; 6])),
        ("getrandom", 0, || {
            let mut buf = [0u8; 8];
            raw(
                libc::SYS_getrandom,
                [buf.as_mut_ptr() as u64, 8, 0, 0, 0, 0],
            )
        }),
        ("fork", 0, || {
            // SAFETY: fork in a single-threaded child; the grandchild only calls _exit.
            match unsafe { libc::fork() } {
                -1 => Errno::last_raw(),
                // SAFETY: _exit is async-signal-safe and does not return.
                0 => unsafe { libc::_exit(0) },
                pid => reap(pid),
            }
        }),
        ("clone(SIGCHLD)", 0, || raw_clone(libc::SIGCHLD as u64)),
        ("clone(CLONE_NEWUSER)", EPERM, || {
            raw_clone((libc::CLONE_NEWUSER | libc::SIGCHLD) as u64)
        }),
        ("clone(CLONE_NEWNS)", EPERM, || {
            raw_clone((libc::CLONE_NEWNS | libc::SIGCHLD) as u64)
        }),
        ("clone(CLONE_NEWNET|CLONE_NEWPID)", EPERM, || {
            raw_clone((libc::CLONE_NEWNET | libc::CLONE_NEWPID | libc::SIGCHLD) as u64)
        }),
        ("clone(CLONE_NEWCGROUP)", EPERM, || {
            raw_clone((libc::CLONE_NEWCGROUP | libc::SIGCHLD) as u64)
        }),
        // Without the filter: EINVAL (size 0); with it: ENOSYS, so glibc falls back to clone.
        ("clone3", libc::ENOSYS, || raw(libc::SYS_clone3, [0; 6])),
        ("unshare(CLONE_NEWNS)", EPERM, || {
            raw(libc::SYS_unshare, [libc::CLONE_NEWNS as u64, 0, 0, 0, 0, 0])
        }),
        ("unshare(CLONE_NEWUSER)", EPERM, || {
            raw(
                libc::SYS_unshare,
                [libc::CLONE_NEWUSER as u64, 0, 0, 0, 0, 0],
            )
        }),
        ("setns", EPERM, || {
            raw(libc::SYS_setns, [BAD_FD, 0, 0, 0, 0, 0])
        }),
        ("mount", EPERM, || {
            raw(
                libc::SYS_mount,
                [
                    cstr(b"none\0"),
                    cstr(NONEXISTENT),
                    cstr(b"tmpfs\0"),
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("umount2", EPERM, || {
            raw(libc::SYS_umount2, [cstr(NONEXISTENT), 0, 0, 0, 0, 0])
        }),
        ("chroot", EPERM, || {
            raw(libc::SYS_chroot, [cstr(NONEXISTENT), 0, 0, 0, 0, 0])
        }),
        ("pivot_root", EPERM, || {
            raw(
                libc::SYS_pivot_root,
                [cstr(NONEXISTENT), cstr(NONEXISTENT), 0, 0, 0, 0],
            )
        }),
        // fd -1: were TIOCSTI let through it would fail with EBADF, never type into a terminal.
        ("ioctl(TIOCSTI)", EPERM, || {
            let c = b'x';
            raw(
                libc::SYS_ioctl,
                [BAD_FD, TIOCSTI, &c as *const u8 as u64, 0, 0, 0],
            )
        }),
        ("ioctl(TIOCSTI | 1 << 32)", EPERM, || {
            let c = b'x';
            raw(
                libc::SYS_ioctl,
                [BAD_FD, TIOCSTI | 1 << 32, &c as *const u8 as u64, 0, 0, 0],
            )
        }),
        ("ioctl(TIOCLINUX)", EPERM, || {
            raw(libc::SYS_ioctl, [BAD_FD, TIOCLINUX, 0, 0, 0, 0])
        }),
        ("ioctl(TCGETS)", libc::EBADF, || {
            raw(libc::SYS_ioctl, [BAD_FD, libc::TCGETS, 0, 0, 0, 0])
        }),
        ("ioctl(sign-extended 0xc0045878)", libc::EBADF, || {
            raw(
                libc::SYS_ioctl,
                [BAD_FD, 0xc004_5878u32 as i32 as i64 as u64, 0, 0, 0, 0],
            )
        }),
        ("socket(AF_PACKET, SOCK_RAW)", EPERM, || {
            raw(
                libc::SYS_socket,
                [libc::AF_PACKET as u64, libc::SOCK_RAW as u64, 0, 0, 0, 0],
            )
        }),
        ("socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)", EPERM, || {
            raw(
                libc::SYS_socket,
                [
                    libc::AF_NETLINK as u64,
                    libc::SOCK_RAW as u64,
                    libc::NETLINK_ROUTE as u64,
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)", EPERM, || {
            raw(
                libc::SYS_socket,
                [
                    libc::AF_INET as u64,
                    libc::SOCK_RAW as u64,
                    libc::IPPROTO_ICMP as u64,
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("socket(AF_INET, SOCK_STREAM, IPPROTO_SCTP)", EPERM, || {
            raw(
                libc::SYS_socket,
                [
                    libc::AF_INET as u64,
                    libc::SOCK_STREAM as u64,
                    libc::IPPROTO_SCTP as u64,
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("socket(AF_INET, SOCK_STREAM|SOCK_CLOEXEC)", 0, || {
            raw(
                libc::SYS_socket,
                [
                    libc::AF_INET as u64,
                    (libc::SOCK_STREAM | libc::SOCK_CLOEXEC) as u64,
                    0,
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("socket(AF_INET, SOCK_DGRAM, IPPROTO_UDP)", 0, || {
            raw(
                libc::SYS_socket,
                [
                    libc::AF_INET as u64,
                    libc::SOCK_DGRAM as u64,
                    libc::IPPROTO_UDP as u64,
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("socket(AF_UNIX, SOCK_STREAM|SOCK_NONBLOCK)", 0, || {
            raw(
                libc::SYS_socket,
                [
                    libc::AF_UNIX as u64,
                    (libc::SOCK_STREAM | libc::SOCK_NONBLOCK) as u64,
                    0,
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("socketpair(AF_UNIX)", 0, || {
            let mut fds = [0i32; 2];
            raw(
                libc::SYS_socketpair,
                [
                    libc::AF_UNIX as u64,
                    libc::SOCK_STREAM as u64,
                    0,
                    fds.as_mut_ptr() as u64,
                    0,
                    0,
                ],
            )
        }),
        ("personality(query)", 0, || {
            raw(libc::SYS_personality, [0xffff_ffff, 0, 0, 0, 0, 0])
        }),
        ("personality(ADDR_NO_RANDOMIZE)", EPERM, || {
            raw(libc::SYS_personality, [0x0040000, 0, 0, 0, 0, 0])
        }),
        ("prlimit64(self)", 0, || {
            let mut old = [0u64; 2];
            raw(
                libc::SYS_prlimit64,
                [
                    0,
                    libc::RLIMIT_NOFILE as u64,
                    0,
                    old.as_mut_ptr() as u64,
                    0,
                    0,
                ],
            )
        }),
        ("prlimit64(pid 1)", EPERM, || {
            let mut old = [0u64; 2];
            raw(
                libc::SYS_prlimit64,
                [
                    1,
                    libc::RLIMIT_NOFILE as u64,
                    0,
                    old.as_mut_ptr() as u64,
                    0,
                    0,
                ],
            )
        }),
        ("mknodat(S_IFIFO)", libc::ENOENT, || {
            raw(
                libc::SYS_mknodat,
                [
                    AT_FDCWD,
                    cstr(NONEXISTENT_CHILD),
                    (libc::S_IFIFO | 0o600) as u64,
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("mknodat(S_IFCHR)", EPERM, || {
            raw(
                libc::SYS_mknodat,
                [
                    AT_FDCWD,
                    cstr(NONEXISTENT_CHILD),
                    (libc::S_IFCHR | 0o600) as u64,
                    0x103,
                    0,
                    0,
                ],
            )
        }),
        // Not PTRACE_TRACEME: if it got through, the child would stop on every signal.
        ("ptrace(PTRACE_GETREGS, pid 0)", EPERM, || {
            raw(
                libc::SYS_ptrace,
                [libc::PTRACE_GETREGS as u64, 0, 0, 0, 0, 0],
            )
        }),
        ("process_vm_readv", EPERM, || {
            raw(libc::SYS_process_vm_readv, [1, 0, 0, 0, 0, 0])
        }),
        ("keyctl", EPERM, || {
            raw(libc::SYS_keyctl, [0, BAD_FD, 0, 0, 0, 0])
        }),
        ("add_key", EPERM, || raw(libc::SYS_add_key, [0; 6])),
        ("bpf", EPERM, || raw(libc::SYS_bpf, [0; 6])),
        ("perf_event_open", EPERM, || {
            raw(libc::SYS_perf_event_open, [0, 0, BAD_FD, BAD_FD, 0, 0])
        }),
        ("userfaultfd", EPERM, || raw(libc::SYS_userfaultfd, [0; 6])),
        ("io_uring_setup", EPERM, || {
            raw(libc::SYS_io_uring_setup, [0; 6])
        }),
        ("open_by_handle_at", EPERM, || {
            raw(libc::SYS_open_by_handle_at, [BAD_FD, 0, 0, 0, 0, 0])
        }),
        ("delete_module", EPERM, || {
            raw(
                libc::SYS_delete_module,
                [
                    cstr(b"hatchery_no_such_module\0"),
                    libc::O_NONBLOCK as u64,
                    0,
                    0,
                    0,
                    0,
                ],
            )
        }),
        ("clock_settime", EPERM, || {
            raw(
                libc::SYS_clock_settime,
                [libc::CLOCK_REALTIME as u64, 0, 0, 0, 0, 0],
            )
        }),
        ("swapon", EPERM, || {
            raw(libc::SYS_swapon, [cstr(NONEXISTENT), 0, 0, 0, 0, 0])
        }),
        // SYSLOG_ACTION_SIZE_BUFFER only reads the buffer size.
        ("syslog", EPERM, || {
            raw(libc::SYS_syslog, [10, 0, 0, 0, 0, 0])
        }),
        ("kcmp", EPERM, || raw(libc::SYS_kcmp, [0; 6])),
        ("pidfd_getfd", EPERM, || {
            raw(libc::SYS_pidfd_getfd, [BAD_FD, BAD_FD, 0, 0, 0, 0])
        }),
        ("fanotify_init", EPERM, || {
            raw(libc::SYS_fanotify_init, [0; 6])
        }),
        ("seccomp(GET_ACTION_AVAIL)", 0, || {
            let action: u32 = 0x7fff_0000; // SECCOMP_RET_ALLOW
            raw(
                libc::SYS_seccomp,
                [2, 0, &action as *const u32 as u64, 0, 0, 0],
            )
        }),
    ];

    /// Forks; the child sets no_new_privs, loads `program`, fills `results` with `body`, writes
    /// them to a pipe and `_exit`s. Between fork and `_exit` the child only makes system calls
    /// (no allocation, no locks), which keeps it safe in a multi-threaded test process.
    fn in_filtered_child<const N: usize>(
        program: &BpfProgram,
        body: fn(&mut [i32; N]),
    ) -> [i32; N] {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two descriptors into a live array.
        assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
        let [read_fd, write_fd] = fds;
        // SAFETY: the child branch below only calls async-signal-safe functions (prctl,
        // seccomp, raw system calls, write, _exit) and touches no lock or allocator.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let mut results = [0i32; N];
                let code = if !set_no_new_privs() {
                    3
                } else if program.load().is_err() {
                    4
                } else {
                    body(&mut results);
                    let len = std::mem::size_of_val(&results);
                    // SAFETY: writes `len` bytes from a live array to our pipe.
                    let written = unsafe { libc::write(write_fd, results.as_ptr().cast(), len) };
                    if written == len as isize {
                        0
                    } else {
                        5
                    }
                };
                // SAFETY: _exit ends the child without running the test harness's exit path.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                // SAFETY: we own write_fd and close it once, so that read sees end of file.
                unsafe { libc::close(write_fd) };
                // SAFETY: read_fd is ours alone from here on.
                let mut pipe: File = unsafe { std::os::fd::FromRawFd::from_raw_fd(read_fd) };
                let mut bytes = Vec::new();
                pipe.read_to_end(&mut bytes).unwrap();
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, 0),
                    "filtered child failed (3: no_new_privs, 4: loading the filter, 5: write)"
                );
                assert_eq!(bytes.len(), N * 4);
                let mut results = [0i32; N];
                for (result, chunk) in results.iter_mut().zip(bytes.chunks_exact(4)) {
                    *result = i32::from_ne_bytes(chunk.try_into().unwrap());
                }
                results
            }
        }
    }

    const PROBE_COUNT: usize = PROBES.len();

    fn describe(outcome: i32) -> String {
        match outcome {
            0 => "success".to_string(),
            errno => format!("{}", Errno::from_raw(errno)),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn filtered_child_gets_the_expected_errnos() {
        let program = default_filter().export_bpf().unwrap();
        let results = in_filtered_child::<PROBE_COUNT>(&program, |out| {
            for (slot, (_, _, probe)) in out.iter_mut().zip(PROBES) {
                *slot = probe();
            }
        });
        let wrong: Vec<String> = PROBES
            .iter()
            .zip(results)
            .filter(|((_, expected, _), got)| got != expected)
            .map(|((name, expected, _), got)| {
                format!(
                    "{name}: expected {}, got {}",
                    describe(*expected),
                    describe(got)
                )
            })
            .collect();
        assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    }

    /// Sweeps ioctl requests through the real kernel filter: every request whose low 32 bits
    /// are TIOCSTI or TIOCLINUX must get EPERM, every other one EBADF (fd -1).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn ioctl_filter_refuses_exactly_tiocsti_and_tioclinux() {
        let program = default_filter().export_bpf().unwrap();
        let [mismatches, first_bad_low, first_bad_high, checked] =
            in_filtered_child::<4>(&program, |out| {
                let mut mismatches = 0;
                let mut first_bad = None;
                let mut checked = 0;
                let mut check = |request: u64| {
                    let refused = matches!(request & 0xffff_ffff, TIOCSTI | TIOCLINUX);
                    let expected = if refused { libc::EPERM } else { libc::EBADF };
                    checked += 1;
                    if raw(libc::SYS_ioctl, [BAD_FD, request, 0, 0, 0, 0]) != expected {
                        mismatches += 1;
                        first_bad.get_or_insert(request);
                    }
                };
                for low in 0..0x1_0000u64 {
                    for high in [0, 1u64 << 32, 0xffff_ffff_0000_0000, 0x8000_0000_0000_0000] {
                        check(high | low);
                    }
                }
                for target in [TIOCSTI, TIOCLINUX] {
                    for bit in 0..64 {
                        check(target ^ (1 << bit));
                        check(target | (1 << bit));
                    }
                }
                // A fixed xorshift sequence over the whole 64-bit range.
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                for _ in 0..100_000 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    check(x);
                    check((x & !0xffff_ffff) | TIOCSTI);
                }
                let bad = first_bad.unwrap_or(0);
                *out = [mismatches, bad as u32 as i32, (bad >> 32) as i32, checked];
            });
        assert_eq!(
            mismatches,
            0,
            "first wrong verdict for request {:#x}",
            ((first_bad_high as u32 as u64) << 32) | first_bad_low as u32 as u64
        );
        assert!(checked > 400_000);
    }

    /// Forks a child that optionally sets no_new_privs and loads `program`, then exits with
    /// what `body` returns. Only system calls run between fork and `_exit`.
    fn wait_for_child(program: Option<&BpfProgram>, body: fn() -> i32) -> WaitStatus {
        // SAFETY: the child branch only makes system calls (prctl, seccomp, whatever `body`
        // does, which is system calls only) and `_exit`s; it takes no lock and allocates
        // nothing.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                let code = match program {
                    Some(_) if !set_no_new_privs() => 3,
                    Some(program) if program.load().is_err() => 4,
                    _ => body(),
                };
                // SAFETY: _exit ends the child without running the test harness's exit path.
                unsafe { libc::_exit(code) }
            }
            nix::unistd::ForkResult::Parent { child } => {
                nix::sys::wait::waitpid(child, None).expect("waitpid")
            }
        }
    }

    /// getpid through the i386 ABI (`int 0x80`, i386 number 20); 0 if it returned our pid.
    fn int80_getpid() -> i32 {
        let mut eax: u32 = 20;
        // SAFETY: `int 0x80` with eax = 20 is the i386 getpid, which takes no arguments and
        // touches no memory; the kernel's compat entry zeroes r8-r11, declared as clobbered.
        unsafe {
            std::arch::asm!(
                "int 0x80",
                inout("eax") eax,
                out("r8") _,
                out("r9") _,
                out("r10") _,
                out("r11") _,
                options(nostack)
            );
        }
        // SAFETY: getpid has no arguments and cannot fail.
        let pid = unsafe { libc::getpid() };
        i32::from(eax as i32 != pid)
    }

    /// getpid with the x32 numbering (bit 30 set) through the 64-bit `syscall` instruction.
    fn x32_getpid() -> i32 {
        i32::from(raw(0x4000_0000 | libc::SYS_getpid, [0; 6]) != 0)
    }

    /// System calls through another ABI than x86_64 do not get past the architecture check:
    /// the bad-architecture action kills the whole process with SIGSYS.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn other_abis_kill_the_process() {
        let program = default_filter().export_bpf().unwrap();
        let status = wait_for_child(Some(&program), x32_getpid);
        assert!(
            matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
            "x32 call under the filter: {status:?}"
        );
        // The i386 ABI exists only when the kernel has IA32 emulation; without it int 0x80
        // faults (SIGSEGV) before seccomp sees anything.
        match wait_for_child(None, int80_getpid) {
            WaitStatus::Exited(_, 0) => {
                let status = wait_for_child(Some(&program), int80_getpid);
                assert!(
                    matches!(status, WaitStatus::Signaled(_, Signal::SIGSYS, _)),
                    "i386 call under the filter: {status:?}"
                );
            }
            other => eprintln!("no IA32 emulation here ({other:?}); i386 check skipped"),
        }
    }

    /// R itself, and a child process of R, under the default profile.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rscript_runs_under_the_default_profile() {
        use std::os::unix::process::CommandExt;

        let rscript = Path::new("/usr/bin/Rscript");
        assert!(
            rscript.exists(),
            "R is not installed: /usr/bin/Rscript is missing (apt-get install r-base-core)"
        );
        let program = default_filter().export_bpf().unwrap();
        let mut command = std::process::Command::new(rscript);
        command.args([
            "-e",
            "x <- lm(dist ~ speed, cars); print(coef(x)); system(\"echo child-ok\")",
        ]);
        // SAFETY: the closure runs in the forked child before exec and makes only two system
        // calls (prctl, seccomp) on data prepared in the parent; it does not allocate.
        unsafe {
            command.pre_exec(move || {
                if !set_no_new_privs() {
                    return Err(std::io::Error::last_os_error());
                }
                program.load().map_err(std::io::Error::from)
            });
        }
        let output = command.output().expect("run Rscript under the filter");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            output.status.success(),
            "Rscript failed ({}):\n{stdout}\n{stderr}",
            output.status
        );
        assert!(stdout.contains("(Intercept)"), "{stdout}\n{stderr}");
        assert!(stdout.contains("-17.579095"), "{stdout}\n{stderr}");
        assert!(stdout.contains("child-ok"), "{stdout}\n{stderr}");
        assert!(stderr.trim().is_empty(), "unexpected stderr:\n{stderr}");
    }
}
