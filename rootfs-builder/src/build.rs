//! Building an image: debootstrap into `<out>/.build-<key>`, post-process,
//! record, then publish under `<out>/<key>` and `<out>/<name>`.
//!
//! The whole sequence is [`Builder::build`] (locking, caching, publishing) and
//! [`Builder::build_into`] (the steps inside the build directory), each on one
//! screen. Nothing is run inside the image (no chroot of ours): the package
//! list is read with the host's `dpkg-query --admindir`. debootstrap itself
//! mounts `/proc` and `/sys` in the target while it configures packages and
//! unmounts them when it exits; a build directory is only ever deleted after
//! any mount left below it has been detached ([`fsutil::remove_tree`]).
//!
//! Must never: touch anything outside the output directory, delete a finished
//! image unless asked to rebuild it, or publish an image that is not complete.

use std::collections::VecDeque;
use std::fs;
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::fsutil;
use crate::manifest::{CacheKey, ResolvedManifest, FORMAT_VERSION};
use crate::progress::Progress;
use crate::store::{ImageRecord, Store, StoreError, COMPLETE_MARKER, RECORD_DIR};
use crate::timefmt;

/// The environment debootstrap (and every maintainer script it runs) sees:
/// nothing of the caller's locale, timezone or home leaks into the image.
const BUILD_ENV: &[(&str, &str)] = &[
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LC_ALL", "C"),
    ("LANG", "C"),
    ("TZ", "UTC"),
    ("HOME", "/root"),
    ("DEBIAN_FRONTEND", "noninteractive"),
    ("DEBCONF_NONINTERACTIVE_SEEN", "true"),
];
/// Passed through when set, so builds behind a proxy work.
const PASS_ENV: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
];

/// Print "still running" when debootstrap is silent for this long.
const HEARTBEAT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("building an image needs root (debootstrap creates device nodes and files owned by other users); run it with sudo")]
    NotRoot,
    #[error("`{tool}` not found in PATH: install package {package} (scripts/setup-deps.sh does)")]
    MissingTool {
        tool: &'static str,
        package: &'static str,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not run {program}: {source}")]
    Spawn {
        program: &'static str,
        source: io::Error,
    },
    #[error("debootstrap failed ({status}); its last output:\n{tail}")]
    Debootstrap { status: ExitStatus, tail: String },
    #[error("dpkg-query on the image failed ({status}): {stderr}")]
    DpkgQuery { status: ExitStatus, stderr: String },
    #[error("requested packages are not installed in the image: {}", .0.join(", "))]
    NotInstalled(Vec<String>),
    #[error("{step} failed: {source}")]
    Step {
        step: &'static str,
        source: io::Error,
    },
    #[error("mount point {0} exists in the image and is not a directory")]
    MountPointNotDir(String),
    #[error("interrupted by a signal")]
    Interrupted,
}

fn step(step: &'static str) -> impl FnOnce(io::Error) -> BuildError {
    move |source| BuildError::Step { step, source }
}

/// What `build` did.
#[derive(Debug)]
pub enum Outcome {
    /// The image already existed; nothing was built.
    CacheHit { image: PathBuf, link: PathBuf },
    Built {
        image: PathBuf,
        link: PathBuf,
        seconds: f64,
        bytes: u64,
    },
}

pub struct Builder<'a> {
    pub store: &'a Store,
    pub manifest: &'a ResolvedManifest,
    pub progress: &'a Progress,
    /// Rebuild even if the image exists (it is replaced atomically).
    pub force: bool,
}

impl Builder<'_> {
    pub fn key(&self) -> CacheKey {
        self.manifest.key()
    }

    /// Returns the cached image, or builds and publishes it.
    pub fn build(&self) -> Result<Outcome, BuildError> {
        let key = self.key();
        let name = &self.manifest.manifest().name;
        if !self.force && self.store.is_complete(&key) {
            let link = self.store.point_name(name, &key)?;
            return Ok(Outcome::CacheHit {
                image: self.store.image_path(&key),
                link,
            });
        }

        if !fsutil::is_root_user() {
            return Err(BuildError::NotRoot);
        }
        require_tool("debootstrap", "debootstrap")?;
        require_tool("dpkg-query", "dpkg")?;
        self.store.create()?;
        let _lock = self.store.lock(|| {
            self.progress
                .line("lock", "another build holds the output directory; waiting")
        })?;
        // Someone may have built it while we waited.
        if !self.force && self.store.is_complete(&key) {
            let link = self.store.point_name(name, &key)?;
            return Ok(Outcome::CacheHit {
                image: self.store.image_path(&key),
                link,
            });
        }
        for stale in self.store.remove_stale()? {
            self.progress
                .line("cleanup", &format!("removed leftover {}", stale.display()));
        }

        signals::install();
        let work = self.store.build_path(&key);
        if let Err(e) = self.build_into(&work) {
            self.progress.line(
                "cleanup",
                &format!("removing partial build {}", work.display()),
            );
            if let Err(rm) = fsutil::remove_tree(&work) {
                self.progress.line(
                    "cleanup",
                    &format!(
                        "could not remove {}: {rm} (the next build retries)",
                        work.display()
                    ),
                );
            }
            return Err(e);
        }
        let bytes = fsutil::disk_usage(&work).map_err(step("measure image"))?;
        let image = self.store.install(&work, &key)?;
        let link = self.store.point_name(name, &key)?;
        Ok(Outcome::Built {
            image,
            link,
            seconds: self.progress.elapsed().as_secs_f64(),
            bytes,
        })
    }

    /// Every step that happens inside the build directory, in order.
    fn build_into(&self, root: &Path) -> Result<(), BuildError> {
        let m = self.manifest.manifest();
        let started = now_secs();

        // 1. The mirror's Release date pins file times (unless the caller
        //    sets SOURCE_DATE_EPOCH) and is passed to the maintainer scripts.
        let release = fetch_release(self.manifest.mirror(), &m.suite);
        match &release {
            Some(r) => self.progress.line(
                "resolve",
                &format!(
                    "{} {} Release: version {}, dated {}",
                    self.manifest.mirror(),
                    m.suite,
                    r.version.as_deref().unwrap_or("?"),
                    r.date
                ),
            ),
            None => self.progress.line(
                "resolve",
                "could not read the suite's Release file; file times will not be clamped",
            ),
        }
        let epoch = source_date_epoch().or(release.as_ref().and_then(|r| r.epoch));

        // 2. debootstrap.
        fs::create_dir_all(root).map_err(step("create build directory"))?;
        self.run_debootstrap(root, epoch)?;
        check_interrupted()?;

        // 3. Nothing may stay mounted in the image.
        let canonical = root
            .canonicalize()
            .map_err(step("resolve build directory"))?;
        if !fsutil::mounts_under(&canonical)
            .map_err(step("read mounts"))?
            .is_empty()
        {
            self.progress.line(
                "post-process",
                "detaching mounts debootstrap left in the image",
            );
            fsutil::unmount_all_under(&canonical).map_err(step("detach mounts"))?;
            let left = fsutil::mounts_under(&canonical).map_err(step("read mounts"))?;
            if !left.is_empty() {
                return Err(BuildError::Step {
                    step: "detach mounts",
                    source: io::Error::other(format!("still mounted: {left:?}")),
                });
            }
        }

        // 4. Post-process: host leftovers, removals, mount points.
        self.progress.line(
            "post-process",
            "scrubbing host files, removing caches, creating mount points",
        );
        scrub_host_files(root).map_err(step("scrub host files"))?;
        let mut freed = 0;
        for pattern in &m.remove {
            freed += fsutil::remove_in_root(root, pattern).map_err(step("remove paths"))?;
        }
        self.progress.line(
            "post-process",
            &format!("removed {} MiB", freed / (1 << 20)),
        );
        for dir in &m.mount_points {
            create_mount_point(root, dir)?;
        }
        check_interrupted()?;

        // 5. Record what is in the image.
        let installed = installed_packages(root)?;
        let missing: Vec<String> = m
            .packages
            .iter()
            .filter(|p| !installed.iter().any(|(n, _)| n == *p))
            .cloned()
            .collect();
        if !missing.is_empty() {
            return Err(BuildError::NotInstalled(missing));
        }
        let record_dir = root.join(RECORD_DIR);
        fs::create_dir_all(&record_dir).map_err(step("create /etc/hatchery"))?;
        let list: String = installed
            .iter()
            .map(|(n, v)| format!("{n}\t{v}\n"))
            .collect();
        fs::write(record_dir.join("packages.txt"), list).map_err(step("write packages.txt"))?;
        let key = self.key();
        let canonical_text = format!(
            "# Canonical manifest of image {key} (format {FORMAT_VERSION}).\n\
             # `rootfs-builder path` on this file gives the same key.\n{}",
            self.manifest.canonical_toml()
        );
        fs::write(record_dir.join("manifest.toml"), canonical_text)
            .map_err(step("write manifest.toml"))?;
        let record = ImageRecord {
            name: m.name.clone(),
            key: key.to_string(),
            format_version: FORMAT_VERSION,
            suite: m.suite.clone(),
            variant: m.variant.clone(),
            architecture: self.manifest.architecture().to_owned(),
            mirror: self.manifest.mirror().to_owned(),
            packages: m.packages.clone(),
            build_date: timefmt::rfc3339_utc(started),
            build_seconds: (self.progress.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            release_date: release.as_ref().map(|r| r.date.clone()),
            release_version: release.as_ref().and_then(|r| r.version.clone()),
            source_date_epoch: epoch,
            builder_version: env!("CARGO_PKG_VERSION").to_owned(),
            debootstrap_version: debootstrap_version(),
            installed_packages: installed.len(),
        };
        let json = serde_json::to_string_pretty(&record).expect("record serialises");
        fs::write(record_dir.join("image.json"), json + "\n").map_err(step("write image.json"))?;
        for (n, v) in &installed {
            if m.packages.contains(n) {
                self.progress.line("record", &format!("{n} {v}"));
            }
        }
        self.progress.line(
            "record",
            &format!(
                "{} packages installed, list in /{RECORD_DIR}/packages.txt",
                installed.len()
            ),
        );

        // 6. Seal: marker, file times, flush to disk.
        fs::write(root.join(COMPLETE_MARKER), key.as_str()).map_err(step("write marker"))?;
        if let Some(epoch) = epoch {
            let n = fsutil::clamp_mtimes(root, epoch).map_err(step("clamp file times"))?;
            self.progress.line(
                "finalise",
                &format!("clamped {n} file times to {}", timefmt::rfc3339_utc(epoch)),
            );
        }
        fsutil::sync_fs(root).map_err(step("sync"))?;
        check_interrupted()
    }

    fn run_debootstrap(&self, root: &Path, epoch: Option<i64>) -> Result<(), BuildError> {
        let m = self.manifest.manifest();
        let mut cmd = Command::new("debootstrap");
        if m.variant != "default" {
            cmd.arg(format!("--variant={}", m.variant));
        }
        cmd.arg(format!("--arch={}", self.manifest.architecture()))
            .arg(format!("--components={}", m.components.join(",")))
            .arg(format!("--include={}", m.packages.join(",")))
            .arg(&m.suite)
            .arg(root)
            .arg(self.manifest.mirror());
        cmd.env_clear().envs(BUILD_ENV.iter().copied());
        for var in PASS_ENV {
            if let Ok(v) = std::env::var(var) {
                cmd.env(var, v);
            }
        }
        if let Some(epoch) = epoch {
            cmd.env("SOURCE_DATE_EPOCH", epoch.to_string());
        }
        self.progress.line(
            "debootstrap",
            &format!(
                "{} {} ({}) from {} with {}",
                m.suite,
                m.variant,
                self.manifest.architecture(),
                self.manifest.mirror(),
                m.packages.join(" ")
            ),
        );
        let (status, tail) = stream(cmd, "debootstrap", self.progress)?;
        if !status.success() {
            check_interrupted()?;
            let mut tail = tail;
            // debootstrap's own log says which package failed and why.
            if let Ok(log) = fs::read_to_string(root.join("debootstrap/debootstrap.log")) {
                let lines: Vec<&str> = log.lines().collect();
                tail.push_str("\n--- debootstrap/debootstrap.log (end) ---\n");
                tail.push_str(&lines[lines.len().saturating_sub(20)..].join("\n"));
            }
            return Err(BuildError::Debootstrap { status, tail });
        }
        Ok(())
    }
}

/// Runs `cmd`, printing every line of its stdout and stderr as progress.
/// Returns its exit status and its last lines (for error messages).
fn stream(
    mut cmd: Command,
    program: &'static str,
    progress: &Progress,
) -> Result<(ExitStatus, String), BuildError> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|source| BuildError::Spawn { program, source })?;
    signals::set_child(child.id() as i32);
    let (tx, rx) = mpsc::channel::<String>();
    let readers: Vec<_> = [
        Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().expect("piped")),
    ]
    .into_iter()
    .map(|pipe| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            while matches!(reader.read_until(b'\n', &mut buf), Ok(n) if n > 0) {
                let line = String::from_utf8_lossy(&buf).trim_end().to_owned();
                if !line.is_empty() && tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        })
    })
    .collect();
    drop(tx);

    let mut tail: VecDeque<String> = VecDeque::new();
    let mut silent = Duration::ZERO;
    loop {
        match rx.recv_timeout(HEARTBEAT) {
            Ok(line) => {
                silent = Duration::ZERO;
                progress.line(program, &line);
                if tail.len() == 20 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                silent += HEARTBEAT;
                progress.line(
                    program,
                    &format!("still running ({}s without output)", silent.as_secs()),
                );
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child
        .wait()
        .map_err(|source| BuildError::Spawn { program, source });
    signals::set_child(0);
    Ok((status?, Vec::from(tail).join("\n")))
}

fn require_tool(tool: &'static str, package: &'static str) -> Result<(), BuildError> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
        || ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|d| Path::new(d).join(tool).is_file());
    if found {
        Ok(())
    } else {
        Err(BuildError::MissingTool { tool, package })
    }
}

/// debootstrap copies the host's resolv.conf and hostname into the target;
/// neither belongs in a sandbox image (and both would differ between hosts).
fn scrub_host_files(root: &Path) -> io::Result<()> {
    let resolv = root.join("etc/resolv.conf");
    if fs::symlink_metadata(&resolv).is_ok() {
        fs::remove_file(&resolv)?;
    }
    // An empty file: the runtime may bind-mount its own over it.
    fs::write(&resolv, "")?;
    for p in ["etc/hostname", "var/lib/dbus/machine-id"] {
        match fs::remove_file(root.join(p)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
    }
    let machine_id = root.join("etc/machine-id");
    if machine_id.exists() {
        fs::write(machine_id, "")?;
    }
    Ok(())
}

fn create_mount_point(root: &Path, dir: &str) -> Result<(), BuildError> {
    let path = fsutil::in_root(root, dir);
    match fs::symlink_metadata(&path) {
        Ok(meta) if meta.is_dir() => return Ok(()),
        Ok(_) => return Err(BuildError::MountPointNotDir(dir.to_owned())),
        Err(_) => {}
    }
    fs::create_dir_all(&path).map_err(step("create mount point"))?;
    let mode = if dir == "/tmp" { 0o1777 } else { 0o755 };
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(step("create mount point"))
}

/// `(package, version)` of every installed package, sorted, read with the
/// host's dpkg-query from the image's dpkg database.
fn installed_packages(root: &Path) -> Result<Vec<(String, String)>, BuildError> {
    let out = Command::new("dpkg-query")
        .arg(format!(
            "--admindir={}",
            root.join("var/lib/dpkg").display()
        ))
        .args(["-W", "-f", "${db:Status-Abbrev}\t${Package}\t${Version}\n"])
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BuildError::Spawn {
            program: "dpkg-query",
            source,
        })?;
    if !out.status.success() {
        return Err(BuildError::DpkgQuery {
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let mut list: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let (status, name, version) = (f.next()?, f.next()?, f.next()?);
            status
                .starts_with("ii")
                .then(|| (name.to_owned(), version.to_owned()))
        })
        .collect();
    list.sort();
    list.dedup();
    Ok(list)
}

struct Release {
    date: String,
    epoch: Option<i64>,
    version: Option<String>,
}

/// The suite's Release file from the mirror (wget comes with debootstrap).
fn fetch_release(mirror: &str, suite: &str) -> Option<Release> {
    let url = format!("{mirror}/dists/{suite}/Release");
    let text = if let Some(path) = url.strip_prefix("file://").or(url.strip_prefix("file:")) {
        fs::read_to_string(path).ok()?
    } else {
        let out = Command::new("wget")
            .args(["-q", "--timeout=30", "--tries=2", "-O", "-"])
            .arg(&url)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    parse_release(&text)
}

fn parse_release(text: &str) -> Option<Release> {
    let field = |name: &str| {
        text.lines().find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')
                .map(|v| v.trim().to_owned())
        })
    };
    let date = field("Date")?;
    Some(Release {
        epoch: timefmt::parse_rfc2822(&date),
        date,
        version: field("Version"),
    })
}

fn source_date_epoch() -> Option<i64> {
    std::env::var("SOURCE_DATE_EPOCH").ok()?.trim().parse().ok()
}

fn debootstrap_version() -> Option<String> {
    let out = Command::new("debootstrap").arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.trim()
            .trim_start_matches("debootstrap")
            .trim()
            .to_owned(),
    )
    .filter(|s| !s.is_empty())
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn check_interrupted() -> Result<(), BuildError> {
    if signals::interrupted() {
        Err(BuildError::Interrupted)
    } else {
        Ok(())
    }
}

/// SIGINT/SIGTERM/SIGHUP during a build: remember it, pass SIGTERM on to the
/// running child (debootstrap unmounts what it mounted on TERM), and let the
/// builder fail at the next step so it deletes the partial build.
mod signals {
    use super::*;

    static INTERRUPTED: AtomicBool = AtomicBool::new(false);
    static CHILD: AtomicI32 = AtomicI32::new(0);

    extern "C" fn on_signal(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
        let pid = CHILD.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill is async-signal-safe.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }

    pub fn install() {
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            // SAFETY: a zeroed sigaction with a valid handler; the handler only
            // touches atomics and calls kill.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    }

    pub fn set_child(pid: i32) {
        CHILD.store(pid, Ordering::SeqCst);
    }

    pub fn interrupted() -> bool {
        INTERRUPTED.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_release_file() {
        let r = parse_release(
            "Origin: Debian\nSuite: oldstable\nVersion: 12.15\nCodename: bookworm\nDate: Sat, 10 May 2025 09:37:03 UTC\nAcquire-By-Hash: yes\n",
        )
        .unwrap();
        assert_eq!(r.version.as_deref(), Some("12.15"));
        assert_eq!(r.epoch, Some(1_746_869_823));
        assert!(parse_release("Origin: Debian\n").is_none());
    }

    #[test]
    fn mount_points_are_created_with_the_right_modes() {
        let tmp = tempfile::tempdir().unwrap();
        create_mount_point(tmp.path(), "/tmp").unwrap();
        create_mount_point(tmp.path(), "/work").unwrap();
        create_mount_point(tmp.path(), "/work").unwrap();
        let mode = |p: &str| {
            fs::metadata(tmp.path().join(p))
                .unwrap()
                .permissions()
                .mode()
                & 0o7777
        };
        assert_eq!(mode("tmp"), 0o1777);
        assert_eq!(mode("work"), 0o755);
        fs::write(tmp.path().join("file"), "").unwrap();
        assert!(matches!(
            create_mount_point(tmp.path(), "/file"),
            Err(BuildError::MountPointNotDir(_))
        ));
    }

    #[test]
    fn scrubbing_replaces_resolv_conf_and_drops_hostname() {
        let tmp = tempfile::tempdir().unwrap();
        fs::create_dir_all(tmp.path().join("etc")).unwrap();
        fs::write(tmp.path().join("etc/resolv.conf"), "nameserver 10.0.0.1\n").unwrap();
        fs::write(tmp.path().join("etc/hostname"), "buildhost\n").unwrap();
        scrub_host_files(tmp.path()).unwrap();
        assert_eq!(
            fs::read_to_string(tmp.path().join("etc/resolv.conf")).unwrap(),
            ""
        );
        assert!(!tmp.path().join("etc/hostname").exists());
    }

    #[test]
    fn stream_reports_status_and_tail() {
        let progress = Progress::to(Box::new(io::sink()));
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out; echo err >&2; exit 3"]);
        let (status, tail) = stream(cmd, "debootstrap", &progress).unwrap();
        assert_eq!(status.code(), Some(3));
        assert!(tail.contains("out") && tail.contains("err"), "{tail}");
    }
}
