//! The HTTP server: accepts connections (hyper 1, HTTP/1.1 with upgrades), matches each
//! request against the route table, authenticates it, runs its handler with panics
//! caught, answers errors as JSON, counts and logs every request, and shuts down
//! gracefully (in-flight requests finish; WebSockets get a `going away` close frame).
//!
//! The server holds no platform state of its own: everything goes through the
//! [`Platform`] front door. It only watches the bus for host statuses (readiness,
//! metrics, the usage shown to admins) and counts finished executions for metrics.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use hatchery_scheduler::bus::{BusEvent, HostStatus, Received};
use hatchery_scheduler::model::{EventBody, Principal, Resources};
use hatchery_scheduler::platform::Platform;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::auth::Auth;
use crate::error::ApiError;
use crate::handlers;
use crate::metrics::Metrics;
use crate::routes::{self, Match, Route};

pub type Body = Full<Bytes>;

/// An agent's status is considered current for this long.
pub const STATUS_FRESH: Duration = Duration::from_secs(30);
/// How long shutdown waits for in-flight requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// Settings of the HTTP layer.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest request body read.
    pub body_limit: usize,
    /// How long a client may take to send its request headers.
    pub header_timeout: Duration,
    /// Interval of WebSocket pings (and of the idle checks of event streams).
    pub ws_ping: Duration,
    /// The console's one-click sign-in (`hatchery up` on a loopback address): `None`
    /// answers `POST /v1/console/sign-in` with 404.
    pub local_sign_in: Option<crate::console::LocalSignIn>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            body_limit: 2 << 20,
            header_timeout: Duration::from_secs(30),
            ws_ping: Duration::from_secs(5),
            local_sign_in: None,
        }
    }
}

/// The latest status of every agent, from the bus.
#[derive(Default)]
pub struct HostBoard {
    /// agent → (when reported, status, whether it ever had every pool warm).
    latest: RwLock<HashMap<String, (Instant, HostStatus, bool)>>,
}

impl HostBoard {
    pub fn update(&self, status: HostStatus) {
        let warm = !status.warm.is_empty() && status.warm.iter().all(|(_, n)| *n > 0);
        let mut m = self.latest.write().unwrap_or_else(|e| e.into_inner());
        let was = m.get(&status.agent).map(|(_, _, w)| *w).unwrap_or(false);
        m.insert(status.agent.clone(), (Instant::now(), status, was || warm));
    }

    /// Statuses reported within [`STATUS_FRESH`].
    pub fn current(&self) -> Vec<HostStatus> {
        let m = self.latest.read().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<HostStatus> = m
            .values()
            .filter(|(at, _, _)| at.elapsed() < STATUS_FRESH)
            .map(|(_, s, _)| s.clone())
            .collect();
        v.sort_by(|a, b| a.agent.cmp(&b.agent));
        v
    }

    /// (language, what the host has for executions) of every host that reports
    /// currently, for admission: what a request is checked against, without copying the
    /// statuses.
    pub fn shapes(&self) -> Vec<(String, Resources)> {
        let m = self.latest.read().unwrap_or_else(|e| e.into_inner());
        m.values()
            .filter(|(at, _, _)| at.elapsed() < STATUS_FRESH)
            .flat_map(|(_, s, _)| s.warm.iter().map(|(l, _)| (l.clone(), s.allocatable)))
            .collect()
    }

    /// Ready: some agent reports currently, takes work, and has had a frozen sandbox in
    /// every pool (a pool refilling after a claim does not make the platform unready).
    pub fn ready(&self) -> bool {
        let m = self.latest.read().unwrap_or_else(|e| e.into_inner());
        m.values()
            .any(|(at, s, warm)| *warm && !s.draining && at.elapsed() < STATUS_FRESH)
    }
}

/// What every handler reaches.
pub struct ApiState {
    pub platform: Platform,
    pub auth: Auth,
    pub metrics: Metrics,
    pub hosts: HostBoard,
    pub options: ServerOptions,
    /// Flips to `true` when the server shuts down (WebSockets close on it).
    pub shutdown: watch::Receiver<bool>,
}

/// The API server. [`ApiServer::new`] wires it to a platform; [`ApiServer::run`] serves
/// until the shutdown future resolves.
pub struct ApiServer {
    state: Arc<ApiState>,
    shutdown_tx: watch::Sender<bool>,
}

impl ApiServer {
    pub fn new(platform: Platform, auth: Auth, options: ServerOptions) -> ApiServer {
        let (shutdown_tx, shutdown) = watch::channel(false);
        let state = Arc::new(ApiState {
            platform,
            auth,
            metrics: Metrics::default(),
            hosts: HostBoard::default(),
            options,
            shutdown,
        });
        ApiServer { state, shutdown_tx }
    }

    pub fn state(&self) -> Arc<ApiState> {
        Arc::clone(&self.state)
    }

    /// Serves `listener` until `stop` resolves, then stops accepting, lets in-flight
    /// requests finish (up to [`SHUTDOWN_GRACE`]) and closes WebSockets.
    pub async fn run(
        self,
        listener: TcpListener,
        stop: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let watchers = self.spawn_watchers();
        let mut conns = JoinSet::new();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            // Out of file descriptors and the like: wait, do not spin.
                            tracing::warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let _ = stream.set_nodelay(true);
                    conns.spawn(serve_connection(Arc::clone(&self.state), stream, peer));
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }
        drop(listener);
        tracing::info!(connections = conns.len(), "shutting down the API");
        let _ = self.shutdown_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!("connections still open after the grace period; closing them");
            conns.shutdown().await;
        }
        for w in watchers {
            w.abort();
        }
        Ok(())
    }

    /// Background readers of the bus: host statuses and finished executions.
    fn spawn_watchers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        let st = Arc::clone(&self.state);
        let mut statuses = st.platform.bus.subscribe_status();
        let hosts = tokio::spawn(async move {
            loop {
                match statuses.recv().await {
                    Received::Item(s) => st.hosts.update(s),
                    // Statuses come again periodically.
                    Received::Missed => continue,
                    Received::Closed => break,
                }
            }
        });
        let st = Arc::clone(&self.state);
        let mut events = st.platform.bus.subscribe_events();
        let finished = tokio::spawn(async move {
            loop {
                match events.recv().await {
                    Received::Item(BusEvent::Stored(e)) => {
                        if let EventBody::Finished(summary) = &e.body {
                            st.metrics.finished(summary.state.as_str());
                        }
                    }
                    Received::Item(BusEvent::Live(_)) => {}
                    // Executions that finished meanwhile go uncounted here (the count is
                    // of what this process saw on the bus).
                    Received::Missed => continue,
                    Received::Closed => break,
                }
            }
        });
        vec![hosts, finished]
    }
}

async fn serve_connection(st: Arc<ApiState>, stream: tokio::net::TcpStream, peer: SocketAddr) {
    let mut shutdown = st.shutdown.clone();
    let svc_state = Arc::clone(&st);
    let service = service_fn(move |req| {
        let st = Arc::clone(&svc_state);
        async move { Ok::<_, Infallible>(handle(st, req, peer).await) }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(st.options.header_timeout)
        .serve_connection(TokioIo::new(stream), service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => {
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        }
        _ = crate::server::stopped(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// Resolves once the server shuts down.
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|s| *s).await;
}

/// One request: route, authenticate, dispatch (panics caught), count, log.
pub async fn handle(st: Arc<ApiState>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let path = req.uri().path().to_string();
    let request_id = uuid::Uuid::new_v4().simple().to_string();
    let matched = routes::find(&method, &path);
    let label = routes::label(&matched);
    let result = match matched {
        Match::Found(route, params) => {
            let fut = dispatch(Arc::clone(&st), route, params, req, peer);
            match AssertUnwindSafe(fut).catch_unwind().await {
                Ok(r) => r,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(%request_id, route = label, panic = %what, "handler panicked");
                    Err(ApiError::internal())
                }
            }
        }
        Match::MethodNotAllowed(allow) => Err(ApiError::method_not_allowed(&allow)),
        Match::NotFound => Err(ApiError::unknown_route(&path)),
    };
    let mut resp = match result {
        Ok(r) => r,
        Err(e) => {
            if e.status == hyper::StatusCode::INTERNAL_SERVER_ERROR {
                tracing::warn!(%request_id, code = e.code, message = %e.message, "request failed");
            }
            e.into_response()
        }
    };
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    st.metrics.request(label, &method, status);
    tracing::info!(
        %request_id,
        %peer,
        method = %method,
        route = label,
        status,
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "request"
    );
    resp
}

/// Query parameters, percent-decoded, in order.
pub type Query = Vec<(String, String)>;

async fn dispatch(
    st: Arc<ApiState>,
    route: &'static Route,
    params: Vec<(&'static str, String)>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, ApiError> {
    let query: Query = form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let who = if route.authenticated {
        Some(authenticate(&st.auth, &req, route, &query)?)
    } else {
        None
    };
    handlers::dispatch(st, route, params, query, who, req, peer).await
}

/// The caller: `Authorization: Bearer <token>`, or for WebSockets also `?token=`.
fn authenticate(
    auth: &Auth,
    req: &Request<Incoming>,
    route: &Route,
    query: &Query,
) -> Result<Principal, ApiError> {
    let header = req
        .headers()
        .get(AUTHORIZATION)
        .map(|v| {
            v.to_str()
                .ok()
                .and_then(|s| {
                    let (scheme, token) = s.trim().split_once(' ')?;
                    scheme
                        .eq_ignore_ascii_case("bearer")
                        .then(|| token.trim().to_string())
                })
                .ok_or_else(|| {
                    ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
                })
        })
        .transpose()?;
    let token = match header {
        Some(t) => t,
        None if route.websocket => query
            .iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| {
                ApiError::unauthorized("missing bearer token (header, or ?token= for WebSockets)")
            })?,
        None => return Err(ApiError::unauthorized("missing bearer token")),
    };
    Ok(auth.verify(&token)?)
}
