//! The HTTP handlers: each reads and checks its input, calls the [`Platform`] front door
//! and shapes the answer. Authorization lives in the platform (an execution the caller
//! may not see is `not_found`; admin routes without rights are `forbidden`).
//!
//! [`Platform`]: hatchery_scheduler::platform::Platform

use std::sync::Arc;

use bytes::Bytes;
use hatchery_scheduler::bus::{group_totals, GroupTotals};
use hatchery_scheduler::model::{
    artifact_inline, ArtifactInfo, ExecState, ExecutionRecord, GroupStatus, HostRecord, HostState,
    Policy, Principal, Usage,
};
use hatchery_scheduler::platform::{GroupDemand, ListQuery, PlatformError, SubmitRequest};
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use serde_json::Value;

use crate::console;
use crate::error::{from_json_error, ApiError};
use crate::metrics::Gauges;
use crate::routes::{Route, RouteId};
use crate::server::{ApiState, Body, Query};
use crate::ws;

/// The OpenAPI 3.1 document describing every route.
pub const OPENAPI: &str = include_str!("../openapi.json");

pub async fn dispatch(
    st: Arc<ApiState>,
    route: &'static Route,
    params: Vec<(&'static str, String)>,
    query: Query,
    who: Option<Principal>,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let param = |name: &str| {
        params
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    let caller = || who.clone().ok_or_else(ApiError::internal);
    match route.id {
        RouteId::Submit => {
            no_query(&query)?;
            submit(&st, &caller()?, req).await
        }
        RouteId::ListExecutions => list(&st, &caller()?, &query).await,
        RouteId::GetExecution => {
            no_query(&query)?;
            let view = st.platform.get(&caller()?, &param("id")).await?;
            Ok(json(StatusCode::OK, &view))
        }
        RouteId::ListArtifacts => {
            no_query(&query)?;
            let artifacts = st.platform.artifacts(&caller()?, &param("id")).await?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "artifacts": artifacts }),
            ))
        }
        RouteId::GetArtifact => {
            no_query(&query)?;
            let (info, bytes) = st
                .platform
                .artifact(&caller()?, &param("id"), &param("name"))
                .await?;
            Ok(artifact_response(&info, bytes))
        }
        RouteId::CancelExecution => {
            no_query(&query)?;
            let record = st.platform.cancel(&caller()?, &param("id")).await?;
            Ok(json(StatusCode::OK, &record))
        }
        RouteId::ExecutionEvents => {
            ws::execution_events(st, caller()?, param("id"), &query, req).await
        }
        RouteId::AllEvents => ws::all_events(st, caller()?, &query, req).await,
        RouteId::AdminMonitor => ws::monitor(st, caller()?, &query, req).await,
        RouteId::GetOrgPolicy => {
            no_query(&query)?;
            let org = param("org");
            let policy = st.platform.get_org_policy(&caller()?, &org).await?;
            Ok(json(StatusCode::OK, &OrgPolicyView { org, policy }))
        }
        RouteId::PutOrgPolicy => {
            no_query(&query)?;
            let who = caller()?;
            let org = param("org");
            let policy = read_policy(&st, req).await?;
            let policy = st.platform.put_org_policy(&who, &org, policy).await?;
            Ok(json(StatusCode::OK, &OrgPolicyView { org, policy }))
        }
        RouteId::GetUserPolicy => {
            no_query(&query)?;
            let who = caller()?;
            let (org, user) = (param("org"), param("user"));
            let view = st.platform.get_user_policy(&who, &org, &user).await?;
            Ok(json(StatusCode::OK, &view))
        }
        RouteId::PutUserPolicy => {
            no_query(&query)?;
            let who = caller()?;
            let (org, user) = (param("org"), param("user"));
            let policy = read_policy(&st, req).await?;
            let view = st
                .platform
                .put_user_policy(&who, &org, &user, policy)
                .await?;
            Ok(json(StatusCode::OK, &view))
        }
        RouteId::AdminExecutions => {
            no_query(&query)?;
            admin_executions(&st, &caller()?).await
        }
        RouteId::AdminHosts => {
            no_query(&query)?;
            let hosts = st.platform.hosts(&caller()?).await?;
            Ok(json(StatusCode::OK, &hosts_view(&st, hosts)))
        }
        RouteId::AdminGroups => {
            no_query(&query)?;
            let groups = st.platform.groups(&caller()?).await?;
            let scaled = st
                .platform
                .store
                .group_statuses()
                .await
                .map_err(PlatformError::from)?;
            Ok(json(StatusCode::OK, &groups_view(&st, groups, &scaled)))
        }
        RouteId::AdminHostState => {
            no_query(&query)?;
            let who = caller()?;
            let body = read_json(&st, req).await?;
            let state = match body.get("state").and_then(Value::as_str) {
                Some(s) if body.as_object().is_some_and(|o| o.len() == 1) => HostState::parse(s)
                    .filter(|s| s.is_admin_settable())
                    .ok_or_else(|| {
                        ApiError::invalid(format!(
                            "state {s:?}: expected ready, cordoned or draining"
                        ))
                    })?,
                _ => {
                    return Err(ApiError::invalid(
                        "the body must be {\"state\": \"ready\" | \"cordoned\" | \"draining\"}",
                    ))
                }
            };
            let host = st
                .platform
                .set_host_state(&who, &param("agent"), state)
                .await?;
            let view = hosts_view(&st, vec![host]);
            Ok(json(StatusCode::OK, &view["hosts"][0]))
        }
        RouteId::Me => {
            no_query(&query)?;
            let who = caller()?;
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({
                    "org": who.org,
                    "user": who.user,
                    "role": who.role,
                    "languages": st.platform.config.languages,
                }),
            ))
        }
        RouteId::LocalSignInInfo => {
            no_query(&query)?;
            let who: Vec<Value> = if st.options.local_sign_in.is_some() {
                console::SignInAs::ALL
                    .into_iter()
                    .map(|a| {
                        let (org, user, role) = a.identity();
                        serde_json::json!({ "as": a, "org": org, "user": user, "role": role })
                    })
                    .collect()
            } else {
                Vec::new()
            };
            Ok(json(
                StatusCode::OK,
                &serde_json::json!({ "available": !who.is_empty(), "identities": who }),
            ))
        }
        RouteId::LocalSignIn => {
            no_query(&query)?;
            local_sign_in(&st, req, peer).await
        }
        RouteId::ConsolePage => {
            no_query(&query)?;
            console::asset("index.html", req.headers())
        }
        RouteId::ConsoleAsset => console::asset(&param("file"), req.headers()),
        RouteId::Metrics => Ok(metrics(&st).await),
        RouteId::Healthz => Ok(json(StatusCode::OK, &serde_json::json!({ "status": "ok" }))),
        RouteId::Readyz => readyz(&st),
        RouteId::OpenApi => {
            let mut r = Response::new(Full::new(Bytes::from_static(OPENAPI.as_bytes())));
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            Ok(r)
        }
    }
}

/// `POST /v1/console/sign-in`: a token for one of `hatchery up`'s two local identities,
/// for a browser on this machine only.
async fn local_sign_in(
    st: &ApiState,
    req: Request<Incoming>,
    peer: std::net::SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let Some(local) = &st.options.local_sign_in else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "this platform has no one-click sign-in: sign in with a token",
        ));
    };
    console::local_request(peer, req.headers())?;
    let body = read_json(st, req).await?;
    let asked: console::SignInRequest = serde_json::from_value(body).map_err(from_json_error)?;
    let (org, user, role) = asked.who.identity();
    let token = local
        .auth
        .mint(org, user, role, local.ttl)
        .map_err(|_| ApiError::internal())?;
    tracing::info!(%peer, org, user, "local sign-in");
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "token": token, "org": org, "user": user, "role": role }),
    ))
}

/// An artifact's bytes with the content type decided from its name. Never sniffed; shown
/// inline only when it is a raster image, PDF or plain data, otherwise a download; and
/// sandboxed (no script, no same-origin access) if a browser renders it anyway.
fn artifact_response(info: &ArtifactInfo, bytes: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(bytes)));
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&info.content_type) {
        h.insert(CONTENT_TYPE, v);
    }
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "sandbox; default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'",
        ),
    );
    h.insert(
        "cache-control",
        HeaderValue::from_static("private, max-age=3600"),
    );
    // The name is letters, digits, '.', '-' and '_' only: safe inside the quotes.
    let disposition = if artifact_inline(&info.content_type) {
        "inline"
    } else {
        "attachment"
    };
    if let Ok(v) = HeaderValue::from_str(&format!("{disposition}; filename=\"{}\"", info.name)) {
        h.insert("content-disposition", v);
    }
    r
}

/// A JSON response.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut r = Response::new(Full::new(Bytes::from(bytes)));
            *r.status_mut() = status;
            r.headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            r
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot serialise a response");
            ApiError::internal().into_response()
        }
    }
}

fn no_query(query: &Query) -> Result<(), ApiError> {
    allow_params(query, &[])
}

/// Refuses query parameters a route does not know (typos fail loudly).
pub fn allow_params(query: &Query, allowed: &[&str]) -> Result<(), ApiError> {
    for (k, _) in query {
        if !allowed.contains(&k.as_str()) {
            return Err(ApiError::invalid(if allowed.is_empty() {
                format!("unknown query parameter {k:?}: this route takes none")
            } else {
                format!(
                    "unknown query parameter {k:?}: this route takes {}",
                    allowed.join(", ")
                )
            }));
        }
    }
    Ok(())
}

pub fn query_value<'a>(query: &'a Query, name: &str) -> Option<&'a str> {
    query
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

/// Reads the body, refusing more than the configured limit (by `Content-Length` at once,
/// otherwise while reading).
pub async fn read_body(st: &ApiState, req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let limit = st.options.body_limit;
    if let Some(len) = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(ApiError::payload_too_large(limit));
        }
    }
    match Limited::new(req.into_body(), limit).collect().await {
        Ok(c) => Ok(c.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::payload_too_large(limit))
        }
        Err(e) => Err(ApiError::bad_json(format!("cannot read the body: {e}"))),
    }
}

/// The body as JSON: malformed → `bad_json`.
async fn read_json(st: &ApiState, req: Request<Incoming>) -> Result<Value, ApiError> {
    let bytes = read_body(st, req).await?;
    if bytes.is_empty() {
        return Err(ApiError::bad_json(
            "the body is empty; a JSON object is expected",
        ));
    }
    serde_json::from_slice::<Value>(&bytes).map_err(from_json_error)
}

/// Integer and fractional resource fields, checked before serde so that negative,
/// fractional, non-numeric or out-of-range numbers answer `invalid_limits`, not a
/// generic shape error.
const INT_LIMITS: &[(&str, u64)] = &[
    ("memory_bytes", u64::MAX),
    ("pids", u64::MAX),
    ("time_limit_ms", u64::MAX),
    ("max_parallel", u32::MAX as u64),
    ("warm_pool_size", u32::MAX as u64),
];
const FLOAT_LIMITS: &[&str] = &["cpus"];

pub fn check_limit_numbers(obj: &Value, what: &str) -> Result<(), ApiError> {
    let Some(map) = obj.as_object() else {
        return Ok(()); // the shape check reports it
    };
    for (field, v) in map {
        if v.is_null() {
            continue;
        }
        if let Some((_, max)) = INT_LIMITS.iter().find(|(f, _)| f == field) {
            let ok = match v.as_u64() {
                Some(n) => n <= *max,
                None => false,
            };
            if !ok {
                let why = match v.as_f64() {
                    Some(f) if f < 0.0 => "must not be negative",
                    Some(f) if f.fract() != 0.0 => "must be a whole number",
                    Some(_) => "is out of range",
                    None => "must be a number",
                };
                return Err(ApiError::invalid_limits(format!(
                    "{what}.{field} {why} (got {v})"
                )));
            }
        } else if FLOAT_LIMITS.contains(&field.as_str()) {
            match v.as_f64() {
                Some(f) if f.is_finite() && f > 0.0 => {}
                Some(_) => {
                    return Err(ApiError::invalid_limits(format!(
                        "{what}.{field} must be a number above 0 (got {v})"
                    )))
                }
                None => {
                    return Err(ApiError::invalid_limits(format!(
                        "{what}.{field} must be a number (got {v})"
                    )))
                }
            }
        }
    }
    Ok(())
}

/// Parses a submit body: malformed → `bad_json`; bad limit numbers → `invalid_limits`;
/// wrong shape → `invalid_request`.
pub fn parse_submit(value: Value) -> Result<SubmitRequest, ApiError> {
    if !value.is_object() {
        return Err(ApiError::invalid("the body must be a JSON object"));
    }
    if let Some(limits) = value.get("limits") {
        check_limit_numbers(limits, "limits")?;
    }
    serde_json::from_value(value).map_err(from_json_error)
}

async fn submit(
    st: &ApiState,
    who: &Principal,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let body = read_json(st, req).await?;
    let request = parse_submit(body)?;
    // What the hosts that report now have: a request none of them could hold is refused
    // instead of waiting for ever.
    let hosts = st.hosts.shapes();
    let record = st.platform.submit_within(who, request, &hosts).await?;
    st.metrics.submitted();
    tracing::info!(execution = %record.id, org = %who.org, user = %who.user, "submitted");
    let mut r = json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "id": record.id, "state": record.state }),
    );
    if let Ok(v) = HeaderValue::from_str(&format!("/v1/executions/{}", record.id)) {
        r.headers_mut().insert(LOCATION, v);
    }
    Ok(r)
}

#[derive(Serialize)]
struct ListView {
    executions: Vec<ExecutionRecord>,
}

async fn list(st: &ApiState, who: &Principal, query: &Query) -> Result<Response<Body>, ApiError> {
    allow_params(query, &["tab_id", "state", "limit"])?;
    let state = match query_value(query, "state") {
        Some(s) => Some(
            serde_json::from_value::<ExecState>(Value::String(s.to_string())).map_err(|_| {
                ApiError::invalid(format!(
                    "state {s:?} is not one of queued, running, succeeded, failed, \
                     oom_killed, timed_out, cancelled, lost"
                ))
            })?,
        ),
        None => None,
    };
    let limit = match query_value(query, "limit") {
        Some(l) => Some(
            l.parse::<usize>()
                .map_err(|_| ApiError::invalid(format!("limit {l:?} is not a whole number")))?,
        ),
        None => None,
    };
    let q = ListQuery {
        tab_id: query_value(query, "tab_id").map(str::to_string),
        state,
        limit,
    };
    let executions = st.platform.list(who, &q).await?;
    Ok(json(StatusCode::OK, &ListView { executions }))
}

async fn read_policy(st: &ApiState, req: Request<Incoming>) -> Result<Policy, ApiError> {
    let body = read_json(st, req).await?;
    if !body.is_object() {
        return Err(ApiError::invalid(
            "the body must be a JSON object (a policy)",
        ));
    }
    check_limit_numbers(&body, "policy")?;
    serde_json::from_value(body).map_err(from_json_error)
}

#[derive(Serialize)]
struct OrgPolicyView {
    org: String,
    policy: Policy,
}

#[derive(Serialize)]
struct AdminExecution {
    #[serde(flatten)]
    record: ExecutionRecord,
    /// Latest usage reported by its agent, while it runs.
    usage: Option<Usage>,
}

async fn admin_executions(st: &ApiState, who: &Principal) -> Result<Response<Body>, ApiError> {
    let records = st.platform.running(who).await?;
    let statuses = st.hosts.current();
    let executions: Vec<AdminExecution> = records
        .into_iter()
        .map(|record| {
            let usage = statuses
                .iter()
                .flat_map(|s| s.sandboxes.iter())
                .find(|s| s.execution_id == record.id)
                .map(|s| s.usage.clone());
            AdminExecution { record, usage }
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({ "executions": executions }),
    ))
}

/// Hosts as the store has them, each with its latest status (`null` when it reports
/// no longer).
fn hosts_view(st: &ApiState, hosts: Vec<HostRecord>) -> Value {
    let statuses = st.hosts.current();
    let hosts: Vec<Value> = hosts
        .into_iter()
        .map(|h| {
            let status = statuses.iter().find(|s| s.agent == h.agent);
            serde_json::json!({
                "agent": h.agent,
                "state": h.state,
                "alive": h.alive,
                "lease_expires_at": h.lease_expires_at,
                "status": status,
            })
        })
        .collect();
    serde_json::json!({ "hosts": hosts })
}

/// Each host group: its configuration, its reporting hosts by state, what they have for
/// executions and what the limits of what runs take of it, and the queued demand.
fn groups_view(st: &ApiState, groups: Vec<GroupDemand>, scaled: &[GroupStatus]) -> Value {
    let totals = group_totals(&st.hosts.current());
    let groups: Vec<Value> = groups
        .into_iter()
        .map(|d| {
            let g = d.group;
            let mut v = group_figures(&g.name, &totals, scaled);
            v.extend([
                ("shape".to_string(), serde_json::json!(g.shape)),
                ("languages".to_string(), serde_json::json!(g.languages)),
                ("min".to_string(), serde_json::json!(g.min)),
                ("max".to_string(), serde_json::json!(g.max)),
                ("provider".to_string(), serde_json::json!(g.provider)),
                (
                    "scale_down_after_ms".to_string(),
                    serde_json::json!(g.scale_down_after.as_millis() as u64),
                ),
                (
                    "queued".to_string(),
                    serde_json::json!({ "executions": d.queued, "need": d.queued_need }),
                ),
                (
                    "reserved".to_string(),
                    serde_json::json!({
                        "executions": d.reserved,
                        "need": d.reserved_need,
                        "active_users": d.active_users,
                    }),
                ),
            ]);
            Value::Object(v)
        })
        .collect();
    serde_json::json!({ "groups": groups })
}

/// What a group has now, for the groups view and the monitor: its reporting hosts by
/// state, their capacity, what the limits of what runs take of it, and what the
/// autoscaler last published about it (`null` for a group none scales).
pub fn group_figures(
    name: &str,
    totals: &std::collections::BTreeMap<String, GroupTotals>,
    scaled: &[GroupStatus],
) -> serde_json::Map<String, Value> {
    let t = totals.get(name).cloned().unwrap_or_default();
    serde_json::Map::from_iter([
        ("name".to_string(), serde_json::json!(name)),
        (
            "hosts".to_string(),
            serde_json::json!({ "ready": t.ready, "cordoned": t.cordoned, "draining": t.draining }),
        ),
        ("capacity".to_string(), serde_json::json!(t.capacity)),
        ("used".to_string(), serde_json::json!(t.used)),
        ("running".to_string(), serde_json::json!(t.running)),
        (
            "autoscaler".to_string(),
            serde_json::json!(scaled.iter().find(|s| s.group == name)),
        ),
    ])
}

/// `/metrics`: counters of this node, the store's active counts (kept by the store on
/// every state change: a scrape never scans the executions) and the host statuses.
pub async fn metrics(st: &ApiState) -> Response<Body> {
    let counts = match st.platform.store.active_counts().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %e, "metrics: cannot read the active counts");
            Default::default()
        }
    };
    let statuses = st.hosts.current();
    let gauges = Gauges {
        queued: counts.queued,
        running: counts.running,
        warm: statuses
            .iter()
            .flat_map(|s| {
                s.warm
                    .iter()
                    .map(move |(lang, n)| (s.agent.clone(), lang.clone(), *n))
            })
            .collect(),
        agents: statuses.len() as u64,
        hosts: statuses,
        groups: match st.platform.store.group_statuses().await {
            Ok(g) => g,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: cannot read the groups' status");
                Vec::new()
            }
        },
    };
    let mut r = Response::new(Full::new(Bytes::from(st.metrics.render(&gauges))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    r
}

fn readyz(st: &ApiState) -> Result<Response<Body>, ApiError> {
    let agents: Vec<Value> = st
        .hosts
        .current()
        .into_iter()
        .map(|s| {
            serde_json::json!({
                "agent": s.agent, "group": s.group, "draining": s.draining, "capacity": s.capacity,
                "running": s.running, "warm": s.warm, "allocatable": s.allocatable,
                "state": s.state,
            })
        })
        .collect();
    if st.hosts.ready() {
        Ok(json(
            StatusCode::OK,
            &serde_json::json!({ "ready": true, "agents": agents }),
        ))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "no agent has reported warm sandboxes yet",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submit_bodies_get_the_right_codes() {
        let ok = parse_submit(serde_json::json!({"language": "r", "code": "1"})).unwrap();
        assert_eq!(ok.language, "r");
        let code = |v: Value| parse_submit(v).unwrap_err().code;
        assert_eq!(
            code(serde_json::json!({"language": "r"})),
            "invalid_request"
        );
        assert_eq!(
            code(serde_json::json!({"language": "r", "code": "1", "extra": 1})),
            "invalid_request"
        );
        assert_eq!(code(serde_json::json!([1, 2])), "invalid_request");
        for bad in [
            serde_json::json!({"memory_bytes": -1}),
            serde_json::json!({"memory_bytes": 1.5}),
            serde_json::json!({"memory_bytes": 1e30}),
            serde_json::json!({"pids": "many"}),
            serde_json::json!({"cpus": -2}),
            serde_json::json!({"cpus": 0}),
        ] {
            assert_eq!(
                code(serde_json::json!({"language": "r", "code": "1", "limits": bad})),
                "invalid_limits"
            );
        }
        assert_eq!(
            code(serde_json::json!({"language": "r", "code": "1", "limits": {"disk": 1}})),
            "invalid_request"
        );
    }
}
