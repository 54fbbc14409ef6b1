//! The host's apt sources: which mirror a manifest without `mirror` uses.
//!
//! Reads `/etc/apt/sources.list` and then `/etc/apt/sources.list.d/*.list` and
//! `*.sources` (deb822) in the order apt reads them, and picks the first `deb`
//! (not `deb-src`) entry whose suite is exactly the manifest's suite. Only
//! `http`, `https` and `file` URIs qualify (debootstrap cannot use the others).
//! Reading is the only I/O done here; nothing is written.

use std::fs;
use std::io;
use std::path::Path;

/// One enabled `deb` source: a URI and the suites it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub uri: String,
    pub suites: Vec<String>,
}

/// Parses the one-line format: `deb [options] URI suite [component...]`.
pub fn parse_one_line(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line.strip_prefix("deb") else {
            continue;
        };
        // `deb-src` and anything else that merely starts with "deb".
        if !rest.starts_with(char::is_whitespace) {
            continue;
        }
        let mut rest = rest.trim_start();
        if rest.starts_with('[') {
            match rest.find(']') {
                Some(end) => rest = rest[end + 1..].trim_start(),
                None => continue,
            }
        }
        let mut words = rest.split_whitespace();
        if let (Some(uri), Some(suite)) = (words.next(), words.next()) {
            out.push(Source {
                uri: uri.to_owned(),
                suites: vec![suite.to_owned()],
            });
        }
    }
    out
}

/// Parses the deb822 format (`Types:`, `URIs:`, `Suites:`, `Enabled:` stanzas).
pub fn parse_deb822(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    let mut fields: Vec<(String, String)> = Vec::new();
    let flush = |fields: &mut Vec<(String, String)>, out: &mut Vec<Source>| {
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        };
        let is_deb = get("Types").is_some_and(|t| t.split_whitespace().any(|t| t == "deb"));
        let enabled = !get("Enabled").is_some_and(|e| e.trim().eq_ignore_ascii_case("no"));
        if is_deb && enabled {
            let suites: Vec<String> = get("Suites")
                .unwrap_or("")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            for uri in get("URIs").unwrap_or("").split_whitespace() {
                out.push(Source {
                    uri: uri.to_owned(),
                    suites: suites.clone(),
                });
            }
        }
        fields.clear();
    };
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            flush(&mut fields, &mut out);
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = fields.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            fields.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    flush(&mut fields, &mut out);
    out
}

/// The first usable mirror serving `suite`.
pub fn find_mirror(sources: &[Source], suite: &str) -> Option<String> {
    sources
        .iter()
        .filter(|s| {
            ["http://", "https://", "file:/"]
                .iter()
                .any(|p| s.uri.starts_with(p))
        })
        .find(|s| s.suites.iter().any(|x| x == suite))
        .map(|s| s.uri.clone())
}

/// All `deb` sources configured under `root` (normally `/`), in apt's order.
pub fn host_sources(root: &Path) -> io::Result<Vec<Source>> {
    let mut out = Vec::new();
    let main = root.join("etc/apt/sources.list");
    match fs::read_to_string(&main) {
        Ok(text) => out.extend(parse_one_line(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = root.join("etc/apt/sources.list.d");
    let mut files: Vec<_> = match fs::read_dir(&dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    files.sort();
    for path in files {
        match path.extension().and_then(|e| e.to_str()) {
            Some("list") => out.extend(parse_one_line(&fs::read_to_string(&path)?)),
            Some("sources") => out.extend(parse_deb822(&fs::read_to_string(&path)?)),
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_format() {
        let text = "\
# deb http://commented/debian bookworm main
deb-src http://src/debian bookworm main
deb [arch=amd64 signed-by=/k.gpg] http://deb.example/debian bookworm-updates main
deb [ arch=amd64 ] http://deb.example/debian bookworm main # trailing comment
deb cdrom:[Debian]/ bookworm main
";
        let sources = parse_one_line(text);
        assert_eq!(sources.len(), 3);
        assert_eq!(
            find_mirror(&sources, "bookworm").as_deref(),
            Some("http://deb.example/debian")
        );
        assert_eq!(
            find_mirror(&sources, "bookworm-updates").as_deref(),
            Some("http://deb.example/debian")
        );
        assert_eq!(find_mirror(&sources, "trixie"), None);
    }

    #[test]
    fn deb822_format() {
        let text = "\
Types: deb-src
URIs: http://src/debian
Suites: bookworm

Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://deb.debian.org/debian
Suites: bookworm-updates
 bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://disabled/debian
Suites: trixie
Enabled: no

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
";
        let sources = parse_deb822(text);
        assert_eq!(sources.len(), 2);
        assert_eq!(
            find_mirror(&sources, "bookworm").as_deref(),
            Some("http://deb.debian.org/debian")
        );
        assert_eq!(
            find_mirror(&sources, "bookworm-security").as_deref(),
            Some("http://deb.debian.org/debian-security")
        );
        assert_eq!(find_mirror(&sources, "trixie"), None);
    }

    #[test]
    fn reads_list_then_sorted_directory_and_ignores_other_files() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("etc/apt/sources.list.d");
        fs::create_dir_all(&d).unwrap();
        fs::write(
            d.join("b.sources"),
            "Types: deb\nURIs: http://b/debian\nSuites: bookworm\n",
        )
        .unwrap();
        fs::write(d.join("a.list"), "deb http://a/debian bookworm main\n").unwrap();
        fs::write(
            d.join("0.list.disabled"),
            "deb http://x/debian bookworm main\n",
        )
        .unwrap();
        let sources = host_sources(dir.path()).unwrap();
        assert_eq!(
            find_mirror(&sources, "bookworm").as_deref(),
            Some("http://a/debian")
        );

        fs::write(
            dir.path().join("etc/apt/sources.list"),
            "deb http://main/debian bookworm main\n",
        )
        .unwrap();
        let sources = host_sources(dir.path()).unwrap();
        assert_eq!(
            find_mirror(&sources, "bookworm").as_deref(),
            Some("http://main/debian")
        );
    }
}
