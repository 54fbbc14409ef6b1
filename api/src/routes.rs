//! The route table, as data: every (method, path template) the server answers, so the
//! router, the metrics labels and the test that keeps `openapi.json` true all read the
//! same list. Templates use OpenAPI's `{name}` segments.

/// What a route does (the handler the server dispatches to).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteId {
    Submit,
    ListExecutions,
    GetExecution,
    CancelExecution,
    ListArtifacts,
    GetArtifact,
    ExecutionEvents,
    AllEvents,
    GetOrgPolicy,
    PutOrgPolicy,
    GetUserPolicy,
    PutUserPolicy,
    AdminExecutions,
    AdminMonitor,
    AdminHosts,
    AdminHostState,
    AdminGroups,
    Me,
    LocalSignInInfo,
    LocalSignIn,
    ConsolePage,
    ConsoleAsset,
    Metrics,
    Healthz,
    Readyz,
    OpenApi,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub id: RouteId,
    /// A WebSocket upgrade (`?token=` accepted besides the `Authorization` header).
    pub websocket: bool,
    /// Needs a bearer token.
    pub authenticated: bool,
}

const fn r(method: &'static str, path: &'static str, id: RouteId) -> Route {
    Route {
        method,
        path,
        id,
        websocket: false,
        authenticated: true,
    }
}

const fn ws(path: &'static str, id: RouteId) -> Route {
    Route {
        method: "GET",
        path,
        id,
        websocket: true,
        authenticated: true,
    }
}

const fn public(path: &'static str, id: RouteId) -> Route {
    public_with("GET", path, id)
}

const fn public_with(method: &'static str, path: &'static str, id: RouteId) -> Route {
    Route {
        method,
        path,
        id,
        websocket: false,
        authenticated: false,
    }
}

pub const ROUTES: &[Route] = &[
    r("POST", "/v1/executions", RouteId::Submit),
    r("GET", "/v1/executions", RouteId::ListExecutions),
    r("GET", "/v1/executions/{id}", RouteId::GetExecution),
    r(
        "POST",
        "/v1/executions/{id}/cancel",
        RouteId::CancelExecution,
    ),
    r(
        "GET",
        "/v1/executions/{id}/artifacts",
        RouteId::ListArtifacts,
    ),
    r(
        "GET",
        "/v1/executions/{id}/artifacts/{name}",
        RouteId::GetArtifact,
    ),
    ws("/v1/executions/{id}/events", RouteId::ExecutionEvents),
    ws("/v1/events", RouteId::AllEvents),
    r("GET", "/v1/admin/orgs/{org}/policy", RouteId::GetOrgPolicy),
    r("PUT", "/v1/admin/orgs/{org}/policy", RouteId::PutOrgPolicy),
    r(
        "GET",
        "/v1/admin/orgs/{org}/users/{user}/policy",
        RouteId::GetUserPolicy,
    ),
    r(
        "PUT",
        "/v1/admin/orgs/{org}/users/{user}/policy",
        RouteId::PutUserPolicy,
    ),
    r("GET", "/v1/admin/executions", RouteId::AdminExecutions),
    ws("/v1/admin/monitor", RouteId::AdminMonitor),
    r("GET", "/v1/admin/hosts", RouteId::AdminHosts),
    r("GET", "/v1/admin/groups", RouteId::AdminGroups),
    r(
        "PUT",
        "/v1/admin/hosts/{agent}/state",
        RouteId::AdminHostState,
    ),
    r("GET", "/v1/me", RouteId::Me),
    public("/v1/console/sign-in", RouteId::LocalSignInInfo),
    public_with("POST", "/v1/console/sign-in", RouteId::LocalSignIn),
    public("/", RouteId::ConsolePage),
    public("/console/{file}", RouteId::ConsoleAsset),
    public("/metrics", RouteId::Metrics),
    public("/healthz", RouteId::Healthz),
    public("/readyz", RouteId::Readyz),
    public("/v1/openapi.json", RouteId::OpenApi),
];

/// The outcome of matching a request line against [`ROUTES`].
#[derive(Debug, PartialEq)]
pub enum Match {
    /// The route and its path parameters (percent-decoded), in template order.
    Found(&'static Route, Vec<(&'static str, String)>),
    /// The path exists, the method does not: these methods do.
    MethodNotAllowed(Vec<&'static str>),
    NotFound,
}

/// Matches `method` and `path` (no query string).
pub fn find(method: &str, path: &str) -> Match {
    let segments: Vec<&str> = path.split('/').collect();
    let mut allowed = Vec::new();
    for route in ROUTES {
        if let Some(params) = match_template(route.path, &segments) {
            if route.method == method {
                return Match::Found(route, params);
            }
            if !allowed.contains(&route.method) {
                allowed.push(route.method);
            }
        }
    }
    if allowed.is_empty() {
        Match::NotFound
    } else {
        Match::MethodNotAllowed(allowed)
    }
}

fn match_template(
    template: &'static str,
    segments: &[&str],
) -> Option<Vec<(&'static str, String)>> {
    let parts: Vec<&'static str> = template.split('/').collect();
    if parts.len() != segments.len() {
        return None;
    }
    let mut params = Vec::new();
    for (t, s) in parts.iter().zip(segments) {
        if let Some(name) = t.strip_prefix('{').and_then(|t| t.strip_suffix('}')) {
            if s.is_empty() {
                return None;
            }
            let value = percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .ok()?
                .into_owned();
            params.push((name, value));
        } else if t != s {
            return None;
        }
    }
    Some(params)
}

/// The route template a request matched, for metrics labels (`unmatched` otherwise, so
/// that scanners cannot blow up the label set).
pub fn label(m: &Match) -> &'static str {
    match m {
        Match::Found(r, _) => r.path,
        _ => "unmatched",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_templates_and_methods() {
        match find("GET", "/v1/executions/abc") {
            Match::Found(r, p) => {
                assert_eq!(r.id, RouteId::GetExecution);
                assert_eq!(p, vec![("id", "abc".to_string())]);
            }
            other => panic!("{other:?}"),
        }
        match find("PUT", "/v1/admin/orgs/ac%20me/users/bob/policy") {
            Match::Found(r, p) => {
                assert_eq!(r.id, RouteId::PutUserPolicy);
                assert_eq!(p[0], ("org", "ac me".to_string()));
                assert_eq!(p[1], ("user", "bob".to_string()));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            find("DELETE", "/v1/executions"),
            Match::MethodNotAllowed(vec!["POST", "GET"])
        );
        assert_eq!(find("GET", "/v1/executions/"), Match::NotFound);
        assert_eq!(find("GET", "/v2/executions"), Match::NotFound);
        assert_eq!(find("GET", "/v1/executions/a/b"), Match::NotFound);
    }

    #[test]
    fn e_mail_style_user_names_match_encoded_or_not() {
        for (path, user) in [
            (
                "/v1/admin/orgs/acme/users/ada%40example.com/policy",
                "ada@example.com",
            ),
            (
                "/v1/admin/orgs/acme/users/ada@example.com/policy",
                "ada@example.com",
            ),
            (
                "/v1/admin/orgs/acme/users/ada%2Blab%40example.co.uk/policy",
                "ada+lab@example.co.uk",
            ),
            // `+` in a path is a plus, not a space.
            (
                "/v1/admin/orgs/acme/users/ada+lab@example.co.uk/policy",
                "ada+lab@example.co.uk",
            ),
        ] {
            match find("GET", path) {
                Match::Found(r, p) => {
                    assert_eq!(r.id, RouteId::GetUserPolicy);
                    assert_eq!(p[1], ("user", user.to_string()), "{path}");
                }
                other => panic!("{path}: {other:?}"),
            }
        }
        // An encoded slash stays inside its segment (the store then refuses the name).
        match find("GET", "/v1/admin/orgs/acme/users/a%2F..%2Fb/policy") {
            Match::Found(_, p) => assert_eq!(p[1].1, "a/../b"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_route_is_unique() {
        for (i, a) in ROUTES.iter().enumerate() {
            for b in &ROUTES[i + 1..] {
                assert!(
                    !(a.method == b.method && a.path == b.path),
                    "duplicate {} {}",
                    a.method,
                    a.path
                );
            }
        }
    }
}
