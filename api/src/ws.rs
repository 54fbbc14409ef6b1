//! The WebSocket routes: one execution's events, all of the caller's events, and the
//! admin monitor. Everything that can fail (auth, access, bad query) is checked before
//! the upgrade, so it is answered as a plain JSON error.
//!
//! Event streams never lose an event: the platform subscribes before it reads the
//! backlog, the stream sends each `(execution, seq)` once and in order, and whenever the
//! live feed skips (a gap in `seq`, or the bus says events may have been missed: the
//! subscriber lagged behind, or the bus's connection dropped or came back) it reads the
//! missing events back from the store. A client that reconnects with `after=<last seq>`
//! gets exactly what follows. One execution's stream closes (code 1000) after its
//! `finished` event.
//!
//! Usage samples are live-only: sent as they come while the client listens, without a
//! `seq`, never stored and never replayed; they take no place in the `seq`s, which stay
//! 1, 2, 3, ... without gaps.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hatchery_scheduler::bus::{BusEvent, HostStatus, Received, Subscription};
use hatchery_scheduler::model::{EventBody, ExecEvent, LiveEvent, Principal};
use hatchery_scheduler::platform::EventFollow;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, SEC_WEBSOCKET_VERSION,
    UPGRADE,
};
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::error::ApiError;
use crate::handlers::{allow_params, query_value};
use crate::server::{ApiState, Body, Query};

type Ws = WebSocketStream<TokioIo<Upgraded>>;

/// Most `(id, seq)` pairs `GET /v1/events?after=` takes.
pub const MAX_AFTER_PAIRS: usize = 1000;

/// `GET /v1/executions/{id}/events?after=<seq>`
pub async fn execution_events(
    st: Arc<ApiState>,
    who: Principal,
    id: String,
    query: &Query,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    allow_params(query, &["after", "token"])?;
    let after = match query_value(query, "after") {
        Some(a) => a.parse::<u64>().map_err(|_| {
            ApiError::invalid(format!("after {a:?} must be the sequence number last seen"))
        })?,
        None => 0,
    };
    let accept = handshake(&req)?;
    // One event before `after` too: if that is `finished`, the stream is complete.
    let follow = st
        .platform
        .follow(&who, &id, after.saturating_sub(1))
        .await?;
    Ok(upgrade(st, req, accept, move |st, ws| {
        stream_execution(st, who, id, after, follow, ws)
    }))
}

/// `GET /v1/events?after=<id>:<seq>,...`
pub async fn all_events(
    st: Arc<ApiState>,
    who: Principal,
    query: &Query,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    allow_params(query, &["after", "token"])?;
    let after = match query_value(query, "after") {
        Some(a) => parse_after_pairs(a)?,
        None => Vec::new(),
    };
    let accept = handshake(&req)?;
    let follow = st.platform.follow_all(&who, &after).await?;
    Ok(upgrade(st, req, accept, move |st, ws| {
        stream_all(st, who, after, follow, ws)
    }))
}

/// `GET /v1/admin/monitor`
pub async fn monitor(
    st: Arc<ApiState>,
    who: Principal,
    query: &Query,
    req: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    allow_params(query, &["token", "agent", "group", "org"])?;
    let filter = MonitorFilter::parse(query, &who)?;
    let accept = handshake(&req)?;
    let statuses = st.platform.monitor(&who).await?;
    Ok(upgrade(st, req, accept, move |st, ws| {
        stream_monitor(st, who, filter, statuses, ws)
    }))
}

/// What a monitor client asked to see, applied here rather than by the client: `agent`
/// (names, comma-separated) keeps those hosts' statuses only, `group` (names,
/// comma-separated) those of hosts of those groups; `org` keeps that org's
/// sandboxes only, and a host's status is sent while it runs any of them (and once more
/// when its last one ended, so the client sees it go).
#[derive(Debug, Default, Clone)]
pub struct MonitorFilter {
    agents: Option<std::collections::HashSet<String>>,
    groups: Option<std::collections::HashSet<String>>,
    org: Option<String>,
    /// Hosts whose last status sent showed some of `org`'s sandboxes.
    shown: std::collections::HashSet<String>,
}

impl MonitorFilter {
    pub fn parse(query: &Query, who: &Principal) -> Result<MonitorFilter, ApiError> {
        let mut f = MonitorFilter::default();
        for (k, v) in query {
            let names = || -> Result<std::collections::HashSet<String>, ApiError> {
                let names: std::collections::HashSet<String> = v
                    .split(',')
                    .map(str::trim)
                    .filter(|n| !n.is_empty())
                    .map(str::to_string)
                    .collect();
                if names.is_empty() {
                    return Err(ApiError::invalid(format!("{k}: name at least one")));
                }
                Ok(names)
            };
            match k.as_str() {
                "agent" => f
                    .agents
                    .get_or_insert_with(Default::default)
                    .extend(names()?),
                "group" => f
                    .groups
                    .get_or_insert_with(Default::default)
                    .extend(names()?),
                "org" => {
                    if who.role != hatchery_scheduler::model::Role::Superadmin && *v != who.org {
                        return Err(ApiError::new(
                            StatusCode::FORBIDDEN,
                            "forbidden",
                            format!("an org admin of {:?} monitors its own org only", who.org),
                        ));
                    }
                    f.org = Some(v.clone());
                }
                _ => {}
            }
        }
        Ok(f)
    }

    /// The status to send, if any (already narrowed to what the caller may see).
    pub fn apply(&mut self, mut status: HostStatus) -> Option<HostStatus> {
        if let Some(agents) = &self.agents {
            if !agents.contains(&status.agent) {
                return None;
            }
        }
        if let Some(groups) = &self.groups {
            if !status.group.as_ref().is_some_and(|g| groups.contains(g)) {
                return None;
            }
        }
        let Some(org) = &self.org else {
            return Some(status);
        };
        status.sandboxes.retain(|s| s.org == *org);
        if status.sandboxes.is_empty() {
            self.shown.remove(&status.agent).then_some(status)
        } else {
            self.shown.insert(status.agent.clone());
            Some(status)
        }
    }
}

/// `id:seq,id:seq,...`
pub fn parse_after_pairs(s: &str) -> Result<Vec<(String, u64)>, ApiError> {
    let mut out = Vec::new();
    for pair in s.split(',').filter(|p| !p.is_empty()) {
        let parsed = pair
            .rsplit_once(':')
            .and_then(|(id, seq)| Some((id, seq.parse::<u64>().ok()?)))
            .filter(|(id, _)| !id.is_empty());
        match parsed {
            Some((id, seq)) => out.push((id.to_string(), seq)),
            None => {
                return Err(ApiError::invalid(format!(
                    "after: {pair:?} is not <execution id>:<seq>"
                )))
            }
        }
    }
    if out.len() > MAX_AFTER_PAIRS {
        return Err(ApiError::invalid(format!(
            "after names more than {MAX_AFTER_PAIRS} executions"
        )));
    }
    Ok(out)
}

/// Checks the upgrade request; returns `Sec-WebSocket-Accept`.
fn handshake(req: &Request<Incoming>) -> Result<HeaderValue, ApiError> {
    let h = req.headers();
    let has_token = |name, token: &str| {
        h.get_all(name).iter().any(|v| {
            v.to_str()
                .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
                .unwrap_or(false)
        })
    };
    if !has_token(UPGRADE, "websocket") || !has_token(CONNECTION, "upgrade") {
        return Err(ApiError::upgrade_required());
    }
    if h.get(SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "only WebSocket version 13 is supported",
        ));
    }
    let key = h.get(SEC_WEBSOCKET_KEY).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "websocket_required",
            "missing Sec-WebSocket-Key",
        )
    })?;
    HeaderValue::from_str(&derive_accept_key(key.as_bytes())).map_err(|_| ApiError::internal())
}

/// Answers 101 and runs `serve` on the upgraded connection in its own task.
fn upgrade<F, Fut>(
    st: Arc<ApiState>,
    mut req: Request<Incoming>,
    accept: HeaderValue,
    serve: F,
) -> Response<Body>
where
    F: FnOnce(Arc<ApiState>, Ws) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let on_upgrade = hyper::upgrade::on(&mut req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                // Clients only send control frames and small messages.
                let config = WebSocketConfig {
                    max_message_size: Some(64 << 10),
                    max_frame_size: Some(64 << 10),
                    ..WebSocketConfig::default()
                };
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(config),
                )
                .await;
                st.metrics.websocket_opened();
                serve(Arc::clone(&st), ws).await;
                st.metrics.websocket_closed();
            }
            Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut r = Response::new(Body::default());
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(SEC_WEBSOCKET_ACCEPT, accept);
    r
}

/// Why a stream stopped.
enum Stop {
    /// The client went away or broke the protocol.
    Gone,
    Close(CloseCode, &'static str),
}

struct Peer {
    tx: SplitSink<Ws, Message>,
    rx: SplitStream<Ws>,
}

impl Peer {
    fn new(ws: Ws) -> Peer {
        let (tx, rx) = ws.split();
        Peer { tx, rx }
    }

    async fn send<T: Serialize>(&mut self, value: &T) -> Result<(), Stop> {
        let text =
            serde_json::to_string(value).map_err(|_| Stop::Close(CloseCode::Error, "internal"))?;
        self.tx
            .send(Message::Text(text))
            .await
            .map_err(|_| Stop::Gone)
    }

    async fn ping(&mut self) -> Result<(), Stop> {
        self.tx
            .send(Message::Ping(Vec::new()))
            .await
            .map_err(|_| Stop::Gone)
    }

    /// What the client sent: only its close (or its disappearance) matters.
    async fn incoming(&mut self) -> Stop {
        loop {
            match self.rx.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return Stop::Gone,
                Some(Ok(_)) => continue,
            }
        }
    }

    async fn finish(mut self, stop: Stop) {
        if let Stop::Close(code, reason) = stop {
            let frame = CloseFrame {
                code,
                reason: reason.into(),
            };
            if self.tx.send(Message::Close(Some(frame))).await.is_ok() {
                // Let the client answer the close, briefly.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while let Some(Ok(m)) = self.rx.next().await {
                        if m.is_close() {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        let _ = self.tx.close().await;
    }
}

fn is_finished(e: &ExecEvent) -> bool {
    matches!(e.body, EventBody::Finished(_))
}

/// One execution's events after `after`, then close after `finished`.
async fn stream_execution(
    st: Arc<ApiState>,
    who: Principal,
    id: String,
    after: u64,
    follow: EventFollow,
    ws: Ws,
) {
    let mut peer = Peer::new(ws);
    let stop = execution_loop(&st, &who, &id, after, follow, &mut peer).await;
    peer.finish(stop).await;
}

async fn execution_loop(
    st: &ApiState,
    who: &Principal,
    id: &str,
    after: u64,
    mut follow: EventFollow,
    peer: &mut Peer,
) -> Stop {
    let mut last = after;
    let mut finished = false;
    let mut shutdown = st.shutdown.clone();
    let mut tick = tokio::time::interval(st.options.ws_ping);
    tick.reset();
    // Idle checks in a row that found the execution terminal without its `finished`
    // event (it is appended just after the record changes).
    let mut terminal_checks = 0u32;
    loop {
        for e in std::mem::take(&mut follow.backlog) {
            if e.execution_id != id {
                continue;
            }
            if e.seq <= last {
                finished |= is_finished(&e);
                continue;
            }
            if let Err(stop) = peer.send(&e).await {
                return stop;
            }
            last = e.seq;
            finished |= is_finished(&e);
        }
        if finished {
            return Stop::Close(CloseCode::Normal, "finished");
        }
        let refollow = loop {
            tokio::select! {
                ev = follow.live.recv() => match ev {
                    Received::Item(BusEvent::Live(e)) => {
                        if e.execution_id == id {
                            if let Err(stop) = peer.send(&e).await {
                                return stop;
                            }
                        }
                    }
                    Received::Item(BusEvent::Stored(e)) => {
                        if e.execution_id != id || e.seq <= last {
                            continue;
                        }
                        if e.seq > last + 1 {
                            break true; // a gap: read it back from the store
                        }
                        if let Err(stop) = peer.send(&e).await {
                            return stop;
                        }
                        last = e.seq;
                        if is_finished(&e) {
                            return Stop::Close(CloseCode::Normal, "finished");
                        }
                    }
                    // Catch up from the store.
                    Received::Missed => break true,
                    Received::Closed => return Stop::Close(CloseCode::Away, "the platform stopped"),
                },
                stop = peer.incoming() => return stop,
                _ = crate::server::stopped(&mut shutdown) => return Stop::Close(CloseCode::Away, "server shutting down"),
                _ = tick.tick() => {
                    if let Err(stop) = peer.ping().await {
                        return stop;
                    }
                    match st.platform.store.get(id).await {
                        Ok(Some(r)) if r.state.is_terminal() => {
                            terminal_checks += 1;
                            if terminal_checks > 2 {
                                // Finished long ago and nothing is left to send.
                                return Stop::Close(CloseCode::Normal, "finished");
                            }
                            break true;
                        }
                        Ok(None) => return Stop::Close(CloseCode::Normal, "expired"),
                        _ => {}
                    }
                }
            }
        };
        if refollow {
            match st.platform.follow(who, id, last.saturating_sub(1)).await {
                Ok(f) => follow = f,
                Err(_) => return Stop::Close(CloseCode::Error, "cannot read events"),
            }
        }
    }
}

/// All of the caller's events (never closes by itself).
async fn stream_all(
    st: Arc<ApiState>,
    who: Principal,
    after: Vec<(String, u64)>,
    follow: EventFollow,
    ws: Ws,
) {
    let mut peer = Peer::new(ws);
    let stop = all_loop(&st, &who, after, follow, &mut peer).await;
    peer.finish(stop).await;
}

/// Per-execution bookkeeping of [`stream_all`].
struct Seen {
    last: HashMap<String, u64>,
    owned: HashMap<String, bool>,
}

impl Seen {
    /// Sends `e` unless already sent; reads gaps back from the store.
    async fn offer(
        &mut self,
        st: &ApiState,
        who: &Principal,
        e: ExecEvent,
        peer: &mut Peer,
    ) -> Result<(), Stop> {
        let last = self.last.get(&e.execution_id).copied().unwrap_or(0);
        if e.seq <= last {
            return Ok(());
        }
        if e.seq > last + 1 {
            if let Ok(f) = st.platform.follow(who, &e.execution_id, last).await {
                for missing in f.backlog.into_iter().filter(|m| m.seq <= e.seq) {
                    self.send(missing, peer).await?;
                }
            }
            return Ok(());
        }
        self.send(e, peer).await
    }

    async fn send(&mut self, e: ExecEvent, peer: &mut Peer) -> Result<(), Stop> {
        let last = self.last.entry(e.execution_id.clone()).or_insert(0);
        if e.seq <= *last {
            return Ok(());
        }
        peer.send(&e).await?;
        *last = e.seq;
        Ok(())
    }

    async fn owns(&mut self, st: &ApiState, who: &Principal, execution_id: &str) -> bool {
        if let Some(b) = self.owned.get(execution_id) {
            return *b;
        }
        let b = st.platform.owns_execution(who, execution_id).await;
        self.owned.insert(execution_id.to_string(), b);
        b
    }

    /// Sends a live-only event (no seq: nothing to keep track of).
    async fn send_live(&mut self, e: LiveEvent, peer: &mut Peer) -> Result<(), Stop> {
        peer.send(&e).await
    }
}

async fn all_loop(
    st: &ApiState,
    who: &Principal,
    after: Vec<(String, u64)>,
    mut follow: EventFollow,
    peer: &mut Peer,
) -> Stop {
    let mut seen = Seen {
        last: after.into_iter().collect(),
        owned: HashMap::new(),
    };
    let mut shutdown = st.shutdown.clone();
    let mut tick = tokio::time::interval(st.options.ws_ping);
    tick.reset();
    loop {
        let mut backlog = std::mem::take(&mut follow.backlog);
        backlog.sort_by_key(|e| (e.at, e.seq));
        for e in backlog {
            seen.owned.insert(e.execution_id.clone(), true);
            if let Err(stop) = seen.offer(st, who, e, peer).await {
                return stop;
            }
        }
        loop {
            tokio::select! {
                ev = follow.live.recv() => match ev {
                    Received::Item(ev) => {
                        if !seen.owns(st, who, ev.execution_id()).await {
                            continue;
                        }
                        let sent = match ev {
                            BusEvent::Stored(e) => seen.offer(st, who, e, peer).await,
                            BusEvent::Live(e) => seen.send_live(e, peer).await,
                        };
                        if let Err(stop) = sent {
                            return stop;
                        }
                    }
                    Received::Missed => break,
                    Received::Closed => return Stop::Close(CloseCode::Away, "the platform stopped"),
                },
                stop = peer.incoming() => return stop,
                _ = crate::server::stopped(&mut shutdown) => return Stop::Close(CloseCode::Away, "server shutting down"),
                _ = tick.tick() => {
                    if let Err(stop) = peer.ping().await {
                        return stop;
                    }
                }
            }
        }
        // Events may have been missed: catch up from the store.
        let known: Vec<(String, u64)> = seen
            .last
            .iter()
            .filter(|(id, _)| seen.owned.get(*id).copied().unwrap_or(true))
            .map(|(id, seq)| (id.clone(), *seq))
            .collect();
        match st.platform.follow_all(who, &known).await {
            Ok(f) => follow = f,
            Err(_) => return Stop::Close(CloseCode::Error, "cannot read events"),
        }
    }
}

/// Host statuses (usage of every running sandbox the caller may see).
async fn stream_monitor(
    st: Arc<ApiState>,
    who: Principal,
    mut filter: MonitorFilter,
    mut statuses: Subscription<HostStatus>,
    ws: Ws,
) {
    let mut peer = Peer::new(ws);
    let mut shutdown = st.shutdown.clone();
    let mut tick = tokio::time::interval(st.options.ws_ping);
    tick.reset();
    // Superadmins watching the fleet (no host or org filter) also get each group's
    // figures, every few seconds.
    let groups_wanted = who.role == hatchery_scheduler::model::Role::Superadmin
        && !st.platform.config.groups.is_empty()
        && filter.agents.is_none()
        && filter.org.is_none();
    let mut groups_tick = tokio::time::interval(GROUPS_EVERY);
    let stop = 'run: {
        for s in st.hosts.current() {
            let Some(s) = filter.apply(st.platform.visible_status(&who, s)) else {
                continue;
            };
            if let Err(stop) = peer.send(&s).await {
                break 'run stop;
            }
        }
        loop {
            tokio::select! {
                s = statuses.recv() => match s {
                    Received::Item(s) => {
                        let Some(s) = filter.apply(st.platform.visible_status(&who, s)) else {
                            continue;
                        };
                        if let Err(stop) = peer.send(&s).await {
                            break 'run stop;
                        }
                    }
                    // Statuses come again periodically.
                    Received::Missed => continue,
                    Received::Closed => break 'run Stop::Close(CloseCode::Away, "the platform stopped"),
                },
                stop = peer.incoming() => break 'run stop,
                _ = crate::server::stopped(&mut shutdown) => break 'run Stop::Close(CloseCode::Away, "server shutting down"),
                _ = tick.tick() => {
                    if let Err(stop) = peer.ping().await {
                        break 'run stop;
                    }
                }
                _ = groups_tick.tick(), if groups_wanted => {
                    if let Some(groups) = groups_message(&st, &filter).await {
                        if let Err(stop) = peer.send(&groups).await {
                            break 'run stop;
                        }
                    }
                }
            }
        }
    };
    peer.finish(stop).await;
}

/// How often a monitor gets the groups' figures.
const GROUPS_EVERY: Duration = Duration::from_secs(2);

/// The monitor's groups message: `{"kind": "groups", "groups": [...]}`, each group with
/// its reporting hosts by state, their capacity, what the limits of what runs take of it,
/// and what the autoscaler last published (pending demand, hosts on their way and being
/// removed, room kept for active users); `None` when the store cannot be read.
async fn groups_message(st: &ApiState, filter: &MonitorFilter) -> Option<serde_json::Value> {
    let scaled = match st.platform.store.group_statuses().await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "monitor: cannot read the groups' status");
            return None;
        }
    };
    let totals = hatchery_scheduler::bus::group_totals(&st.hosts.current());
    let groups: Vec<serde_json::Value> = st
        .platform
        .config
        .groups
        .iter()
        .filter(|g| filter.groups.as_ref().is_none_or(|f| f.contains(&g.name)))
        .map(|g| {
            serde_json::Value::Object(crate::handlers::group_figures(&g.name, &totals, &scaled))
        })
        .collect();
    Some(serde_json::json!({ "kind": "groups", "groups": groups }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn after_pairs() {
        assert_eq!(
            parse_after_pairs("a:1,b:22").unwrap(),
            vec![("a".to_string(), 1), ("b".to_string(), 22)]
        );
        assert!(parse_after_pairs("").unwrap().is_empty());
        assert!(parse_after_pairs("a").is_err());
        assert!(parse_after_pairs(":3").is_err());
        assert!(parse_after_pairs("a:x").is_err());
    }

    #[test]
    fn the_monitor_filter_keeps_the_hosts_and_the_org_asked_for() {
        use hatchery_scheduler::bus::SandboxUsage;
        use hatchery_scheduler::model::Role as R;
        let who = |role: R| Principal {
            org: "acme".into(),
            user: "root".into(),
            role,
        };
        let q = |pairs: &[(&str, &str)]| -> Query {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let status = |agent: &str, orgs: &[&str]| HostStatus {
            agent: agent.into(),
            group: None,
            at: 1,
            capacity: 4,
            running: orgs.len() as u32,
            allocatable: Default::default(),
            draining: false,
            state: Default::default(),
            load: Default::default(),
            warm: vec![],
            sandboxes: orgs
                .iter()
                .enumerate()
                .map(|(i, o)| SandboxUsage {
                    execution_id: format!("{agent}-{i}"),
                    org: o.to_string(),
                    user: "u".into(),
                    usage: Default::default(),
                    limits: Default::default(),
                })
                .collect(),
        };
        // No filter: everything.
        let mut f = MonitorFilter::parse(&q(&[]), &who(R::Superadmin)).unwrap();
        assert!(f.apply(status("a", &[])).is_some());
        // By host.
        let mut f = MonitorFilter::parse(&q(&[("agent", "a, c")]), &who(R::Superadmin)).unwrap();
        assert!(f.apply(status("a", &[])).is_some());
        assert!(f.apply(status("b", &["x"])).is_none());
        assert!(f.apply(status("c", &[])).is_some());
        assert!(MonitorFilter::parse(&q(&[("agent", ",")]), &who(R::Superadmin)).is_err());
        // By group.
        let mut f = MonitorFilter::parse(&q(&[("group", "big")]), &who(R::Superadmin)).unwrap();
        let mut in_big = status("d", &[]);
        in_big.group = Some("big".into());
        assert!(f.apply(in_big).is_some());
        assert!(f.apply(status("a", &[])).is_none(), "a host of no group");
        assert!(MonitorFilter::parse(&q(&[("group", "")]), &who(R::Superadmin)).is_err());
        // By org: only its sandboxes, only hosts that run some, and once more after.
        let mut f = MonitorFilter::parse(&q(&[("org", "globex")]), &who(R::Superadmin)).unwrap();
        assert!(f.apply(status("a", &["acme"])).is_none());
        let s = f.apply(status("a", &["acme", "globex"])).unwrap();
        assert_eq!(s.sandboxes.len(), 1);
        assert_eq!(s.sandboxes[0].org, "globex");
        assert!(
            f.apply(status("a", &["acme"])).is_some(),
            "its last one ended"
        );
        assert!(f.apply(status("a", &["acme"])).is_none());
        // An org admin monitors its own org only.
        assert!(MonitorFilter::parse(&q(&[("org", "acme")]), &who(R::OrgAdmin)).is_ok());
        let e = MonitorFilter::parse(&q(&[("org", "globex")]), &who(R::OrgAdmin)).unwrap_err();
        assert_eq!(e.status, StatusCode::FORBIDDEN);
    }
}
