//! The web console: the playground (run code, watch it stream, see its plots) and the
//! monitor (admins watch and cancel running sandboxes, edit policies), one page of static
//! assets compiled into the binary — no CDN, nothing fetched at run time. The page talks
//! to the same public API as any client.
//!
//! The page and its scripts are served with a strict Content-Security-Policy (scripts
//! from this origin only, no inline script, no framing), and the one-click local sign-in
//! of `hatchery up` answers only a loopback caller that names a loopback host (so neither
//! another machine nor a web page using DNS rebinding can mint itself a token).

use std::hash::{DefaultHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use hatchery_scheduler::model::Role;
use http_body_util::Full;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ETAG, HOST, IF_NONE_MATCH};
use hyper::{HeaderMap, Response, StatusCode};
use serde::{Deserialize, Serialize};

use crate::auth::Auth;
use crate::error::ApiError;
use crate::server::Body;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "index.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../console/assets/index.html"),
    },
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../console/assets/app.js"),
    },
    Asset {
        name: "app.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../console/assets/app.css"),
    },
    // CodeMirror 6, bundled by scripts/build-console-editor.sh from pinned packages.
    Asset {
        name: "editor.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../console/assets/editor.js"),
    },
];

/// The page's policy: its own scripts and styles only (CodeMirror injects style
/// elements, hence `'unsafe-inline'` for styles, never for scripts), images from this
/// origin or the page's own blobs (artifacts are fetched with the token, then shown),
/// API calls and WebSockets to this origin only, and no framing.
pub const PAGE_CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self' \
     'unsafe-inline'; img-src 'self' blob: data:; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The `ETag` of `ASSETS[i]`: a hash of its bytes, computed once per process.
fn etag(i: usize) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let mut h = DefaultHasher::new();
                a.bytes.hash(&mut h);
                format!("\"{:016x}\"", h.finish())
            })
            .collect()
    });
    &tags[i]
}

/// `GET /` (the page) and `GET /console/{file}` (its assets). Revalidated on every load
/// (`no-cache` with an `ETag`), so a new binary's page is never mixed with old scripts.
pub fn asset(name: &str, headers: &HeaderMap) -> Result<Response<Body>, ApiError> {
    let i = ASSETS.iter().position(|a| a.name == name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("the console has no file {name:?}"),
        )
    })?;
    let (asset, tag) = (&ASSETS[i], etag(i));
    let fresh = headers
        .get(IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut r = if fresh {
        let mut r = Response::new(Body::default());
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        Response::new(Full::new(Bytes::from_static(asset.bytes)))
    };
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(ETAG, HeaderValue::from_static(tag));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(PAGE_CSP),
    );
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    Ok(r)
}

/// The identities the one-click sign-in of `hatchery up` hands out: the same two whose
/// tokens `up` prints.
#[derive(Clone)]
pub struct LocalSignIn {
    pub auth: Auth,
    pub ttl: Duration,
}

impl std::fmt::Debug for LocalSignIn {
    // The key stays out of logs and debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalSignIn")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

/// Who a local sign-in is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SignInAs {
    /// Org `demo`, user `demo`.
    User,
    /// Org `hatchery`, user `admin`.
    Superadmin,
}

impl SignInAs {
    pub const ALL: [SignInAs; 2] = [SignInAs::User, SignInAs::Superadmin];

    pub fn identity(self) -> (&'static str, &'static str, Role) {
        match self {
            SignInAs::User => ("demo", "demo", Role::User),
            SignInAs::Superadmin => ("hatchery", "admin", Role::Superadmin),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignInRequest {
    #[serde(rename = "as")]
    pub who: SignInAs,
}

/// Whether a request may use the local sign-in: it comes from this machine and names
/// this machine (`Host` is a loopback address or `localhost`), and it is JSON (which a
/// cross-origin page cannot send without a preflight this API never grants).
pub fn local_request(peer: SocketAddr, headers: &HeaderMap) -> Result<(), ApiError> {
    let refuse = |why: &str| {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the one-click sign-in is only for this machine's own browser: {why}"),
        ))
    };
    if !peer.ip().is_loopback() {
        return refuse("the request does not come from a loopback address");
    }
    let host = headers
        .get(HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !loopback_host(host) {
        return refuse("the Host header does not name this machine");
    }
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    if !json {
        return refuse("the body must be application/json");
    }
    Ok(())
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = if let Some(rest) = host.strip_prefix('[') {
        match rest.split_once(']') {
            Some((ip, tail)) if tail.is_empty() || tail.starts_with(':') => ip,
            _ => return false,
        }
    } else {
        host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host)
    };
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    name.parse::<std::net::IpAddr>()
        .map(|ip| ip.is_loopback())
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(host: &str, content_type: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HOST, HeaderValue::from_str(host).unwrap());
        h.insert(CONTENT_TYPE, HeaderValue::from_str(content_type).unwrap());
        h
    }

    #[test]
    fn local_sign_in_needs_a_loopback_peer_host_and_json() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        for host in [
            "127.0.0.1:8080",
            "localhost:8080",
            "[::1]:8080",
            "localhost",
        ] {
            assert!(
                local_request(local, &headers(host, "application/json")).is_ok(),
                "{host}"
            );
        }
        assert!(local_request(remote, &headers("127.0.0.1:8080", "application/json")).is_err());
        // DNS rebinding: the browser names the attacker's host.
        for host in ["evil.example:8080", "127.0.0.1.evil.example", "[::1]x", ""] {
            assert!(
                local_request(local, &headers(host, "application/json")).is_err(),
                "{host}"
            );
        }
        // A form post (no preflight) is refused.
        assert!(local_request(
            local,
            &headers("127.0.0.1:8080", "application/x-www-form-urlencoded")
        )
        .is_err());
    }

    #[test]
    fn assets_have_strict_headers_and_revalidate() {
        let r = asset("index.html", &HeaderMap::new()).unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        let csp = r.headers()["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("script-src 'self'") && !csp.contains("unsafe-eval"));
        let tag = r.headers()[ETAG].clone();
        let mut h = HeaderMap::new();
        h.insert(IF_NONE_MATCH, tag);
        assert_eq!(
            asset("index.html", &h).unwrap().status(),
            StatusCode::NOT_MODIFIED
        );
        assert!(asset("../Cargo.toml", &HeaderMap::new()).is_err());
    }
}
