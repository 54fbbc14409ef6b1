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
use hatchery_sandbox::limits::{
    parse_count_or_unlimited, parse_cpus, parse_cpus_or_unlimited, parse_duration,
    parse_duration_or_none, parse_size, parse_size_or_unlimited,
};
use hatchery_sandbox::pool::{Canceller, Event, ExecRequest, ExecStatus, Pool, PoolConfig};
use hatchery_sandbox::report::exit_codes;
use hatchery_sandbox::run::DEFAULT_CGROUP_PARENT;
use hatchery_sandbox::seccomp::Profile;
use hatchery_sandbox::spec::{Bind, Rlimits, DEFAULT_USERNS_BASE};
use hatchery_sandbox::zygote::server::Language;
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
    /// Run code once (R by default): a zygote that prepares nothing for further forks
    /// forks one contained sandbox (--pool-size does not apply).
    ///
    /// Exit code: 0 succeeded; 1 the code failed (error, non-zero exit); 137 killed at
    /// the memory limit; 124 timed out; 122 output limit; 125 the pool could not start.
    #[command(alias = "r")]
    Eval(Box<EvalArgs>),
    /// Serve a warm pool: one JSON request per line on stdin, JSON events on stdout.
    ///
    /// Request: {"id": "a", "code": "sum(1:10)", "memory": "256M", "cpus": 0.5,
    /// "pids": 64, "timeout_ms": 10000, "artifacts": {"max_count": 20, "max_bytes":
    /// 16777216}}; cancel: {"cancel": "a"}. Each event is a line {"id": "a", "event":
    /// "stdout" | "stderr" | "progress" | "usage" | "started" | "artifact" | "finished",
    /// ...}; an artifact (a plot page, a file left in /work/out) carries its name, bytes
    /// and data_base64.
    Serve(Box<ServeArgs>),
    /// Remove sandbox cgroups (and any process still in them) whose supervisor is gone,
    /// and the parent cgroup itself once nothing is left in it.
    Gc(GcArgs),
    /// Wait for process PID to end, then remove what it left (started by a pool as its
    /// watchdog: frozen sandboxes of a killed pool owner are thawed and killed).
    #[command(hide = true)]
    ReapAfter {
        pid: i32,
        #[arg(long, default_value = DEFAULT_CGROUP_PARENT)]
        cgroup_parent: String,
    },
    /// Print the detected cgroup setup and defaults as JSON.
    Info(GcArgs),
}

// Aliases, so that clap takes these for values that may be "unlimited" rather than for
// optional arguments.
type MaybeU64 = Option<u64>;
type MaybeF64 = Option<f64>;
type MaybeDuration = Option<Duration>;

#[derive(Args)]
struct RunArgs {
    /// Root filesystem image (read-only). Default: the image built by rootfs-builder.
    #[arg(long, env = "HATCHERY_ROOTFS", default_value = DEFAULT_ROOTFS)]
    rootfs: PathBuf,
    /// Also create a user namespace: root inside maps to an unprivileged host uid range.
    #[arg(long)]
    userns: bool,
    /// Run the command as root of its user namespace, keeping capabilities there (none on
    /// the host) and without seccomp unless --seccomp is given. For trusted helpers such
    /// as the zygote, which creates namespaces for the sandboxes it forks; never for
    /// untrusted code.
    #[arg(long, requires = "userns")]
    userns_root: bool,
    /// Stay in this process's cgroup namespace (the zygote's, on cgroup v2, so that the
    /// sandboxes it forks are born in their own cgroups). For trusted helpers only.
    #[arg(long, requires = "userns_root")]
    keep_cgroup_namespace: bool,
    /// Keep this inherited file descriptor open for the command, at the same number
    /// (repeatable). Every other descriptor above 2 is closed.
    #[arg(long = "pass-fd", value_name = "FD", value_parser = clap::value_parser!(i32).range(3..))]
    pass_fds: Vec<i32>,
    /// A limit of the new user namespace, `NAME=VALUE` for `/proc/sys/user/NAME`
    /// (repeatable), e.g. `max_inotify_instances=8`: it then caps each uid inside on its
    /// own.
    #[arg(long = "userns-sysctl", value_name = "NAME=VALUE", value_parser = parse_userns_sysctl, requires = "userns")]
    userns_sysctls: Vec<(String, u64)>,
    /// First host uid/gid of the range the user namespace maps 0..65536 to.
    #[arg(long, default_value_t = DEFAULT_USERNS_BASE, requires = "userns")]
    userns_base: u32,
    /// Memory limit, swap excluded (e.g. 256M, 2G, or `unlimited`).
    #[arg(long, value_parser = parse_size_or_unlimited, default_value = "512M")]
    memory: MaybeU64,
    /// CPU bandwidth in cores (e.g. 0.5, 2, or `unlimited`).
    #[arg(long, value_parser = parse_cpus_or_unlimited, default_value = "unlimited")]
    cpus: MaybeF64,
    /// CPU weight against the other sandboxes when CPUs are contended, 1–10000 (cgroup v2's
    /// scale: 100 is the default; on cgroup v1 the same proportion of cpu.shares).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=10000))]
    cpu_weight: Option<u32>,
    /// Maximum number of processes and threads (or `unlimited`).
    #[arg(long, value_parser = parse_count_or_unlimited, default_value = "128")]
    pids: MaybeU64,
    /// Wall-clock limit (e.g. 500ms, 10s, 2m, or `none`); the whole tree is killed on
    /// expiry.
    #[arg(long, value_parser = parse_duration_or_none, default_value = "10m")]
    timeout: MaybeDuration,
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

#[derive(Args, Clone)]
struct PoolArgs {
    /// Root filesystem image. Default: the image built by rootfs-builder.
    #[arg(long, env = "HATCHERY_ROOTFS", default_value = DEFAULT_ROOTFS)]
    rootfs: PathBuf,
    /// `r` (zygote with embedded R), `python` (zygote with embedded CPython), or a
    /// fork-exec language: `bash`, `sh`, `python3`.
    #[arg(long, default_value = "r")]
    language: String,
    /// Packages the zygote preloads, comma-separated: R packages (default
    /// `stats,MASS,Matrix`) or Python modules (default `numpy,pandas`).
    #[arg(long, value_delimiter = ',')]
    packages: Option<Vec<String>>,
    /// Frozen sandboxes kept ready.
    #[arg(long, default_value_t = 2)]
    pool_size: usize,
    /// Size of each sandbox's private /tmp (and /dev/shm) and /work.
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    tmp_size: u64,
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    work_size: u64,
    #[arg(long, default_value = DEFAULT_CGROUP_PARENT)]
    cgroup_parent: String,
}

#[derive(Args)]
struct EvalArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// The code to run ("-" reads it from stdin).
    #[arg(short = 'e', long = "expr", value_name = "CODE")]
    code: String,
    /// Memory limit, swap excluded (or `unlimited`).
    #[arg(long, value_parser = parse_size_or_unlimited, default_value = "512M")]
    memory: MaybeU64,
    /// CPU bandwidth in cores (or `unlimited`).
    #[arg(long, value_parser = parse_cpus_or_unlimited, default_value = "1")]
    cpus: MaybeF64,
    /// Maximum number of processes and threads (or `unlimited`).
    #[arg(long, value_parser = parse_count_or_unlimited, default_value = "128")]
    pids: MaybeU64,
    /// Time limit, counted from the moment the sandbox is claimed (or `none`).
    #[arg(long, value_parser = parse_duration_or_none, default_value = "10m")]
    timeout: MaybeDuration,
    #[arg(long, value_parser = parse_size, default_value = "16M")]
    output_limit: u64,
    /// Print every event as a JSON line on stdout instead of passing output through.
    #[arg(long)]
    json: bool,
    /// Write the result (status, value, error, warnings, timings, usage) as JSON here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write the code's artifacts here: its plot pages (plot-001.png, ...) and the files
    /// it leaves in /work/out. The folder is created if needed.
    #[arg(long, value_name = "DIR")]
    artifacts: Option<PathBuf>,
    /// Most artifacts returned, and their total size.
    #[arg(long, default_value_t = 50)]
    max_artifacts: u32,
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    max_artifact_bytes: u64,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    pool: PoolArgs,
    /// How often usage events are sampled.
    #[arg(long, value_parser = parse_duration, default_value = "500ms")]
    usage_interval: Duration,
    /// Keep the zygote's heap in 4 KiB pages. By default it is collapsed into transparent
    /// huge pages before the first fork, which makes forks and sandbox exits cheaper and
    /// costs the zygote 20–40 MiB more resident memory, shared by its sandboxes.
    #[arg(long)]
    no_huge_pages: bool,
    /// Do not fault in, in any sandbox before it is frozen, the pages a first
    /// evaluation touches. By default they are learnt once by the zygote and populated
    /// during the refill (see --prefault-ready): a claimed sandbox's first statement
    /// takes ~1.7× less time, and a populated sandbox holds them privately (0.7 MiB more
    /// with no package preloaded, 1.6 MiB with stats,MASS,Matrix).
    #[arg(long)]
    no_prefault: bool,
    /// How many frozen sandboxes keep those pages populated; the others (and there are
    /// others only in a pool larger than this) stay at their smallest. Claims take a
    /// populated one first, and a sandbox forked for a waiting claim populates them too.
    #[arg(long, value_name = "N", default_value_t = hatchery_sandbox::pool::PREFAULT_READY)]
    prefault_ready: usize,
    /// On cgroup v2, move each sandbox into its cgroup after its fork instead of having it
    /// born there (`clone3(CLONE_INTO_CGROUP)`, the default). Without effect on cgroup v1,
    /// where the pool always moves it.
    #[arg(long)]
    no_clone_into_cgroup: bool,
}

#[derive(Args)]
struct GcArgs {
    #[arg(long, default_value = DEFAULT_CGROUP_PARENT)]
    cgroup_parent: String,
}

fn main() -> ExitCode {
    // The runtime's staging folders and mount points get the modes it asks for, whatever
    // umask its caller runs with (the `hatchery` binary runs with 077).
    // SAFETY: umask(2) only sets this process's file-mode creation mask; it cannot fail.
    unsafe { libc::umask(0o022) };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => cmd_run(*args),
        Command::Gc(args) => cmd_gc(args),
        Command::ReapAfter { pid, cgroup_parent } => {
            // Our stdout/stderr may be a pipe whose reader dies with the process we wait
            // for: a write would kill us with SIGPIPE before the cleanup.
            // SAFETY: setting a signal disposition to SIG_IGN.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            CgroupRoot::detect(&cgroup_parent)
                .map_err(anyhow::Error::from)
                .and_then(|root| Ok(gc::reap_after(pid, &root)?))
                .map(|s| if s.failed.is_empty() { 0 } else { 1 })
        }
        Command::Eval(args) => cmd_eval(*args),
        Command::Serve(args) => cmd_serve(*args),
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

/// `NAME=VALUE` of a user-namespace limit: a plain name (the files of
/// `/proc/sys/user/`), a whole number.
fn parse_userns_sysctl(text: &str) -> Result<(String, u64), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got {text:?}"))?;
    let name = name.trim().trim_start_matches("user.");
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_') {
        return Err(format!("{name:?} is not a user namespace limit name"));
    }
    let value = value
        .trim()
        .parse::<u64>()
        .map_err(|_| format!("{value:?} is not a whole number"))?;
    Ok((name.to_string(), value))
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
        Some(path) => Some(
            Profile::from_file(path)
                .with_context(|| format!("cannot load seccomp profile {}", path.display()))?,
        ),
        None if args.userns_root => None,
        None => {
            Some(Profile::default_profile().context("cannot load the default seccomp profile")?)
        }
    };
    let filter = profile
        .map(|p| p.compile())
        .transpose()
        .context("cannot compile the seccomp profile")?;
    for fd in &args.pass_fds {
        // SAFETY: F_GETFD only queries the descriptor's flags.
        if unsafe { libc::fcntl(*fd, libc::F_GETFD) } < 0 {
            bail!("--pass-fd {fd}: no such open descriptor");
        }
    }

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
    spec.userns_root = args.userns_root;
    spec.keep_cgroup_namespace = args.keep_cgroup_namespace;
    spec.pass_fds = args.pass_fds.clone();
    spec.userns_sysctls = args.userns_sysctls.clone();
    spec.tmp_size = args.tmp_size;
    spec.work_size = args.work_size;
    spec.rlimits = Rlimits {
        file_size: args.file_size_limit,
        open_files: args.open_files,
        ..Rlimits::default()
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
        cpu_weight: args.cpu_weight,
    };

    let stdout = std::io::stdout();
    let stderr = std::io::stderr();
    let report = hatchery_sandbox::run(
        &spec,
        filter.as_ref(),
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
        "{} removed, {} failed, {} still owned by a live process, {} nested parents",
        summary.removed.len(),
        summary.failed.len(),
        summary.kept,
        summary.other
    );
    // Nested parents (e.g. a test's `hatchery/e2e-…`) left empty by a run that ended
    // early, then the parent itself. Only on demand: a starting run reaps sandboxes but
    // never removes a parent another run may be about to fill.
    for name in root.children() {
        if gc::owner_of(&name).is_none() {
            let nested = CgroupRoot::detect(&format!("{}/{name}", args.cgroup_parent))?;
            if nested.children().is_empty() && nested.remove_if_empty()? {
                println!("removed the empty cgroup {}/{name}", args.cgroup_parent);
            }
        }
    }
    if root.remove_if_empty()? {
        println!("removed the empty parent cgroup {}", args.cgroup_parent);
    }
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

fn pool_config(args: &PoolArgs) -> Result<PoolConfig> {
    if !args.rootfs.exists() {
        bail!(
            "no root filesystem at {}: build it with \
             `cargo run --release -p rootfs-builder -- build rootfs-builder/manifests/r.toml`",
            args.rootfs.display()
        );
    }
    let packages = |default: &str| -> Vec<String> {
        match &args.packages {
            Some(p) => p.iter().filter(|p| !p.is_empty()).cloned().collect(),
            None => default.split(',').map(String::from).collect(),
        }
    };
    let language = match args.language.as_str() {
        "r" => Language::R {
            packages: packages("stats,MASS,Matrix"),
        },
        "python" => Language::Python {
            packages: packages("numpy,pandas"),
        },
        "bash" | "sh" | "python3" => Language::Exec {
            name: args.language.clone(),
            argv: vec![args.language.clone(), "-c".into()],
        },
        other => bail!("unknown language {other:?}: expected r, python, bash, sh or python3"),
    };
    let mut cfg = PoolConfig::new(language, args.rootfs.clone());
    cfg.size = args.pool_size.max(1);
    cfg.tmp_size = args.tmp_size;
    cfg.work_size = args.work_size;
    cfg.cgroup_parent = args.cgroup_parent.clone();
    Ok(cfg)
}

fn exec_exit_code(status: ExecStatus) -> i32 {
    match status {
        ExecStatus::Succeeded => 0,
        ExecStatus::Failed => 1,
        ExecStatus::OomKilled => exit_codes::OOM_KILLED,
        ExecStatus::TimedOut => exit_codes::TIMED_OUT,
        ExecStatus::OutputLimit => exit_codes::OUTPUT_LIMIT,
        ExecStatus::Cancelled => 130,
        ExecStatus::ProtocolViolation => exit_codes::PROTOCOL_VIOLATION,
    }
}

fn cmd_eval(args: EvalArgs) -> Result<i32> {
    require_root()?;
    let code = if args.code == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        args.code.clone()
    };
    // A one-off: no sandbox kept ready, none forked after the claim, and a zygote that
    // prepares nothing for forks it will not make.
    let mut cfg = pool_config(&args.pool)?;
    cfg.size = 0;
    cfg.one_off = true;
    let pool = Pool::start(cfg).context("cannot start the pool")?;
    let mut req = ExecRequest::new(code);
    req.limits = Limits {
        memory_bytes: args.memory,
        cpus: args.cpus,
        pids: args.pids,
    };
    req.timeout = args.timeout;
    req.output_limit = args.output_limit;
    if let Some(dir) = &args.artifacts {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        req.artifacts = Some(hatchery_sandbox::pool::ArtifactLimits {
            max_count: args.max_artifacts,
            max_bytes: args.max_artifact_bytes,
        });
    }
    let exec = pool.claim(req).context("cannot claim a sandbox")?;
    let mut out = std::io::stdout().lock();
    let mut err = std::io::stderr().lock();
    let mut result = None;
    for event in exec.events().iter() {
        if args.json {
            writeln!(out, "{}", serde_json::to_string(&event)?)?;
            out.flush()?;
        } else {
            match &event {
                Event::Stdout { data } => {
                    out.write_all(data)?;
                    out.flush()?;
                }
                Event::Stderr { data } => {
                    err.write_all(data)?;
                }
                Event::Progress { fraction, message } => {
                    writeln!(err, "[progress {:>3.0}%] {message}", fraction * 100.0)?;
                }
                _ => {}
            }
        }
        if let (Event::Artifact { name, data }, Some(dir)) = (&event, &args.artifacts) {
            // The pool let through only plain file names (no path, no leading dot).
            let path = dir.join(name);
            std::fs::write(&path, data)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        if let Event::Finished(r) = event {
            result = Some(*r);
        }
    }
    let result = result.context("the execution ended without a result")?;
    if !args.json {
        if let Some(e) = &result.outcome.error {
            writeln!(err, "Error: {}", e.message)?;
        }
        for w in &result.outcome.warnings {
            writeln!(err, "Warning: {w}")?;
        }
        if let Some(e) = &result.error {
            writeln!(err, "sandbox: {e}")?;
        }
    }
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    Ok(exec_exit_code(result.status))
}

#[derive(serde::Deserialize)]
struct ServeRequest {
    id: Option<String>,
    code: Option<String>,
    cancel: Option<String>,
    memory: Option<String>,
    cpus: Option<f64>,
    pids: Option<u64>,
    timeout_ms: Option<u64>,
    output_limit: Option<String>,
    /// Return plot pages and the files left in /work/out, within these limits, as
    /// `artifact` events carrying `data_base64`.
    artifacts: Option<hatchery_sandbox::pool::ArtifactLimits>,
}

fn cmd_serve(args: ServeArgs) -> Result<i32> {
    use std::collections::HashMap;
    use std::io::BufRead;
    use std::sync::{Arc, Mutex};
    require_root()?;
    let mut cfg = pool_config(&args.pool)?;
    cfg.huge_pages = !args.no_huge_pages;
    cfg.prefault = !args.no_prefault;
    cfg.prefault_ready = args.prefault_ready;
    cfg.clone_into_cgroup = !args.no_clone_into_cgroup;
    let size = cfg.size;
    let pool = Arc::new(Pool::start(cfg).context("cannot start the pool")?);
    let out = Arc::new(Mutex::new(std::io::stdout()));
    let emit = {
        let out = Arc::clone(&out);
        move |value: serde_json::Value| {
            let mut o = out.lock().unwrap();
            let _ = writeln!(o, "{value}");
            let _ = o.flush();
        }
    };
    let ready = pool.wait_ready(size, Duration::from_secs(120));
    emit(serde_json::json!({
        "event": "pool_ready",
        "ok": ready.is_ok(),
        "error": ready.err().map(|e| e.to_string()),
        "stats": pool.stats(),
    }));
    let cancels: Arc<Mutex<HashMap<String, Canceller>>> = Arc::default();
    let mut next = 0u64;
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let req: ServeRequest = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                emit(
                    serde_json::json!({"event": "error", "code": "bad_request", "message": e.to_string()}),
                );
                continue;
            }
        };
        if let Some(id) = req.cancel {
            match cancels.lock().unwrap().get(&id) {
                Some(c) => c.cancel(),
                None => emit(
                    serde_json::json!({"id": id, "event": "error", "code": "unknown_id", "message": "no running execution with this id"}),
                ),
            }
            continue;
        }
        next += 1;
        let id = req.id.unwrap_or_else(|| format!("exec-{next}"));
        let Some(code) = req.code else {
            emit(
                serde_json::json!({"id": id, "event": "error", "code": "missing_code", "message": "a request needs \"code\" (or \"cancel\")"}),
            );
            continue;
        };
        let parsed = (|| -> Result<ExecRequest> {
            let mut r = ExecRequest::new(code);
            r.limits = Limits {
                memory_bytes: req.memory.as_deref().map(parse_size).transpose()?,
                cpus: req.cpus.map(|c| parse_cpus(&c.to_string())).transpose()?,
                pids: req.pids,
            };
            r.timeout = req.timeout_ms.map(Duration::from_millis);
            r.usage_interval = args.usage_interval;
            if let Some(o) = &req.output_limit {
                r.output_limit = parse_size(o)?;
            }
            r.artifacts = req.artifacts;
            Ok(r)
        })();
        let exec_req = match parsed {
            Ok(r) => r,
            Err(e) => {
                emit(
                    serde_json::json!({"id": id, "event": "error", "code": "bad_limits", "message": e.to_string()}),
                );
                continue;
            }
        };
        let pool = Arc::clone(&pool);
        let cancels = Arc::clone(&cancels);
        let emit = emit.clone();
        std::thread::spawn(move || {
            emit(serde_json::json!({"id": id, "event": "queued"}));
            let exec = match pool.claim(exec_req) {
                Ok(e) => e,
                Err(e) => {
                    emit(
                        serde_json::json!({"id": id, "event": "error", "code": "claim_failed", "message": e.to_string()}),
                    );
                    return;
                }
            };
            cancels.lock().unwrap().insert(id.clone(), exec.canceller());
            for event in exec.events().iter() {
                let mut v = serde_json::to_value(&event).unwrap_or_default();
                if let Some(obj) = v.as_object_mut() {
                    obj.insert("id".into(), serde_json::Value::String(id.clone()));
                    if let Event::Artifact { data, .. } = &event {
                        use base64::Engine as _;
                        let b64 = base64::engine::general_purpose::STANDARD.encode(data);
                        obj.insert("data_base64".into(), serde_json::Value::String(b64));
                    }
                }
                emit(v);
            }
            cancels.lock().unwrap().remove(&id);
        });
    }
    // stdin closed: let running executions finish, then stop the pool.
    loop {
        if cancels.lock().unwrap().is_empty() && Arc::strong_count(&pool) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(0)
}
