//! `sandbox`: Hatchery's standalone runtime.
//!
//! `sandbox run [options] -- COMMAND [ARGS...]` runs one command confined and exits with
//! its exit code (see `sandbox run --help` for the rules); `sandbox gc` removes what killed
//! runs left behind. The work is done by the `hatchery_sandbox` library.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hatchery_sandbox::cgroup::CgroupRoot;
use hatchery_sandbox::limits::{parse_cpus, parse_duration, parse_size};
use hatchery_sandbox::report::exit_codes;
use hatchery_sandbox::run::DEFAULT_CGROUP_PARENT;
use hatchery_sandbox::seccomp::Profile;
use hatchery_sandbox::spec::{Bind, Rlimits, DEFAULT_USERNS_BASE};
use hatchery_sandbox::{gc, Limits, RunOptions, SandboxSpec, DEFAULT_ROOTFS};

#[derive(Parser)]
#[command(name = "sandbox", version, about = "Hatchery's Linux sandbox runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a command in a fresh sandbox and report how it ended.
    ///
    /// Exit code: the command's own exit code when it exited; 128+N when signal N killed
    /// it; 137 when the OOM killer ended it at the memory limit; 124 on timeout; 122 when
    /// its output passed --output-limit; 127 when the command was not found, 126 when it
    /// could not be executed; 125 when the sandbox could not be set up.
    Run(Box<RunArgs>),
    /// Remove sandbox cgroups (and any process still in them) whose supervisor is gone.
    Gc(GcArgs),
    /// Print the detected cgroup setup and defaults as JSON.
    Info(GcArgs),
}

#[derive(Args)]
struct RunArgs {
    /// Root filesystem image (read-only). Default: the image built by rootfs-builder.
    #[arg(long, env = "HATCHERY_ROOTFS", default_value = DEFAULT_ROOTFS)]
    rootfs: PathBuf,
    /// Also create a user namespace: root inside maps to an unprivileged host uid range.
    #[arg(long)]
    userns: bool,
    /// First host uid/gid of the range the user namespace maps 0..65536 to.
    #[arg(long, default_value_t = DEFAULT_USERNS_BASE, requires = "userns")]
    userns_base: u32,
    /// Memory limit, swap excluded (e.g. 256M, 2G).
    #[arg(long, value_parser = parse_size)]
    memory: Option<u64>,
    /// CPU bandwidth in cores (e.g. 0.5, 2).
    #[arg(long, value_parser = parse_cpus)]
    cpus: Option<f64>,
    /// Maximum number of processes and threads.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pids: Option<u64>,
    /// Wall-clock limit (e.g. 500ms, 10s, 2m); the whole tree is killed on expiry.
    #[arg(long, value_parser = parse_duration)]
    timeout: Option<Duration>,
    /// Bytes of stdout, and of stderr, passed through before the run is killed.
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    output_limit: u64,
    /// Write a JSON report of the run to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seccomp profile (OCI LinuxSeccomp JSON). Default: seccomp-profiles/default.json.
    #[arg(long)]
    seccomp: Option<PathBuf>,
    /// Environment variable for the command (repeatable). The host's environment is never
    /// passed; PATH, HOME, TMPDIR and LANG have defaults.
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Mount a host path read-only at a path inside (repeatable).
    #[arg(long = "ro-bind", value_name = "HOST_PATH:SANDBOX_PATH")]
    ro_bind: Vec<Bind>,
    #[arg(long, default_value = "sandbox")]
    hostname: String,
    /// Size of the private /tmp (and /dev/shm) tmpfs.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    tmp_size: u64,
    /// Size of the private work directory (/work) tmpfs.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    work_size: u64,
    /// Largest file the command may write (RLIMIT_FSIZE).
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    file_size_limit: u64,
    /// Open files per process (RLIMIT_NOFILE).
    #[arg(long, default_value_t = 1024)]
    open_files: u64,
    /// uid of the command inside the sandbox.
    #[arg(long, default_value_t = hatchery_sandbox::spec::DEFAULT_UID)]
    uid: u32,
    /// gid of the command inside the sandbox.
    #[arg(long, default_value_t = hatchery_sandbox::spec::DEFAULT_GID)]
    gid: u32,
    /// Parent cgroup, in every hierarchy, of the sandbox's cgroup.
    #[arg(long, default_value = DEFAULT_CGROUP_PARENT)]
    cgroup_parent: String,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

#[derive(Args)]
struct GcArgs {
    #[arg(long, default_value = DEFAULT_CGROUP_PARENT)]
    cgroup_parent: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cmd_run(*args),
        Command::Gc(args) => cmd_gc(args),
        Command::Info(args) => cmd_info(args),
    };
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("sandbox: {e:#}");
            ExitCode::from(exit_codes::SETUP_ERROR as u8)
        }
    }
}

fn require_root() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("sandbox must run as root (it creates namespaces and cgroups)");
    }
    Ok(())
}

fn cmd_run(args: RunArgs) -> Result<i32> {
    require_root()?;
    if !args.rootfs.exists() {
        if args.rootfs == std::path::Path::new(DEFAULT_ROOTFS) {
            bail!(
                "no root filesystem at {DEFAULT_ROOTFS}: build it with \
                 `cargo run --release -p rootfs-builder -- build rootfs-builder/manifests/r.toml` \
                 or pass --rootfs DIR"
            );
        }
        bail!("root filesystem {} does not exist", args.rootfs.display());
    }
    let profile = match &args.seccomp {
        Some(path) => Profile::from_file(path)
            .with_context(|| format!("cannot load seccomp profile {}", path.display()))?,
        None => Profile::default_profile().context("cannot load the default seccomp profile")?,
    };
    let filter = profile
        .compile()
        .context("cannot compile the seccomp profile")?;

    let mut spec = SandboxSpec::new(args.rootfs.clone(), args.command.clone());
    for kv in &args.env {
        let (k, v) = kv
            .split_once('=')
            .with_context(|| format!("--env expects KEY=VALUE, got {kv:?}"))?;
        if k.is_empty() {
            bail!("--env expects KEY=VALUE, got {kv:?}");
        }
        spec.set_env(k, v);
    }
    spec.binds = args.ro_bind.clone();
    spec.hostname = args.hostname.clone();
    spec.uid = args.uid;
    spec.gid = args.gid;
    spec.userns_base = args.userns.then_some(args.userns_base);
    spec.tmp_size = args.tmp_size;
    spec.work_size = args.work_size;
    spec.rlimits = Rlimits {
        file_size: args.file_size_limit,
        open_files: args.open_files,
    };
    let opts = RunOptions {
        limits: Limits {
            memory_bytes: args.memory,
            cpus: args.cpus,
            pids: args.pids,
        },
        timeout: args.timeout,
        output_limit: args.output_limit,
        cgroup_parent: args.cgroup_parent.clone(),
    };

    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let report = hatchery_sandbox::run(
        &spec,
        &filter,
        &opts,
        &mut stdout.lock(),
        &mut stderr.lock(),
    );

    let mut err = std::io::stderr().lock();
    if report.stdout_truncated {
        let _ = writeln!(
            err,
            "sandbox: stdout cut after {} bytes (output limit); the run was stopped",
            opts.output_limit
        );
    }
    if report.stderr_truncated {
        let _ = writeln!(
            err,
            "sandbox: stderr cut after {} bytes (output limit); the run was stopped",
            opts.output_limit
        );
    }
    match report.status {
        hatchery_sandbox::Status::TimedOut => {
            let _ = writeln!(err, "sandbox: timed out; the whole process tree was killed");
        }
        hatchery_sandbox::Status::OomKilled => {
            let _ = writeln!(err, "sandbox: killed at the memory limit (out of memory)");
        }
        hatchery_sandbox::Status::SetupError => {
            if let Some(e) = &report.error {
                let _ = writeln!(err, "sandbox: {e}");
            }
        }
        _ => {}
    }
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json)
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    Ok(report.exit_code())
}

fn cmd_gc(args: GcArgs) -> Result<i32> {
    require_root()?;
    let root = CgroupRoot::detect(&args.cgroup_parent)?;
    let summary = gc::collect(&root);
    for name in &summary.removed {
        println!("removed {name}");
    }
    for (name, e) in &summary.failed {
        eprintln!("sandbox: could not remove {name}: {e}");
    }
    println!(
        "{} removed, {} failed, {} still owned by a live process",
        summary.removed.len(),
        summary.failed.len(),
        summary.kept
    );
    Ok(if summary.failed.is_empty() { 0 } else { 1 })
}

fn cmd_info(args: GcArgs) -> Result<i32> {
    let root = CgroupRoot::detect(&args.cgroup_parent)?;
    let info = serde_json::json!({
        "cgroup_version": root.version(),
        "cgroup_parent": root.parent_dir(),
        "default_rootfs": DEFAULT_ROOTFS,
        "sandboxes": root.children(),
    });
    println!("{}", serde_json::to_string_pretty(&info)?);
    Ok(0)
}
