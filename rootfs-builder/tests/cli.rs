//! The `rootfs-builder` binary as scripts and other tests use it.
//!
//! The first tests need neither root nor network. `builds_the_r_image` builds
//! (or finds cached) the real image and needs root and the Debian mirror:
//! `sudo cargo test -p rootfs-builder -- --ignored`.

use std::path::Path;
use std::process::Command;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_rootfs-builder"))
}

const MANIFEST: &str = r#"
name = "t"
suite = "bookworm"
mirror = "http://deb.example.org/debian"
architecture = "amd64"
packages = ["r-base-core"]
"#;

#[test]
fn path_prints_a_key_path_and_reports_not_built() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("m.toml");
    std::fs::write(&manifest, MANIFEST).unwrap();
    let out = tmp.path().join("out");

    let run = bin()
        .args(["path", "--check", "--out-dir"])
        .arg(&out)
        .arg(&manifest)
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(3));
    let stdout = String::from_utf8(run.stdout).unwrap();
    let path = Path::new(stdout.trim());
    assert_eq!(path.parent(), Some(out.as_path()));
    let key = path.file_name().unwrap().to_str().unwrap();
    assert_eq!(key.len(), 64);
    assert!(String::from_utf8_lossy(&run.stderr).contains("not built"));

    // Reformatting the manifest keeps the path.
    std::fs::write(
        &manifest,
        format!("# comment\n{}", MANIFEST.replace(" = ", "=")),
    )
    .unwrap();
    let again = bin()
        .args(["path", "--out-dir"])
        .arg(&out)
        .arg(&manifest)
        .output()
        .unwrap();
    assert!(again.status.success());
    assert_eq!(String::from_utf8(again.stdout).unwrap(), stdout);
}

#[test]
fn a_bad_manifest_is_a_clear_error() {
    let tmp = tempfile::tempdir().unwrap();
    let manifest = tmp.path().join("m.toml");
    std::fs::write(&manifest, MANIFEST.replace("r-base-core", "R Base")).unwrap();
    let run = bin().arg("path").arg(&manifest).output().unwrap();
    assert!(!run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(
        stderr.contains("m.toml") && stderr.contains("packages"),
        "{stderr}"
    );
}

#[test]
fn list_of_an_empty_directory_is_empty() {
    let tmp = tempfile::tempdir().unwrap();
    let run = bin()
        .args(["list", "--out-dir"])
        .arg(tmp.path())
        .output()
        .unwrap();
    assert!(run.status.success());
    assert!(run.stdout.is_empty());
}

#[test]
#[ignore = "needs root and the Debian mirror; builds the real image (about a minute, or instant if cached)"]
fn builds_the_r_image() {
    let run = bin().arg("build").output().unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let image = String::from_utf8(run.stdout).unwrap();
    let image = Path::new(image.trim());

    let packages = std::fs::read_to_string(image.join("etc/hatchery/packages.txt")).unwrap();
    for p in [
        "r-base-core",
        "r-cran-matrix",
        "r-cran-mass",
        "r-cran-survival",
        "r-cran-mgcv",
        "r-cran-jsonlite",
    ] {
        assert!(
            packages.lines().any(|l| l.starts_with(&format!("{p}\t"))),
            "{p} missing"
        );
    }
    for d in ["work", "tmp", "proc", "dev", "sys", "run"] {
        assert!(image.join(d).is_dir(), "/{d} missing");
    }
    assert!(!image
        .join("var/cache/apt/archives")
        .read_dir()
        .unwrap()
        .any(|e| { e.unwrap().file_name().to_string_lossy().ends_with(".deb") }));
    let link = Path::new(rootfs_builder::DEFAULT_OUT_DIR).join("r");
    assert_eq!(link.canonicalize().unwrap(), image.canonicalize().unwrap());

    let r = Command::new("chroot")
        .arg(image)
        .args(["Rscript", "-e", "library(Matrix); library(mgcv); cat(1+1)"])
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stdout).ends_with('2'));
}
