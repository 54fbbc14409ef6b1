//! `hatchery-vm`: run a host command inside a throw-away qemu VM with a pure cgroup v2
//! hierarchy, or check that such a VM works. A thin layer over `hatchery_scheduler::provider::vm`.
//!
//! Exit status: the command's own under `run`; 124 when the VM hit its time limit; 125
//! when the VM could not run the command (setup failure, kernel panic, missing qemu or
//! kernel); 128 + n after signal n (SIGINT, SIGTERM), which kills the VM first.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use hatchery_scheduler::provider::vm::{
    cgroup_check_command, run_in_guest, AccelChoice, BootImage, CgroupCheck, GuestCommand,
    GuestError, GuestExit, GuestOptions, GuestOutcome, GuestProgress,
};

const EXIT_TIMEOUT: u8 = 124;
const EXIT_VM_FAILURE: u8 = 125;

#[derive(Parser)]
#[command(
    name = "hatchery-vm",
    about = "Run commands in a throw-away qemu VM with pure cgroup v2",
    after_help = "The guest sees the host's / read-only (writes go to a tmpfs overlay and vanish), \
with fresh /tmp, /run and /dev. Exit status: the command's own; 124 on timeout; \
125 if the VM could not run the command; 128+n after signal n."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Boot a VM, run COMMAND in it as root and exit with its status
    Run(RunArgs),
    /// Boot a VM and check it has pure cgroup v2 with cpu, memory, pids and io
    Check(VmArgs),
}

#[derive(Args)]
struct VmArgs {
    /// Kernel image (bzImage); default: the newest /boot/vmlinuz-* with modules
    #[arg(long, env = "HATCHERY_VM_KERNEL")]
    kernel: Option<PathBuf>,
    /// Guest memory in MiB
    #[arg(long, default_value_t = 1024)]
    memory: u32,
    /// Guest CPUs
    #[arg(long, default_value_t = 2)]
    cpus: u32,
    /// Time limit for the whole VM, boot included (e.g. 600s, 10m, 1h)
    #[arg(long, default_value = "600s", value_parser = parse_duration)]
    timeout: Duration,
    /// Keep the guest console log in FILE
    #[arg(long, value_name = "FILE")]
    log: Option<PathBuf>,
    /// Accelerator: auto (kvm, falling back to tcg), kvm or tcg
    #[arg(long, default_value = "auto", env = "HATCHERY_VM_ACCEL")]
    accel: AccelChoice,
    /// Extra kernel command-line argument (repeatable)
    #[arg(long = "append", value_name = "ARG")]
    kernel_args: Vec<String>,
    /// Statically linked busybox for the initramfs
    #[arg(long, default_value = "/bin/busybox")]
    busybox: PathBuf,
    /// Boot the bzImage as is instead of a host-decompressed vmlinux (slower under tcg)
    #[arg(long)]
    no_extract: bool,
    /// Stream the guest console (kernel and init) to stderr, prefixed with "guest| "
    #[arg(long, short)]
    verbose: bool,
    /// Mount a host directory read-only at the same path in the guest straight over 9p,
    /// not through the guest's overlay root (repeatable): an overlay whose lower layer is
    /// there then stacks one level less deep (the kernel allows two).
    #[arg(long = "share", value_name = "HOST_DIR")]
    shares: Vec<PathBuf>,
    /// Give the guest a network: qemu's user-mode network, on which the host's loopback
    /// services are at 10.0.2.2 (a server on 127.0.0.1:5432 here is 10.0.2.2:5432 there)
    #[arg(long)]
    network: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    vm: VmArgs,
    /// Working directory in the guest (a host path; default: the current directory)
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// Environment variable for the command: NAME=VALUE, or NAME to copy the host's value
    #[arg(long = "env", short = 'e', value_name = "NAME[=VALUE]")]
    env: Vec<String>,
    /// The command and its arguments
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<String>,
}

/// Set by the signal handler; the guest run polls it and kills the VM.
static CANCEL: AtomicBool = AtomicBool::new(false);
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(signal: libc::c_int) {
    // Only atomics here: async-signal-safe.
    SIGNAL.store(signal, Ordering::SeqCst);
    CANCEL.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM cancel the run (the VM is killed and reaped, temporary files are
/// removed); a second signal takes the default action, and qemu then dies with us
/// through PR_SET_PDEATHSIG.
fn install_signal_handlers() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESETHAND | SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to atomics, which is async-signal-safe, and no
        // other code in this process installs handlers for these signals.
        unsafe { sigaction(signal, &action) }
            .with_context(|| format!("install a {signal} handler"))?;
    }
    Ok(())
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?} (try 600s, 10m or 1h)"))?;
    let seconds = match unit.trim() {
        "" | "s" => number,
        "ms" => number / 1000.0,
        "m" | "min" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (ms, s, m or h)"
            ))
        }
    };
    if !(seconds > 0.0 && seconds.is_finite()) {
        return Err(format!("duration {text:?} must be positive"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn parse_env(spec: &str) -> Result<(String, String)> {
    match spec.split_once('=') {
        Some((name, value)) => Ok((name.to_owned(), value.to_owned())),
        None => match std::env::var(spec) {
            Ok(value) => Ok((spec.to_owned(), value)),
            Err(_) => bail!("--env {spec}: not set on the host"),
        },
    }
}

fn options(vm: &VmArgs) -> GuestOptions {
    GuestOptions {
        kernel: vm.kernel.clone(),
        memory_mib: vm.memory,
        cpus: vm.cpus,
        timeout: vm.timeout,
        accel: vm.accel,
        serial_log: vm.log.clone(),
        kernel_cmdline_extra: vm.kernel_args.clone(),
        busybox: vm.busybox.clone(),
        extract_vmlinux: !vm.no_extract,
        network: vm.network,
        shares: vm
            .shares
            .iter()
            .map(|p| hatchery_scheduler::provider::vm::guest::GuestShare {
                host_path: p.clone(),
                guest_path: p.clone(),
                readonly: true,
            })
            .collect(),
        ..GuestOptions::default()
    }
}

/// Prints progress: what booted and how, the console when verbose, and (when
/// `stream_output`) the command's output on stdout as it arrives.
fn reporter(verbose: bool, stream_output: bool) -> impl FnMut(GuestProgress<'_>) {
    let start = std::time::Instant::now();
    let at = move || format!("[{:6.2}]", start.elapsed().as_secs_f64());
    move |progress| match progress {
        GuestProgress::Prepared {
            kernel,
            image,
            modules,
        } => {
            let image = match image {
                BootImage::Vmlinux => "vmlinux extracted on the host".to_owned(),
                BootImage::BzImage { reason } => format!("bzImage as is: {reason}"),
            };
            eprintln!(
                "hatchery-vm: linux {} ({image}), ready after {:.1} s",
                kernel.version,
                start.elapsed().as_secs_f64()
            );
            if verbose {
                eprintln!("hatchery-vm: guest modules: {}", modules.join(" "));
            }
        }
        GuestProgress::Booted { accel, why_not_kvm } => match why_not_kvm {
            Some(why) => eprintln!("hatchery-vm: accelerator {accel} ({why})"),
            None => eprintln!("hatchery-vm: accelerator {accel}"),
        },
        GuestProgress::Console(line) => {
            if verbose {
                eprintln!("guest| {} {line}", at());
            }
        }
        GuestProgress::Output(line) => {
            if stream_output {
                let mut out = std::io::stdout().lock();
                let _ = out.write_all(line);
                let _ = out.write_all(b"\n");
                let _ = out.flush();
            } else if verbose {
                eprintln!("guest| {}", String::from_utf8_lossy(line));
            }
        }
        GuestProgress::Event(event) => {
            if verbose {
                eprintln!("hatchery-vm: {} guest: {event:?}", at());
            }
        }
    }
}

fn timing(outcome: &GuestOutcome) -> String {
    let boot = match (outcome.boot_to_init, outcome.guest_uptime_at_init) {
        (Some(host), Some(guest)) => {
            format!(
                "boot to init {:.1} s (guest kernel uptime {guest:.2} s)",
                host.as_secs_f64()
            )
        }
        (Some(host), None) => format!("boot to init {:.1} s", host.as_secs_f64()),
        _ => "init never ran".to_owned(),
    };
    format!(
        "{boot}, vm {:.1} s, total {:.1} s, {}",
        outcome.vm_time.as_secs_f64(),
        outcome.total.as_secs_f64(),
        outcome.accel
    )
}

fn print_failure(what: &str, outcome: &GuestOutcome) {
    eprintln!("hatchery-vm: {what}");
    eprintln!("hatchery-vm: {}", timing(outcome));
    eprintln!("---- last lines of the guest console ----");
    eprint!("{}", outcome.log_tail);
    eprintln!("---- end of the guest console ----");
    if let Some(log) = &outcome.serial_log {
        eprintln!("hatchery-vm: full guest console log: {}", log.display());
    }
}

fn exit_for(outcome: &GuestOutcome) -> ExitCode {
    match outcome.exit {
        GuestExit::Exited(code) => ExitCode::from(code.clamp(0, 255) as u8),
        GuestExit::TimedOut => ExitCode::from(EXIT_TIMEOUT),
        _ => ExitCode::from(EXIT_VM_FAILURE),
    }
}

fn run(args: RunArgs) -> Result<ExitCode> {
    let cwd = match args.cwd {
        Some(cwd) => cwd,
        None => std::env::current_dir().context("read the current directory")?,
    };
    let env = args
        .env
        .iter()
        .map(|e| parse_env(e))
        .collect::<Result<Vec<_>>>()?;
    let command = GuestCommand {
        argv: args.command,
        cwd,
        env,
    };
    let options = options(&args.vm);
    let outcome = run_in_guest(
        &command,
        &options,
        &CANCEL,
        &mut reporter(args.vm.verbose, true),
    )?;
    match outcome.failure() {
        None => eprintln!("hatchery-vm: the command succeeded; {}", timing(&outcome)),
        Some(failure) => print_failure(&failure, &outcome),
    }
    Ok(exit_for(&outcome))
}

fn check(vm: VmArgs) -> Result<ExitCode> {
    let options = options(&vm);
    let outcome = run_in_guest(
        &cgroup_check_command(),
        &options,
        &CANCEL,
        &mut reporter(vm.verbose, false),
    )?;
    if let Some(failure) = outcome.failure() {
        print_failure(&failure, &outcome);
        return Ok(exit_for(&outcome));
    }
    let report = CgroupCheck::parse(&String::from_utf8_lossy(&outcome.output));
    let problems = report.problems();
    let mounts: Vec<String> = report
        .mounts
        .iter()
        .map(|(t, m)| format!("{t} at {m}"))
        .collect();
    println!("controllers available: {}", report.controllers.join(" "));
    println!(
        "enabled in subtree_control: {}",
        report.subtree_control.join(" ")
    );
    println!("cgroup mounts: {}", mounts.join(", "));
    println!("child cgroup files: {}", report.files.join(" "));
    println!(
        "root: host / over 9p with a tmpfs {}",
        outcome.root.as_deref().unwrap_or("?")
    );
    println!("boot: {}", timing(&outcome));
    if problems.is_empty() {
        println!("pure cgroup v2: ok");
        Ok(ExitCode::SUCCESS)
    } else {
        for problem in &problems {
            println!("problem: {problem}");
        }
        print_failure("the guest is not a usable pure cgroup v2 host", &outcome);
        Ok(ExitCode::from(1))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = install_signal_handlers().and_then(|()| match cli.command {
        Cmd::Run(args) => run(args),
        Cmd::Check(vm) => check(vm),
    });
    match result {
        Ok(code) => code,
        Err(e) if matches!(e.downcast_ref::<GuestError>(), Some(GuestError::Cancelled)) => {
            let signal = SIGNAL.load(Ordering::SeqCst);
            eprintln!("hatchery-vm: interrupted by signal {signal}; the vm was stopped");
            ExitCode::from((128 + signal).clamp(0, 255) as u8)
        }
        Err(e) => {
            eprintln!("hatchery-vm: error: {e:#}");
            ExitCode::from(EXIT_VM_FAILURE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("600s"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("s").is_err());
    }

    #[test]
    fn env_specs() {
        assert_eq!(
            parse_env("A=b=c").unwrap(),
            ("A".to_owned(), "b=c".to_owned())
        );
        assert!(parse_env("HATCHERY_SURELY_UNSET_VARIABLE").is_err());
    }

    #[test]
    fn cli_parses_run_and_check() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let cli = Cli::try_parse_from([
            "hatchery-vm",
            "run",
            "--timeout",
            "20s",
            "-e",
            "A=1",
            "--",
            "sh",
            "-c",
            "exit 3",
        ])
        .unwrap();
        let Cmd::Run(args) = cli.command else {
            panic!("not run")
        };
        assert_eq!(args.command, ["sh", "-c", "exit 3"]);
        assert_eq!(args.vm.timeout, Duration::from_secs(20));
        assert_eq!(args.vm.memory, 1024);
        assert!(
            Cli::try_parse_from(["hatchery-vm", "run"]).is_err(),
            "a command is required"
        );
        assert!(Cli::try_parse_from(["hatchery-vm", "check", "--accel", "tcg"]).is_ok());
    }
}
