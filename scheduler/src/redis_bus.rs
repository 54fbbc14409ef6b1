//! [`RedisBus`]: the [`Bus`] on Redis Streams, for roles on several hosts.
//!
//! - **Work** (submissions api → scheduler, commands scheduler → agent) are streams read
//!   through consumer groups: an entry goes to exactly one consumer and stays in that
//!   consumer's pending list until acknowledged (`XACK`, then `XDEL`: the streams stay
//!   small). A consumer that restarts gets its own pending entries again first
//!   ([`Bus::requeue_unacked`]); submissions a dead scheduler left pending for a minute
//!   are claimed by the next one that requeues (`XAUTOCLAIM`). The execution id is the
//!   idempotency key: the store's transitions make a repeat harmless.
//! - **Events and host status** are capped streams (`MAXLEN ~`) that a process reads
//!   from its own position (`XREAD BLOCK`, one reader per stream) into a local broadcast,
//!   so any API replica streams any execution. A process reads a stream only once
//!   something in it subscribes: from the connection on with
//!   [`RedisConfig::read_at_connect`] (an API replica), else from the first subscription,
//!   whose subscribers are first told they may have missed items (a scheduler reads host
//!   statuses only while it leads; an agent reads neither stream). Every entry added
//!   wakes every reader, so a reader nobody needs is not free. An event's payload is
//!   sealed with the platform's keyring (bound to the execution and seq; a live-only
//!   event, which has no seq, to its execution as a live event), like the store's copy:
//!   Redis may persist what it holds. The store keeps the durable copy: a subscriber that lags, and every
//!   subscriber when a reader's connection drops and again when it is back, gets
//!   [`crate::bus::Received::Missed`] and catches up from the store.
//! - Blocking reads use connections of their own; everything else shares one
//!   multiplexed connection that reconnects by itself.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::aio::{ConnectionManager, MultiplexedConnection};
use redis::streams::StreamReadReply;
use redis::Value;
use tokio::sync::Mutex;

use crate::bus::{
    AgentCommand, Bus, BusError, BusEvent, Delivery, DeliveryTag, Feed, HostStatus, Subscription,
};
use crate::model::{ExecEvent, LiveEvent};
use crate::seal::{Binding, Keyring};

/// How long a (non-blocking) command may wait for its answer.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

/// A blocking reader's connection: an answer that does not come within the block time
/// and a margin means the connection is dead (a server that went away without a word).
fn reader_config() -> redis::AsyncConnectionConfig {
    redis::AsyncConnectionConfig::new()
        .set_connection_timeout(COMMAND_TIMEOUT)
        .set_response_timeout(Duration::from_millis(BLOCK_MS as u64) + COMMAND_TIMEOUT)
}

/// The longest pause between two attempts to connect again (ms), and how many attempts
/// one lost connection gets before a command fails (the next command starts over).
const RECONNECT_MAX_DELAY_MS: u64 = 1000;
const RECONNECT_RETRIES: usize = 8;

/// How long a blocking read waits before it looks again (ms).
const BLOCK_MS: usize = 1000;
/// Pending submissions of another scheduler older than this are taken over (ms).
const CLAIM_IDLE_MS: u64 = 60_000;

/// Where and how to reach Redis.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port/db` (or `rediss://` with TLS).
    pub url: String,
    /// Prefix of every key, so several platforms can share one Redis.
    pub prefix: String,
    /// This process's name as a consumer of submissions (stable across its restarts).
    pub consumer: String,
    /// Entries the event stream keeps (about).
    pub events_maxlen: usize,
    /// Capacity of the local broadcasts (a subscriber further behind lags).
    pub capacity: usize,
    /// Read the event and status streams from the connection on (`true`), or each from
    /// its first subscription (`false`): then the first subscribers get
    /// [`crate::bus::Received::Missed`] before any item, as what was added before the
    /// reader took its position is not read.
    pub read_at_connect: bool,
}

impl RedisConfig {
    pub fn new(url: impl Into<String>, consumer: impl Into<String>) -> RedisConfig {
        RedisConfig {
            url: url.into(),
            prefix: "hatchery".into(),
            consumer: consumer.into(),
            events_maxlen: 100_000,
            capacity: 8192,
            read_at_connect: true,
        }
    }
}

/// The Redis bus. Cheap to clone (clones share connections and readers).
#[derive(Clone)]
pub struct RedisBus {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: RedisConfig,
    client: redis::Client,
    conn: ConnectionManager,
    keyring: Keyring,
    events: StreamFeed<BusEvent>,
    status: StreamFeed<HostStatus>,
    /// Consumer groups known to exist.
    groups: Mutex<HashSet<String>>,
    /// One blocking reader per work stream.
    readers: Mutex<std::collections::HashMap<String, Arc<Mutex<Reader>>>>,
}

/// Turns a stream entry's fields into an item (`None`: dropped).
type Parse<T> = Arc<dyn Fn(&[(String, Vec<u8>)]) -> Option<T> + Send + Sync>;

/// A capped stream read into a local broadcast by one task of this process, started at
/// most once: at connect, or by the first subscription.
struct StreamFeed<T> {
    key: String,
    client: redis::Client,
    feed: Feed<T>,
    parse: Parse<T>,
    runtime: tokio::runtime::Handle,
    task: std::sync::OnceLock<tokio::task::JoinHandle<()>>,
}

impl<T: Clone + Send + crate::bus::Routed + 'static> StreamFeed<T> {
    /// Starts the reader (once): from `start`, or when `None` from the newest entry at
    /// its first connection, after telling the subscribers they may have missed items.
    fn start(&self, start: Option<String>) {
        self.task.get_or_init(|| {
            self.runtime.spawn(fan_out(
                self.client.clone(),
                self.key.clone(),
                start,
                self.feed.clone(),
                Arc::clone(&self.parse),
            ))
        });
    }

    fn subscribe(&self) -> Subscription<T> {
        let sub = self.feed.subscribe();
        self.start(None);
        sub
    }

    fn subscribe_to(&self, key: &str) -> Subscription<T> {
        let sub = self.feed.subscribe_to(key);
        self.start(None);
        sub
    }
}

impl<T> Drop for StreamFeed<T> {
    fn drop(&mut self) {
        if let Some(t) = self.task.get() {
            t.abort();
        }
    }
}

/// A consumer's position in one work stream: its own pending entries first (after a
/// requeue), then new ones.
struct Reader {
    conn: Option<MultiplexedConnection>,
    /// Reading this consumer's pending entries after this id; `None`: new entries.
    pending_after: Option<String>,
    /// A read was under way when its caller stopped waiting: Redis may have handed it
    /// an entry nobody received. The next take starts over from the pending entries.
    in_flight: bool,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("prefix", &self.inner.cfg.prefix)
            .finish_non_exhaustive()
    }
}

fn io(e: redis::RedisError) -> BusError {
    BusError::Io(e.to_string())
}

/// The consumer group (or its stream) does not exist: Redis lost its data.
fn is_nogroup(e: &redis::RedisError) -> bool {
    e.code() == Some("NOGROUP")
}

const SCHEDULERS: &str = "schedulers";
const AGENT: &str = "agent";

impl RedisBus {
    /// Connects and starts the readers of the event and status streams (from now on).
    pub async fn connect(cfg: RedisConfig, keyring: Keyring) -> Result<RedisBus, BusError> {
        let client = redis::Client::open(cfg.url.as_str()).map_err(io)?;
        // A command that gets no answer (a connection that died without a word) fails
        // after a while instead of waiting forever, and the manager connects again.
        // Reconnection is retried every second or so while Redis is away: the crate's
        // default backoff starts at 1 s and multiplies by its factor (100), so its second
        // attempt came a minute later and work submitted after a restart waited that long.
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(COMMAND_TIMEOUT)
            .set_response_timeout(COMMAND_TIMEOUT)
            .set_factor(2)
            .set_max_delay(RECONNECT_MAX_DELAY_MS)
            .set_number_of_retries(RECONNECT_RETRIES);
        let conn = ConnectionManager::new_with_config(client.clone(), manager)
            .await
            .map_err(io)?;
        let runtime = tokio::runtime::Handle::current();
        let events = StreamFeed {
            key: format!("{}:events", cfg.prefix),
            client: client.clone(),
            feed: Feed::new(cfg.capacity),
            parse: {
                let keyring = keyring.clone();
                Arc::new(move |fields: &[(String, Vec<u8>)]| open_event(&keyring, fields))
            },
            runtime: runtime.clone(),
            task: std::sync::OnceLock::new(),
        };
        let status = StreamFeed {
            key: format!("{}:status", cfg.prefix),
            client: client.clone(),
            feed: Feed::new(cfg.capacity),
            parse: Arc::new(|fields: &[(String, Vec<u8>)]| {
                serde_json::from_slice(&field(fields, "s")?).ok()
            }),
            runtime,
            task: std::sync::OnceLock::new(),
        };
        if cfg.read_at_connect {
            events.start(Some(last_id(&conn, &events.key).await?));
            status.start(Some(last_id(&conn, &status.key).await?));
        }
        Ok(RedisBus {
            inner: Arc::new(Inner {
                cfg,
                client,
                conn,
                keyring,
                events,
                status,
                groups: Mutex::new(HashSet::new()),
                readers: Mutex::new(std::collections::HashMap::new()),
            }),
        })
    }

    fn key(&self, name: &str) -> String {
        format!("{}:{name}", self.inner.cfg.prefix)
    }

    fn agent_key(&self, agent: &str) -> String {
        self.key(&format!("agent:{agent}"))
    }

    /// Creates `group` on `key` (and the stream) unless it exists.
    async fn ensure_group(&self, key: &str, group: &str) -> redis::RedisResult<()> {
        let name = format!("{key}\u{1}{group}");
        if self.inner.groups.lock().await.contains(&name) {
            return Ok(());
        }
        let mut conn = self.inner.conn.clone();
        let r: Result<(), _> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(key)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match r {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(e),
        }
        self.inner.groups.lock().await.insert(name);
        Ok(())
    }

    async fn reader(&self, key: &str) -> Arc<Mutex<Reader>> {
        self.inner
            .readers
            .lock()
            .await
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Mutex::new(Reader {
                    conn: None,
                    pending_after: None,
                    in_flight: false,
                }))
            })
            .clone()
    }

    async fn add(
        &self,
        key: &str,
        maxlen: Option<usize>,
        fields: &[(&str, &[u8])],
    ) -> Result<(), BusError> {
        let mut conn = self.inner.conn.clone();
        let _: String = xadd(key, maxlen, fields)
            .query_async(&mut conn)
            .await
            .map_err(io)?;
        Ok(())
    }

    /// The fields of an execution's event on the events stream (sealed, bound to its
    /// execution and seq).
    fn event_entry(&self, event: &ExecEvent) -> Result<[(&'static str, Vec<u8>); 3], BusError> {
        let json = serde_json::to_vec(event).map_err(|e| BusError::Io(e.to_string()))?;
        let blob = self
            .inner
            .keyring
            .seal(
                Binding::Event {
                    execution: &event.execution_id,
                    seq: event.seq,
                },
                &json,
            )
            .map_err(|e| BusError::Io(e.to_string()))?;
        Ok([
            ("x", event.execution_id.as_bytes().to_vec()),
            ("q", event.seq.to_string().into_bytes()),
            ("e", blob),
        ])
    }

    /// The next entry of `key` for `consumer` in `group` (waits): its own pending ones
    /// first after a requeue, then new ones.
    async fn take(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
    ) -> Result<(String, Vec<(String, Vec<u8>)>), BusError> {
        self.ensure_group(key, group).await.map_err(io)?;
        let reader = self.reader(key).await;
        let mut reader = reader.lock().await;
        if reader.in_flight {
            reader.conn = None;
            reader.pending_after = Some("0".into());
            reader.in_flight = false;
        }
        loop {
            if reader.conn.is_none() {
                reader.conn = Some(
                    self.inner
                        .client
                        .get_multiplexed_async_connection_with_config(&reader_config())
                        .await
                        .map_err(io)?,
                );
            }
            let from = reader.pending_after.clone().unwrap_or_else(|| ">".into());
            let mut cmd = redis::cmd("XREADGROUP");
            cmd.arg("GROUP")
                .arg(group)
                .arg(consumer)
                .arg("COUNT")
                .arg(1);
            if from == ">" {
                cmd.arg("BLOCK").arg(BLOCK_MS);
            }
            cmd.arg("STREAMS").arg(key).arg(&from);
            reader.in_flight = true;
            let conn = reader.conn.as_mut().expect("connected");
            let reply: Result<Option<StreamReadReply>, _> = cmd.query_async(conn).await;
            reader.in_flight = false;
            let reply = match reply {
                Ok(r) => r,
                Err(e) => {
                    reader.conn = None;
                    if is_nogroup(&e) {
                        // Redis lost its data (a restart without persistence).
                        self.inner.groups.lock().await.clear();
                        drop(reader);
                        self.ensure_group(key, group).await.map_err(io)?;
                        return Box::pin(self.take(key, group, consumer)).await;
                    }
                    return Err(io(e));
                }
            };
            let entry = reply
                .and_then(|r| r.keys.into_iter().next())
                .and_then(|k| k.ids.into_iter().next());
            match entry {
                Some(e) => {
                    if reader.pending_after.is_some() {
                        reader.pending_after = Some(e.id.clone());
                    }
                    let fields = e
                        .map
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), bytes_of(v)?)))
                        .collect();
                    return Ok((e.id, fields));
                }
                None if reader.pending_after.is_some() => reader.pending_after = None,
                None => {}
            }
        }
    }

    async fn ack(&self, key: &str, group: &str, tag: &DeliveryTag) -> Result<(), BusError> {
        let mut conn = self.inner.conn.clone();
        // An entry Redis forgot (a restart without persistence) acknowledges as 0.
        let _: i64 = redis::cmd("XACK")
            .arg(key)
            .arg(group)
            .arg(tag.as_str())
            .query_async(&mut conn)
            .await
            .map_err(io)?;
        let _: i64 = redis::cmd("XDEL")
            .arg(key)
            .arg(tag.as_str())
            .query_async(&mut conn)
            .await
            .map_err(io)?;
        Ok(())
    }

    /// Makes `consumer`'s pending entries of `key` come first again; returns how many.
    async fn requeue(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        claim: bool,
    ) -> Result<usize, BusError> {
        match self.try_requeue(key, group, consumer, claim).await {
            // Redis lost its data since the group was made here: make it again (nothing
            // is pending in a new group).
            Err(e) if is_nogroup(&e) => {
                self.inner.groups.lock().await.clear();
                self.try_requeue(key, group, consumer, claim)
                    .await
                    .map_err(io)
            }
            other => other.map_err(io),
        }
    }

    async fn try_requeue(
        &self,
        key: &str,
        group: &str,
        consumer: &str,
        claim: bool,
    ) -> redis::RedisResult<usize> {
        self.ensure_group(key, group).await?;
        let mut conn = self.inner.conn.clone();
        if claim {
            // Entries a dead consumer held for long enough become ours.
            let _: Value = redis::cmd("XAUTOCLAIM")
                .arg(key)
                .arg(group)
                .arg(consumer)
                .arg(CLAIM_IDLE_MS)
                .arg("0-0")
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await?;
        }
        let pending: Value = redis::cmd("XPENDING")
            .arg(key)
            .arg(group)
            .arg("-")
            .arg("+")
            .arg(100_000)
            .arg(consumer)
            .query_async(&mut conn)
            .await?;
        let n = match pending {
            Value::Array(items) => items.len(),
            _ => 0,
        };
        let reader = self.reader(key).await;
        reader.lock().await.pending_after = Some("0".into());
        Ok(n)
    }
}

/// The event in an entry of the event stream: `x` the execution, `e` the sealed JSON,
/// and `q` its seq (an event of the log) or `l` (a live-only event). `None` (logged)
/// when it does not open or parse.
fn open_event(keyring: &Keyring, fields: &[(String, Vec<u8>)]) -> Option<BusEvent> {
    let blob = field(fields, "e")?;
    let execution = field_str(fields, "x")?;
    match field_str(fields, "q") {
        Some(seq) => {
            let seq: u64 = seq.parse().ok()?;
            let json = keyring
                .open(
                    Binding::Event {
                        execution: &execution,
                        seq,
                    },
                    &blob,
                )
                .map_err(|e| tracing::warn!(execution, seq, error = %e, "an event on the bus does not open"))
                .ok()?;
            serde_json::from_slice(&json).ok().map(BusEvent::Stored)
        }
        None => {
            field(fields, "l")?;
            let json = keyring
                .open(Binding::LiveEvent(&execution), &blob)
                .map_err(|e| tracing::warn!(execution, error = %e, "a live event on the bus does not open"))
                .ok()?;
            serde_json::from_slice(&json).ok().map(BusEvent::Live)
        }
    }
}

/// The id of the newest entry of `key`, if any.
async fn newest_id<C: redis::aio::ConnectionLike + Send>(
    conn: &mut C,
    key: &str,
) -> redis::RedisResult<Option<String>> {
    let v: Value = redis::cmd("XREVRANGE")
        .arg(key)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(conn)
        .await?;
    Ok(match v {
        Value::Array(entries) => entries
            .into_iter()
            .next()
            .and_then(|e| match e {
                Value::Array(parts) => parts.into_iter().next().and_then(|id| bytes_of(&id)),
                _ => None,
            })
            .and_then(|id| String::from_utf8(id).ok()),
        _ => None,
    })
}

/// The id readers of `key` start after: its newest entry ("0-0" when empty).
async fn last_id(conn: &ConnectionManager, key: &str) -> Result<String, BusError> {
    let mut conn = conn.clone();
    Ok(newest_id(&mut conn, key)
        .await
        .map_err(io)?
        .unwrap_or_else(|| "0-0".into()))
}

fn bytes_of(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    }
}

fn field(fields: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.clone())
}

fn field_str(fields: &[(String, Vec<u8>)], name: &str) -> Option<String> {
    String::from_utf8(field(fields, name)?).ok()
}

/// Compares stream ids (`ms-seq`).
fn id_key(id: &str) -> (u64, u64) {
    let (a, b) = id.split_once('-').unwrap_or((id, "0"));
    (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
}

/// Reads `key` from after `last` for ever, handing what `parse` makes of each entry to
/// `feed`'s subscribers. When the connection drops it tells them they may miss entries
/// ([`Feed::missed`]), reconnects, tells them again once it reads again (what was
/// published meanwhile may be lost with a Redis that restarted empty), and reads on:
/// from the start of the stream when it went back (its ids restarted).
async fn fan_out<T: Clone + Send + crate::bus::Routed + 'static>(
    client: redis::Client,
    key: String,
    start: Option<String>,
    feed: Feed<T>,
    parse: Parse<T>,
) {
    let mut conn: Option<MultiplexedConnection> = None;
    // Without a start, the position is the newest entry at the first connection, and the
    // subscribers are told (as after a lost connection) once it is taken.
    let mut lost = start.is_none();
    let mut last = start.unwrap_or_else(|| "+".into());
    loop {
        if conn.is_none() {
            match client
                .get_multiplexed_async_connection_with_config(&reader_config())
                .await
            {
                Ok(mut c) => {
                    // Entries added while we were away are read; a stream that went back
                    // (Redis restarted empty) is read from its start.
                    let newest = match newest_id(&mut c, &key).await {
                        Ok(newest) => newest,
                        Err(e) => {
                            tracing::debug!(key, error = %e, "bus reader: cannot read the stream's end");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                    };
                    let first = last == "+";
                    if first {
                        tracing::debug!(key, "bus reader: started by a subscription");
                        last = newest.unwrap_or_else(|| "0-0".into());
                    } else if newest.is_none_or(|n| id_key(&n) < id_key(&last)) {
                        last = "0-0".into();
                    }
                    conn = Some(c);
                    if lost {
                        lost = false;
                        if !first {
                            tracing::info!(key, "bus reader: reconnected; subscribers catch up");
                        }
                        feed.missed();
                    }
                }
                Err(e) => {
                    tracing::debug!(key, error = %e, "bus reader: cannot connect");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
        }
        let c = conn.as_mut().expect("connected");
        let reply: Result<Option<StreamReadReply>, _> = redis::cmd("XREAD")
            .arg("COUNT")
            .arg(512)
            .arg("BLOCK")
            .arg(BLOCK_MS)
            .arg("STREAMS")
            .arg(&key)
            .arg(&last)
            .query_async(c)
            .await;
        match reply {
            Ok(Some(r)) => {
                for k in r.keys {
                    for e in k.ids {
                        let fields: Vec<(String, Vec<u8>)> = e
                            .map
                            .iter()
                            .filter_map(|(k, v)| Some((k.clone(), bytes_of(v)?)))
                            .collect();
                        if let Some(item) = parse(&fields) {
                            feed.send(item);
                        }
                        last = e.id;
                    }
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(key, error = %e, "bus reader: lost the connection; subscribers catch up");
                conn = None;
                if !lost {
                    lost = true;
                    feed.missed();
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// `XADD key [MAXLEN ~ n] * field value ...`.
fn xadd(key: &str, maxlen: Option<usize>, fields: &[(&str, &[u8])]) -> redis::Cmd {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(key);
    if let Some(n) = maxlen {
        cmd.arg("MAXLEN").arg("~").arg(n);
    }
    cmd.arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd
}

#[async_trait]
impl Bus for RedisBus {
    async fn publish_event(&self, event: ExecEvent) -> Result<(), BusError> {
        self.publish_events(vec![event]).await
    }

    async fn publish_events(&self, events: Vec<ExecEvent>) -> Result<(), BusError> {
        self.publish_and_submit(events, None).await
    }

    async fn publish_and_submit(
        &self,
        events: Vec<ExecEvent>,
        execution_id: Option<&str>,
    ) -> Result<(), BusError> {
        if events.is_empty() && execution_id.is_none() {
            return Ok(());
        }
        let key = self.key("events");
        let maxlen = Some(self.inner.cfg.events_maxlen);
        let mut pipe = redis::pipe();
        for event in &events {
            let entry = self.event_entry(event)?;
            let fields: Vec<(&str, &[u8])> = entry.iter().map(|(k, v)| (*k, &v[..])).collect();
            pipe.add_command(xadd(&key, maxlen, &fields));
        }
        if let Some(id) = execution_id {
            pipe.add_command(xadd(&self.key("submitted"), None, &[("id", id.as_bytes())]));
        }
        let mut conn = self.inner.conn.clone();
        let _: Vec<String> = pipe.query_async(&mut conn).await.map_err(io)?;
        Ok(())
    }

    async fn publish_live(&self, event: LiveEvent) -> Result<(), BusError> {
        let json = serde_json::to_vec(&event).map_err(|e| BusError::Io(e.to_string()))?;
        let blob = self
            .inner
            .keyring
            .seal(Binding::LiveEvent(&event.execution_id), &json)
            .map_err(|e| BusError::Io(e.to_string()))?;
        self.add(
            &self.key("events"),
            Some(self.inner.cfg.events_maxlen),
            &[
                ("x", event.execution_id.as_bytes()),
                ("l", b"1"),
                ("e", &blob),
            ],
        )
        .await
    }

    fn subscribe_events(&self) -> Subscription<BusEvent> {
        self.inner.events.subscribe()
    }

    fn subscribe_execution(&self, id: &str) -> Subscription<BusEvent> {
        self.inner.events.subscribe_to(id)
    }

    async fn submit(&self, execution_id: &str) -> Result<(), BusError> {
        self.add(
            &self.key("submitted"),
            None,
            &[("id", execution_id.as_bytes())],
        )
        .await
    }

    async fn next_submitted(&self) -> Result<String, BusError> {
        let d = self.take_submitted().await?;
        self.ack_submitted(&d.tag).await?;
        Ok(d.item)
    }

    async fn take_submitted(&self) -> Result<Delivery<String>, BusError> {
        let key = self.key("submitted");
        loop {
            let (id, fields) = self
                .take(&key, SCHEDULERS, &self.inner.cfg.consumer)
                .await?;
            match field_str(&fields, "id") {
                Some(item) => {
                    return Ok(Delivery {
                        item,
                        tag: DeliveryTag::new(id),
                    })
                }
                None => {
                    tracing::warn!(entry = %id, "a malformed submission on the bus: dropped");
                    self.ack(&key, SCHEDULERS, &DeliveryTag::new(id)).await?;
                }
            }
        }
    }

    async fn ack_submitted(&self, tag: &DeliveryTag) -> Result<(), BusError> {
        self.ack(&self.key("submitted"), SCHEDULERS, tag).await
    }

    async fn send_to_agent(&self, agent: &str, command: AgentCommand) -> Result<(), BusError> {
        let json = serde_json::to_vec(&command).map_err(|e| BusError::Io(e.to_string()))?;
        self.add(&self.agent_key(agent), None, &[("c", &json)])
            .await
    }

    async fn next_for_agent(&self, agent: &str) -> Result<AgentCommand, BusError> {
        let d = self.take_for_agent(agent).await?;
        self.ack_for_agent(agent, &d.tag).await?;
        Ok(d.item)
    }

    async fn take_for_agent(&self, agent: &str) -> Result<Delivery<AgentCommand>, BusError> {
        let key = self.agent_key(agent);
        loop {
            let (id, fields) = self.take(&key, AGENT, agent).await?;
            match field(&fields, "c").and_then(|c| serde_json::from_slice(&c).ok()) {
                Some(item) => {
                    return Ok(Delivery {
                        item,
                        tag: DeliveryTag::new(id),
                    })
                }
                None => {
                    tracing::warn!(agent, entry = %id, "a malformed command on the bus: dropped");
                    self.ack(&key, AGENT, &DeliveryTag::new(id)).await?;
                }
            }
        }
    }

    async fn ack_for_agent(&self, agent: &str, tag: &DeliveryTag) -> Result<(), BusError> {
        self.ack(&self.agent_key(agent), AGENT, tag).await
    }

    async fn requeue_unacked(&self, agent: &str) -> Result<usize, BusError> {
        self.requeue(&self.agent_key(agent), AGENT, agent, false)
            .await
    }

    async fn requeue_unacked_submissions(&self) -> Result<usize, BusError> {
        let consumer = self.inner.cfg.consumer.clone();
        self.requeue(&self.key("submitted"), SCHEDULERS, &consumer, true)
            .await
    }

    async fn publish_status(&self, status: HostStatus) -> Result<(), BusError> {
        let json = serde_json::to_vec(&status).map_err(|e| BusError::Io(e.to_string()))?;
        self.add(&self.key("status"), Some(1000), &[("s", &json)])
            .await
    }

    fn subscribe_status(&self) -> Subscription<HostStatus> {
        self.inner.status.subscribe()
    }
}
