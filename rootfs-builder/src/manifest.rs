//! The image manifest: parsing, validation, canonical form and cache key.
//!
//! A manifest is parsed once into a normalised [`Manifest`] (lists sorted and
//! de-duplicated, paths cleaned), then [`Manifest::resolve`]d against the host
//! (mirror and architecture filled in). The cache key of an image is the SHA-256
//! of the resolved manifest re-serialised as TOML, prefixed by
//! [`FORMAT_VERSION`]; comments, whitespace, key order and the order of
//! `packages`, `mount_points` and `remove` therefore never change it.
//!
//! This module does no I/O.

use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Version of what the builder does with a manifest. Bump it whenever a change
/// to the build procedure changes the image produced from the same manifest, so
/// that cached images built by the old procedure are not reused.
pub const FORMAT_VERSION: u32 = 1;

/// The manifest compiled into the binary (`manifests/r.toml`), used when the
/// command line names none.
pub const DEFAULT_MANIFEST: &str = include_str!("../manifests/r.toml");

/// debootstrap variants a manifest may ask for. `default` means debootstrap's
/// own default (no `--variant`).
pub const VARIANTS: &[&str] = &["minbase", "buildd", "default"];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid TOML for an image manifest: {0}")]
    Parse(#[from] toml::de::Error),
    #[error("invalid `{field}` {value:?}: {reason}")]
    Invalid {
        field: &'static str,
        value: String,
        reason: &'static str,
    },
    #[error("`packages` must list at least one package")]
    NoPackages,
    #[error("`components` must list at least one component")]
    NoComponents,
    #[error("reading the host's apt sources: {0}")]
    HostSources(#[source] std::io::Error),
    #[error("no mirror for suite {0:?}: the manifest sets none and the host's apt sources have no `deb` entry for it")]
    NoMirror(String),
}

fn invalid(field: &'static str, value: &str, reason: &'static str) -> ManifestError {
    ManifestError::Invalid {
        field,
        value: value.to_owned(),
        reason,
    }
}

/// A parsed, validated and normalised manifest.
///
/// Field order here is the order of the canonical serialisation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Image name; `<out-dir>/<name>` is a symlink to the newest build.
    pub name: String,
    /// Debian suite or codename, e.g. `bookworm`.
    pub suite: String,
    /// debootstrap variant, one of [`VARIANTS`].
    #[serde(default = "default_variant")]
    pub variant: String,
    /// Mirror URL; `None` means "the host's apt mirror for this suite".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<String>,
    /// dpkg architecture; `None` means the host's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
    /// Archive components, in debootstrap's order of preference.
    #[serde(default = "default_components")]
    pub components: Vec<String>,
    /// Packages installed on top of the variant's base set (dependencies follow).
    pub packages: Vec<String>,
    /// Empty directories created for the sandbox runtime to mount over.
    #[serde(default)]
    pub mount_points: Vec<String>,
    /// Absolute paths (with `*`/`?` globs) removed from the image after installation.
    #[serde(default)]
    pub remove: Vec<String>,
}

fn default_variant() -> String {
    "minbase".to_owned()
}

fn default_components() -> Vec<String> {
    vec!["main".to_owned()]
}

impl Manifest {
    /// Parses and normalises a manifest.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let raw: Manifest = toml::from_str(text)?;
        raw.normalise()
    }

    fn normalise(mut self) -> Result<Self, ManifestError> {
        check_name(&self.name)?;
        check_word("suite", &self.suite)?;
        if !VARIANTS.contains(&self.variant.as_str()) {
            return Err(invalid(
                "variant",
                &self.variant,
                "must be minbase, buildd or default",
            ));
        }
        if let Some(mirror) = &self.mirror {
            self.mirror = Some(normalise_mirror(mirror)?);
        }
        if let Some(arch) = &self.architecture {
            check_word("architecture", arch)?;
        }

        // Order of components is meaningful (preference); only drop repeats.
        if self.components.is_empty() {
            return Err(ManifestError::NoComponents);
        }
        let mut seen = Vec::new();
        for c in &self.components {
            if c.is_empty()
                || !c
                    .chars()
                    .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || "/-".contains(ch))
            {
                return Err(invalid("components", c, "not a component name"));
            }
            if !seen.contains(c) {
                seen.push(c.clone());
            }
        }
        self.components = seen;

        for p in &self.packages {
            check_package(p)?;
        }
        if self.packages.is_empty() {
            return Err(ManifestError::NoPackages);
        }
        self.packages.sort();
        self.packages.dedup();

        self.mount_points = self
            .mount_points
            .iter()
            .map(|p| normalise_path("mount_points", p, false))
            .collect::<Result<_, _>>()?;
        self.mount_points.sort();
        self.mount_points.dedup();

        self.remove = self
            .remove
            .iter()
            .map(|p| normalise_path("remove", p, true))
            .collect::<Result<_, _>>()?;
        self.remove.sort();
        self.remove.dedup();
        Ok(self)
    }

    /// Fills in the mirror and architecture from the host where the manifest
    /// leaves them out. `host_mirror` is only called when needed.
    pub fn resolve(
        mut self,
        host_mirror: impl FnOnce(&str) -> Option<String>,
        host_arch: &str,
    ) -> Result<ResolvedManifest, ManifestError> {
        if self.mirror.is_none() {
            let found = host_mirror(&self.suite)
                .ok_or_else(|| ManifestError::NoMirror(self.suite.clone()))?;
            self.mirror = Some(normalise_mirror(&found)?);
        }
        if self.architecture.is_none() {
            check_word("architecture", host_arch)?;
            self.architecture = Some(host_arch.to_owned());
        }
        Ok(ResolvedManifest(self))
    }
}

/// A manifest whose mirror and architecture are known: what an image is built
/// from and keyed by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedManifest(Manifest);

impl ResolvedManifest {
    pub fn manifest(&self) -> &Manifest {
        &self.0
    }

    pub fn mirror(&self) -> &str {
        self.0
            .mirror
            .as_deref()
            .expect("resolved manifest has a mirror")
    }

    pub fn architecture(&self) -> &str {
        self.0
            .architecture
            .as_deref()
            .expect("resolved manifest has an architecture")
    }

    /// The canonical TOML text: what the key is computed over and what the
    /// image records in `/etc/hatchery/manifest.toml`. Parsing it again gives
    /// the same manifest and the same key.
    pub fn canonical_toml(&self) -> String {
        toml::to_string(&self.0).expect("a manifest always serialises")
    }

    /// The image's cache key.
    pub fn key(&self) -> CacheKey {
        CacheKey::compute(FORMAT_VERSION, &self.canonical_toml())
    }
}

/// SHA-256 (hex) over the builder format version and the canonical manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(String);

impl CacheKey {
    fn compute(format_version: u32, canonical: &str) -> Self {
        let mut hasher = Sha256::new();
        hasher.update(format!("hatchery-rootfs-builder format {format_version}\n").as_bytes());
        hasher.update(canonical.as_bytes());
        let digest = hasher.finalize();
        CacheKey(digest.iter().map(|b| format!("{b:02x}")).collect())
    }

    /// Accepts a string that looks like a key (64 lower-case hex digits).
    pub fn from_hex(s: &str) -> Option<Self> {
        (s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
        .then(|| CacheKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first 12 hex digits, for humans.
    pub fn short(&self) -> &str {
        &self.0[..12]
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn check_name(name: &str) -> Result<(), ManifestError> {
    let ok = name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if !ok {
        return Err(invalid(
            "name",
            name,
            "use 1-64 of a-z 0-9 . _ - starting with a letter or digit",
        ));
    }
    if CacheKey::from_hex(name).is_some() {
        return Err(invalid("name", name, "must not look like a cache key"));
    }
    Ok(())
}

fn check_word(field: &'static str, value: &str) -> Result<(), ManifestError> {
    let ok = value.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && value
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid(field, value, "use a-z 0-9 . _ -"))
    }
}

/// Debian policy 5.6.1: lower case letters, digits, `+ - .`, at least two
/// characters, starting with an alphanumeric.
fn check_package(p: &str) -> Result<(), ManifestError> {
    let ok = p.len() >= 2
        && p.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(invalid("packages", p, "not a Debian package name"))
    }
}

fn normalise_mirror(url: &str) -> Result<String, ManifestError> {
    let url = url.trim();
    let scheme_ok = ["http://", "https://", "file:/"]
        .iter()
        .any(|s| url.starts_with(s));
    if !scheme_ok {
        return Err(invalid(
            "mirror",
            url,
            "must be an http://, https:// or file:/ URL",
        ));
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid("mirror", url, "must not contain whitespace"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// Cleans an absolute in-image path: no `.`/`..`, no repeated or trailing
/// slashes, not `/` itself. Globs (`*`, `?`) only where `glob` is true.
fn normalise_path(field: &'static str, p: &str, glob: bool) -> Result<String, ManifestError> {
    if !p.starts_with('/') {
        return Err(invalid(field, p, "must be an absolute path"));
    }
    let mut out = String::new();
    for comp in p.split('/').filter(|c| !c.is_empty()) {
        if comp == "." || comp == ".." {
            return Err(invalid(field, p, "must not contain . or .. components"));
        }
        if comp
            .chars()
            .any(|c| c.is_control() || c == '\\' || c == '[')
        {
            return Err(invalid(field, p, "contains an unsupported character"));
        }
        if !glob && comp.contains(['*', '?']) {
            return Err(invalid(field, p, "globs are not allowed here"));
        }
        out.push('/');
        out.push_str(comp);
    }
    if out.is_empty() {
        return Err(invalid(field, p, "must not be the image root"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        name = "r"
        suite = "bookworm"
        variant = "minbase"
        packages = ["r-base-core", "r-cran-mass"]
        mount_points = ["/tmp", "/work"]
        remove = ["/var/lib/apt/lists/*"]
    "#;

    fn key_of(text: &str) -> CacheKey {
        Manifest::parse(text)
            .unwrap()
            .resolve(|_| Some("http://deb.debian.org/debian".into()), "amd64")
            .unwrap()
            .key()
    }

    #[test]
    fn key_is_stable_under_formatting_order_and_duplicates() {
        let reformatted = r#"
# a comment
remove=[ "/var/lib/apt//lists/*/" ]
packages = [
  "r-cran-mass",   # reordered
  "r-base-core",
  "r-cran-mass",   # duplicate
]
mount_points = ["/work/", "/tmp", "/tmp"]
variant="minbase"
suite = "bookworm"
name = "r"
"#;
        assert_eq!(key_of(BASE), key_of(reformatted));
    }

    #[test]
    fn explicit_defaults_give_the_same_key() {
        let explicit = format!(
            "{BASE}\nmirror = \"http://deb.debian.org/debian/\"\narchitecture = \"amd64\"\ncomponents = [\"main\"]\n"
        );
        assert_eq!(key_of(BASE), key_of(&explicit));
    }

    #[test]
    fn key_changes_with_content() {
        let base = key_of(BASE);
        let variants = [
            BASE.replace("\"r-cran-mass\"", "\"r-cran-mass\", \"r-cran-mgcv\""),
            BASE.replace("bookworm", "trixie"),
            BASE.replace("minbase", "buildd"),
            BASE.replace("/work", "/data"),
            BASE.replace("name = \"r\"", "name = \"r2\""),
            format!("{BASE}\nmirror = \"http://example.org/debian\""),
            format!("{BASE}\narchitecture = \"arm64\""),
            format!("{BASE}\ncomponents = [\"main\", \"contrib\"]"),
        ];
        for v in &variants {
            assert_ne!(base, key_of(v), "{v}");
        }
    }

    #[test]
    fn key_depends_on_the_host_mirror_when_manifest_has_none() {
        let m = Manifest::parse(BASE).unwrap();
        let a = m
            .clone()
            .resolve(|_| Some("http://a/debian".into()), "amd64")
            .unwrap();
        let b = m
            .resolve(|_| Some("http://b/debian".into()), "amd64")
            .unwrap();
        assert_ne!(a.key(), b.key());
    }

    #[test]
    fn key_depends_on_format_version() {
        let canonical = Manifest::parse(BASE)
            .unwrap()
            .resolve(|_| Some("http://m".into()), "amd64")
            .unwrap()
            .canonical_toml();
        assert_ne!(
            CacheKey::compute(FORMAT_VERSION, &canonical),
            CacheKey::compute(FORMAT_VERSION + 1, &canonical)
        );
    }

    #[test]
    fn canonical_form_round_trips() {
        let resolved = Manifest::parse(BASE)
            .unwrap()
            .resolve(|_| Some("http://deb.debian.org/debian".into()), "amd64")
            .unwrap();
        let again = Manifest::parse(&resolved.canonical_toml())
            .unwrap()
            .resolve(|_| panic!("mirror already set"), "arm64")
            .unwrap();
        assert_eq!(resolved, again);
        assert_eq!(resolved.key(), again.key());
    }

    #[test]
    fn key_looks_like_a_key() {
        let k = key_of(BASE);
        assert_eq!(CacheKey::from_hex(k.as_str()), Some(k.clone()));
        assert_eq!(k.short().len(), 12);
    }

    #[test]
    fn the_shipped_manifest_is_valid() {
        let m = Manifest::parse(DEFAULT_MANIFEST).unwrap();
        assert_eq!(m.name, "r");
        assert_eq!(m.suite, "bookworm");
        assert!(m.packages.contains(&"r-base-core".to_owned()));
        assert!(m.mount_points.contains(&"/work".to_owned()));
        assert!(
            m.mirror.is_none(),
            "the shipped manifest uses the host's mirror"
        );
    }

    #[test]
    fn rejects_bad_input() {
        let cases = [
            BASE.replace("name = \"r\"", "name = \"../r\""),
            BASE.replace("name = \"r\"", "name = \".hidden\""),
            BASE.replace("name = \"r\"", &format!("name = \"{}\"", "a".repeat(64))),
            BASE.replace("\"r-base-core\"", "\"R-Base\""),
            BASE.replace("\"r-base-core\"", "\"r-base-core; rm -rf /\""),
            BASE.replace("minbase", "fat"),
            BASE.replace("\"/tmp\"", "\"tmp\""),
            BASE.replace("\"/tmp\"", "\"/tmp/../etc\""),
            BASE.replace("\"/tmp\"", "\"/tmp/*\""),
            BASE.replace("\"/var/lib/apt/lists/*\"", "\"/\""),
            BASE.replace("\"/var/lib/apt/lists/*\"", "\"/*/..\""),
            BASE.replace(
                "packages = [\"r-base-core\", \"r-cran-mass\"]",
                "packages = []",
            ),
            format!("{BASE}\nmirror = \"ftp://x\""),
            format!("{BASE}\nunknown_field = 1"),
            format!("{BASE}\ncomponents = []"),
        ];
        for c in &cases {
            assert!(Manifest::parse(c).is_err(), "accepted: {c}");
        }
    }

    #[test]
    fn missing_mirror_is_an_error_naming_the_suite() {
        let err = Manifest::parse(BASE)
            .unwrap()
            .resolve(|_| None, "amd64")
            .unwrap_err();
        assert!(err.to_string().contains("bookworm"), "{err}");
    }
}
