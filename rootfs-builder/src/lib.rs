//! Builds the read-only root filesystem a Hatchery sandbox sees.
//!
//! An image is described by a TOML [`Manifest`] (Debian suite, variant,
//! packages, mount points, paths to remove), built with debootstrap from the
//! host's configured Debian mirror, and cached under the SHA-256 of the
//! resolved manifest's canonical form ([`ResolvedManifest::key`]). Layout of
//! the output directory: [`store`]. The build sequence: [`build`].
//!
//! The library never prints except through [`progress::Progress`] and never
//! exits the process; the `rootfs-builder` binary is a thin clap layer on top.

pub mod build;
pub mod fsutil;
pub mod manifest;
pub mod progress;
pub mod sources;
pub mod store;
mod timefmt;

use std::path::Path;

pub use build::{BuildError, Builder, Outcome};
pub use manifest::{
    CacheKey, Manifest, ManifestError, ResolvedManifest, DEFAULT_MANIFEST, FORMAT_VERSION,
};
pub use store::{ImageInfo, ImageRecord, Store};

/// Where images go unless told otherwise.
pub const DEFAULT_OUT_DIR: &str = "/var/lib/hatchery/rootfs";

/// The host's dpkg architecture name.
pub fn host_architecture() -> String {
    let known = match std::env::consts::ARCH {
        "x86_64" => Some("amd64"),
        "aarch64" => Some("arm64"),
        "x86" => Some("i386"),
        "riscv64" => Some("riscv64"),
        "s390x" => Some("s390x"),
        "powerpc64" if cfg!(target_endian = "little") => Some("ppc64el"),
        _ => None,
    };
    if let Some(a) = known {
        return a.to_owned();
    }
    std::process::Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| std::env::consts::ARCH.to_owned())
}

/// Resolves a manifest against this host: its apt mirror for the suite (when
/// the manifest names none) and its architecture (when the manifest names none).
pub fn resolve_on_host(manifest: Manifest) -> Result<ResolvedManifest, ManifestError> {
    let sources = if manifest.mirror.is_none() {
        sources::host_sources(Path::new("/")).map_err(ManifestError::HostSources)?
    } else {
        Vec::new()
    };
    manifest.resolve(
        |suite| sources::find_mirror(&sources, suite),
        &host_architecture(),
    )
}
