//! `hatchery-zygote`: the zygote process. Started by a [`Pool`](hatchery_sandbox::pool::Pool)
//! inside a sandbox of its own (`sandbox run --userns --userns-root --pass-fd 3 ...`);
//! not meant to be run by hand.

use clap::Parser;
use hatchery_sandbox::limits::parse_size;
use hatchery_sandbox::spec::Rlimits;
use hatchery_sandbox::zygote::alloc::LoopAlloc;
use hatchery_sandbox::zygote::server::{serve, Language, SandboxShape, ZygoteConfig};

/// The system allocator, except for the zygote's control loop between forks (see
/// `hatchery_sandbox::zygote::alloc`).
#[global_allocator]
static ALLOC: LoopAlloc = LoopAlloc;

#[derive(Parser)]
#[command(
    name = "hatchery-zygote",
    about = "Hatchery's zygote (started by a pool)"
)]
struct Args {
    /// Control socket inherited from the pool owner.
    #[arg(long, default_value_t = 3)]
    ctl_fd: i32,
    /// `r`, `python`, or the name of a fork-exec language (with --exec-arg).
    #[arg(long, default_value = "r")]
    language: String,
    /// Packages to preload, comma-separated (R packages, or Python modules).
    #[arg(long, value_delimiter = ',')]
    packages: Vec<String>,
    /// Interpreter argv for fork-exec languages; the code is appended (repeatable).
    #[arg(long = "exec-arg")]
    exec_args: Vec<String>,
    #[arg(long, default_value = "sandbox")]
    hostname: String,
    /// A path bound into the zygote's sandbox that each sandbox binds again (repeatable).
    #[arg(long = "rebind")]
    rebinds: Vec<std::path::PathBuf>,
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    tmp_size: u64,
    #[arg(long, value_parser = parse_size, default_value = "64M")]
    work_size: u64,
    #[arg(long, value_parser = parse_size, default_value = "256M")]
    file_size_limit: u64,
    #[arg(long, default_value_t = 1024)]
    open_files: u64,
    #[arg(long, default_value_t = 4096)]
    processes: u64,
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    locked_memory: u64,
    #[arg(long, value_parser = parse_size, default_value = "64K")]
    message_queues: u64,
    #[arg(long, default_value_t = 1024)]
    pending_signals: u64,
    /// Fork one sandbox, once: prepare nothing for many forks.
    #[arg(long)]
    one_off: bool,
    /// Keep the heap in 4 KiB pages (by default it is collapsed into transparent huge
    /// pages before the first fork, so forks and exits copy and unmap fewer entries).
    #[arg(long)]
    no_huge_pages: bool,
    /// Do not populate, in each sandbox before it is frozen, the pages a first evaluation
    /// touches (by default they are learnt once from a probe and faulted in during the
    /// refill).
    #[arg(long)]
    no_prefault: bool,
}

fn main() {
    let args = Args::parse();
    let language = if args.language == "r" {
        Language::R {
            packages: args.packages,
        }
    } else if args.language == "python" {
        Language::Python {
            packages: args.packages,
        }
    } else {
        if args.exec_args.is_empty() {
            eprintln!(
                "hatchery-zygote: --language {} needs --exec-arg",
                args.language
            );
            std::process::exit(2);
        }
        Language::Exec {
            name: args.language,
            argv: args.exec_args,
        }
    };
    serve(ZygoteConfig {
        language,
        shape: SandboxShape {
            binds: args
                .rebinds
                .into_iter()
                .map(|p| hatchery_sandbox::spec::Bind {
                    source: p.clone(),
                    target: p,
                })
                .collect(),
            hostname: args.hostname,
            tmp_size: args.tmp_size,
            work_size: args.work_size,
            rlimits: Rlimits {
                file_size: args.file_size_limit,
                open_files: args.open_files,
                processes: args.processes,
                locked_memory: args.locked_memory,
                message_queues: args.message_queues,
                pending_signals: args.pending_signals,
            },
        },
        ctl_fd: args.ctl_fd,
        one_off: args.one_off,
        huge_pages: !args.no_huge_pages,
        prefault: !args.no_prefault,
    })
}
