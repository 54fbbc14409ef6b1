//! `rootfs-builder`: the command line over the `rootfs_builder` library.
//!
//! stdout carries only the result (an image path, or the `list` table), so
//! scripts can write `ROOTFS=$(rootfs-builder build)`; progress and status go
//! to stderr.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use rootfs_builder::{
    fsutil, progress::Progress, resolve_on_host, Builder, Manifest, Outcome, ResolvedManifest,
    Store, DEFAULT_MANIFEST, DEFAULT_OUT_DIR,
};

#[derive(Parser)]
#[command(
    version,
    about = "Build the root filesystem a Hatchery sandbox sees, from a manifest, cached by content"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the image (or reuse the cached one) and print its path
    Build {
        #[command(flatten)]
        target: Target,
        /// Rebuild even if a finished image with this key exists
        #[arg(long)]
        force: bool,
    },
    /// Print the path the image has or would have; stderr says whether it is built
    Path {
        #[command(flatten)]
        target: Target,
        /// Exit with status 3 if the image is not built
        #[arg(long)]
        check: bool,
    },
    /// List built images with their keys, names and sizes
    List {
        #[command(flatten)]
        out: OutDir,
    },
}

#[derive(Args)]
struct Target {
    /// Manifest file [default: the built-in copy of rootfs-builder/manifests/r.toml]
    manifest: Option<PathBuf>,
    #[command(flatten)]
    out: OutDir,
}

#[derive(Args)]
struct OutDir {
    /// Directory holding the images
    #[arg(long, env = "HATCHERY_ROOTFS_DIR", default_value = DEFAULT_OUT_DIR)]
    out_dir: PathBuf,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rootfs-builder: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Build { target, force } => build(&target, force),
        Cmd::Path { target, check } => path(&target, check),
        Cmd::List { out } => list(&out.out_dir),
    }
}

fn load(manifest: Option<&Path>) -> Result<ResolvedManifest> {
    let (text, origin) = match manifest {
        Some(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("reading manifest {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            DEFAULT_MANIFEST.to_owned(),
            "built-in manifest r.toml".to_owned(),
        ),
    };
    let parsed = Manifest::parse(&text).with_context(|| format!("in {origin}"))?;
    resolve_on_host(parsed).with_context(|| format!("resolving {origin}"))
}

fn build(target: &Target, force: bool) -> Result<ExitCode> {
    let manifest = load(target.manifest.as_deref())?;
    let store = Store::new(&target.out.out_dir);
    let progress = Progress::stderr();
    let builder = Builder {
        store: &store,
        manifest: &manifest,
        progress: &progress,
        force,
    };
    let name = &manifest.manifest().name;
    let outcome = builder
        .build()
        .with_context(|| format!("building image {name:?} ({})", builder.key().short()))?;
    match outcome {
        Outcome::CacheHit { image, link } => {
            eprintln!(
                "rootfs-builder: cache hit for {name:?} in {:.3}s: {} -> {}",
                progress.elapsed().as_secs_f64(),
                link.display(),
                image.display()
            );
            println!("{}", image.display());
        }
        Outcome::Built {
            image,
            link,
            seconds,
            bytes,
        } => {
            eprintln!(
                "rootfs-builder: built {name:?} in {seconds:.1}s, {}: {} -> {}",
                human(bytes),
                link.display(),
                image.display()
            );
            println!("{}", image.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn path(target: &Target, check: bool) -> Result<ExitCode> {
    let manifest = load(target.manifest.as_deref())?;
    let store = Store::new(&target.out.out_dir);
    let key = manifest.key();
    println!("{}", store.image_path(&key).display());
    if store.is_complete(&key) {
        eprintln!("built");
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("not built (run: rootfs-builder build)");
        Ok(if check {
            ExitCode::from(3)
        } else {
            ExitCode::SUCCESS
        })
    }
}

fn list(out_dir: &Path) -> Result<ExitCode> {
    let store = Store::new(out_dir);
    let images = store
        .list()
        .with_context(|| format!("listing {}", out_dir.display()))?;
    if images.is_empty() {
        eprintln!("no images in {}", out_dir.display());
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<12} {:<64} {:<10} {:>9}  {:<20}  STATE",
        "NAME", "KEY", "SUITE", "SIZE", "BUILT"
    );
    for image in images {
        let size = fsutil::disk_usage(&image.path)
            .map(human)
            .unwrap_or_else(|_| "?".into());
        let names = if image.names.is_empty() {
            "-".to_owned()
        } else {
            image.names.join(",")
        };
        let (suite, built) = image
            .record
            .as_ref()
            .map(|r| (r.suite.clone(), r.build_date.clone()))
            .unwrap_or_else(|| ("?".into(), "?".into()));
        let state = if image.complete {
            "complete"
        } else {
            "incomplete"
        };
        println!(
            "{names:<12} {:<64} {suite:<10} {size:>9}  {built:<20}  {state}",
            image.key
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn human(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        format!("{:.1} GiB", bytes as f64 / (1u64 << 30) as f64)
    } else {
        format!("{} MiB", bytes / (1 << 20))
    }
}
