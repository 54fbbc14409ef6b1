//! [`PgStore`]: the [`Store`] on PostgreSQL, the system of record of a cluster
//! (`hatchery api`, `scheduler` and `agent` on several hosts). Same decisions as the
//! embedded store, made by the database:
//!
//! - **Admission** is one transaction under a per-user advisory lock
//!   (`pg_advisory_xact_lock`) applying [`crate::admission::decide`]: the tab's active
//!   executions are superseded (R10), then the oldest beyond the cap are cancelled (R11),
//!   "oldest" by the order admission assigned (an identity column), never by a node's
//!   clock. The queue limit reads a counter kept in every state-changing transaction,
//!   never a scan. A partial unique index makes "one active execution per tab" an
//!   invariant of the database.
//! - **Event logs** are gapless: the seq comes from a counter on the execution's row,
//!   bumped in the transaction that inserts the event (a database sequence leaves gaps
//!   when a transaction rolls back); a batch of events takes its seqs with one bump of
//!   the counter and goes in with one multi-row insert, in one transaction.
//! - **Sealed at rest (R15):** the record and every event are sealed with the platform's
//!   keyring before they are written, bound to the execution id (and the event's seq), as
//!   in the embedded store; only owner, tab, state and order are plain columns.
//! - **The hot path of a run** takes one round trip per step: `mark_running`, each batch
//!   of output and the finish are single statements that check what they assume (the
//!   row still queued; the remembered last seq; the row exactly as this store started
//!   it) and fall back to a locking transaction when the check fails.
//! - Every change runs to completion even if the caller's future is dropped (it runs on
//!   its own task), and locks rows in one order — the execution rows, then the counters —
//!   so two transactions never wait on each other; a deadlock or serialization failure
//!   PostgreSQL reports anyway is retried.
//! - A connection that cannot be made or is lost is [`StoreError::Unavailable`] (the API
//!   answers 503 `store_unavailable`); the pool reconnects on its own.
//!
//! The schema is in `scheduler/migrations/`, applied by [`PgStore::connect`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, QueryBuilder, Row, Transaction};

use crate::admission::{decide, is_active, Admission, AdmissionRules};
use crate::embedded::check_name;
use crate::model::{
    now_ms, CancelReason, EventBody, ExecEvent, ExecState, ExecutionRecord, GroupStatus,
    HostRecord, HostState, Millis, Policy, ResultSummary,
};
use crate::seal::{Binding, Keyring};
use crate::store::{
    cancelled, finished, finished_with_event, lost_summary, running, ActiveCounts, Lease,
    ListFilter, Store, StoreError, StoreResult,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Attempts of a transaction PostgreSQL aborted for a deadlock or a serialization failure.
const ATTEMPTS: usize = 5;
/// A pooled connection idle for this long is pinged before it is used again.
const PING_IDLE: Duration = Duration::from_secs(2);

/// The columns [`PgStore::record_of`] reads, in its order.
macro_rules! rec_cols {
    () => {
        "record, last_seq, admitted, state, agent, started_at"
    };
}

/// Where and how to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// A libpq-style URL: `postgres://user:password@host:port/database?sslmode=...`.
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long a caller waits for a connection before the store is unavailable.
    pub acquire_timeout: Duration,
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> PgConfig {
        PgConfig {
            url: url.into(),
            max_connections: 16,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

/// The PostgreSQL store. Cheap to clone (clones share the pool).
#[derive(Clone)]
pub struct PgStore {
    pool: PgPool,
    keyring: Keyring,
    /// The last event seq this store saw of each execution it runs (primed by
    /// `mark_running`, moved by its appends, dropped at its end): a guess that makes an
    /// append one statement instead of a transaction (see `append_events`). Never trusted:
    /// the database checks it.
    last_seqs: Arc<Mutex<HashMap<String, u64>>>,
    /// The record of each execution this store started in one statement, with its row's
    /// sealed record as read then: the finish is one statement while the row is still
    /// that one (see `finish_simple`). Dropped at the execution's end.
    started: Arc<Mutex<HashMap<String, Started>>>,
    /// Policies read for admissions, per (org, user), with the version of all policies
    /// they were read at: an admission applies them without reading them again, and
    /// the database refuses it if they changed since (see `hatchery_admit_simple`).
    policies: Arc<Mutex<HashMap<(String, String), CachedPolicies>>>,
}

/// The org's and the user's policy, and the policies' version they were read at.
type CachedPolicies = (Option<Policy>, Option<Policy>, u64);

/// (org, user) pairs whose policies a store keeps for admissions at most (forgetting
/// costs one read).
const POLICIES_MAX: usize = 4096;

/// Executions whose last seq a store remembers at most (a guess: forgetting costs a
/// transaction, nothing else).
const LAST_SEQS_MAX: usize = 4096;

/// Started executions whose record a store remembers at most (a record holds up to
/// [`crate::model::INLINE_CODE_MAX`] of code; forgetting costs a transaction).
const STARTED_MAX: usize = 1024;

/// Inserts into a cache of at most `max` entries: a new key in a full cache empties it
/// first (forgetting costs a read or a transaction, never a wrong answer).
fn insert_bounded<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    key: K,
    value: V,
) {
    if map.len() >= max && !map.contains_key(&key) {
        map.clear();
    }
    map.insert(key, value);
}

/// An execution as `start_simple` left its row: the record, and the sealed record
/// column, which nothing but a change of the record rewrites.
struct Started {
    record: ExecutionRecord,
    sealed: Vec<u8>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").finish_non_exhaustive()
    }
}

/// An error of the database as the store's: connection trouble is `Unavailable`.
fn db_err(what: &str, e: sqlx::Error) -> StoreError {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(format!("{what}: {e}")),
        sqlx::Error::Database(ref d) if d.code().is_some_and(|c| is_unavailable_code(&c)) => {
            StoreError::Unavailable(format!("{what}: {e}"))
        }
        other => StoreError::Io(format!("{what}: {other}")),
    }
}

/// SQLSTATE classes of a server that is going away or not there yet (57P01 admin
/// shutdown, 57P03 cannot connect now, 08xxx connection exceptions).
fn is_unavailable_code(code: &str) -> bool {
    code.starts_with("08") || code == "57P01" || code == "57P02" || code == "57P03"
}

/// A deadlock or serialization failure: the transaction may simply be run again.
fn is_retryable(e: &StoreError, source: &Option<String>) -> bool {
    matches!(e, StoreError::Io(_))
        && source
            .as_deref()
            .is_some_and(|c| c == "40P01" || c == "40001")
}

/// How the `queued` and `running` counters move for one execution going `from` → `to`,
/// in lock order, without the zero moves.
fn counter_moves(from: ExecState, to: ExecState) -> Vec<(&'static str, i64)> {
    let mut by = [0i64; 2];
    for (state, sign) in [(from, -1i64), (to, 1)] {
        match state {
            ExecState::Queued => by[0] += sign,
            ExecState::Running => by[1] += sign,
            _ => {}
        }
    }
    [("queued", by[0]), ("running", by[1])]
        .into_iter()
        .filter(|(_, d)| *d != 0)
        .collect()
}

fn state_name(s: ExecState) -> &'static str {
    s.as_str()
}

fn cancel_name(c: Option<CancelReason>) -> Option<&'static str> {
    c.map(|c| match c {
        CancelReason::Requested => "requested",
        CancelReason::SupersededByTab => "superseded_by_tab",
        CancelReason::ParallelismCap => "parallelism_cap",
    })
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A store error with the SQLSTATE it came from (for the retry decision).
struct Failed {
    error: StoreError,
    sqlstate: Option<String>,
}

impl From<StoreError> for Failed {
    fn from(error: StoreError) -> Failed {
        Failed {
            error,
            sqlstate: None,
        }
    }
}

/// `?` on a database call inside a transaction: the error keeps its SQLSTATE.
trait Ctx<T> {
    fn ctx(self, what: &str) -> Result<T, Failed>;
}

impl<T> Ctx<T> for Result<T, sqlx::Error> {
    fn ctx(self, what: &str) -> Result<T, Failed> {
        self.map_err(|e| {
            let sqlstate = match &e {
                sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
                _ => None,
            };
            Failed {
                error: db_err(what, e),
                sqlstate,
            }
        })
    }
}

type Tx = Transaction<'static, Postgres>;

impl PgStore {
    /// Connects, and brings the schema up to date (migrations are idempotent and run
    /// under PostgreSQL's migration lock, so several nodes may start at once).
    pub async fn connect(config: &PgConfig, keyring: Keyring) -> StoreResult<PgStore> {
        let options: PgConnectOptions = config
            .url
            .parse()
            .map_err(|e| StoreError::Io(format!("the PostgreSQL URL: {e}")))?;
        // A connection is checked with a ping only after it sat idle for a while (a
        // server restarted meanwhile would have closed it), not on every acquire: that
        // would double the round trips of every statement. A connection that broke in
        // between fails its statement as unavailable, and is dropped.
        let pool = PgPoolOptions::new()
            .max_connections(config.max_connections)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_IDLE {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            })
            .connect_with(options)
            .await
            .map_err(|e| db_err("connecting to PostgreSQL", e))?;
        MIGRATOR.run(&pool).await.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => db_err("applying the schema", e),
            other => StoreError::Io(format!("applying the schema: {other}")),
        })?;
        Ok(PgStore {
            pool,
            keyring,
            last_seqs: Arc::default(),
            started: Arc::default(),
            policies: Arc::default(),
        })
    }

    /// Runs `f` in a transaction on a task of its own (so it completes even if the
    /// caller stops waiting), retrying on a deadlock or serialization failure.
    async fn change<T, F, Fut>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: Fn(PgStore, Tx) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(T, Tx), Failed>> + Send + 'static,
    {
        let me = self.clone();
        let task = tokio::spawn(async move {
            let mut attempt = 0;
            loop {
                attempt += 1;
                let result = match me.pool.begin().await.ctx("starting a transaction") {
                    Ok(tx) => match f(me.clone(), tx).await {
                        Ok((value, tx)) => tx.commit().await.ctx("committing").map(|_| value),
                        Err(e) => Err(e),
                    },
                    Err(e) => Err(e),
                };
                match result {
                    Err(e) if attempt < ATTEMPTS && is_retryable(&e.error, &e.sqlstate) => continue,
                    other => return other.map_err(|f| f.error),
                }
            }
        });
        task.await
            .map_err(|e| StoreError::Io(format!("a store task failed: {e}")))?
    }

    /// Runs one statement of a single-statement fast path on a task of its own (so it
    /// completes even if the caller stops waiting). `Ok(None)` when it wrote nothing or
    /// failed in a way the full transaction retries: the caller falls back to that.
    async fn simple<T, F, Fut>(&self, f: F) -> StoreResult<Option<T>>
    where
        T: Send + 'static,
        F: FnOnce(PgStore) -> Fut,
        Fut: Future<Output = Result<Option<T>, Failed>> + Send + 'static,
    {
        let done = tokio::spawn(f(self.clone()))
            .await
            .map_err(|e| StoreError::Io(format!("a store task failed: {e}")))?;
        match done {
            Ok(value) => Ok(value),
            Err(f) if is_retryable(&f.error, &f.sqlstate) => Ok(None),
            Err(f) => Err(f.error),
        }
    }

    /// Remembers (`Some`) or forgets the last seq of `id`.
    fn guess_last_seq(&self, id: &str, last: Option<u64>) {
        let mut seqs = self.last_seqs.lock().unwrap();
        match last {
            Some(last) => insert_bounded(&mut seqs, LAST_SEQS_MAX, id.to_string(), last),
            None => {
                seqs.remove(id);
            }
        }
    }

    /// Appends `bodies` in one statement, sealed with the seqs that follow the
    /// remembered last one: the row's counter moves only if it still is that one, and the
    /// events are inserted only if it moved. `None` when nothing is remembered or the
    /// guess was wrong (another writer appended): nothing was written then.
    async fn append_guessed(
        &self,
        id: &str,
        bodies: &[EventBody],
    ) -> StoreResult<Option<Vec<ExecEvent>>> {
        let Some(last) = self.last_seqs.lock().unwrap().get(id).copied() else {
            return Ok(None);
        };
        let events = ExecEvent::numbered(id, last + 1, now_ms(), bodies.iter().cloned());
        let seqs: Vec<i64> = events.iter().map(|e| i64_of(e.seq)).collect();
        let sealed = events
            .iter()
            .map(|e| self.seal_event(e))
            .collect::<StoreResult<Vec<Vec<u8>>>>()?;
        let new_last = last + events.len() as u64;
        let done = sqlx::query(
            "WITH moved AS (UPDATE executions SET last_seq = $2 WHERE id = $1 AND last_seq = $3 RETURNING id) \
             INSERT INTO events (execution_id, seq, body) \
             SELECT moved.id, e.seq, e.body FROM moved, unnest($4::bigint[], $5::bytea[]) AS e(seq, body)",
        )
        .bind(id)
        .bind(i64_of(new_last))
        .bind(i64_of(last))
        .bind(&seqs)
        .bind(&sealed)
        .execute(&self.pool)
        .await;
        match done {
            Ok(r) if r.rows_affected() == events.len() as u64 => {
                self.guess_last_seq(id, Some(new_last));
                Ok(Some(events))
            }
            Ok(_) => {
                self.guess_last_seq(id, None);
                Ok(None)
            }
            Err(e) => {
                self.guess_last_seq(id, None);
                Err(db_err("appending events", e))
            }
        }
    }

    fn seal_record(&self, rec: &ExecutionRecord) -> StoreResult<Vec<u8>> {
        crate::store::seal_record(&self.keyring, rec)
    }

    /// The record in row `row` (the columns of [`rec_cols!`] from `at`). A record still
    /// sealed as queued whose row says it runs was started by [`Self::start_simple`]:
    /// the start is laid over it from the columns.
    fn record_of(
        &self,
        id: &str,
        row: &sqlx::postgres::PgRow,
        at: usize,
    ) -> StoreResult<ExecutionRecord> {
        let mut rec = self.open_record(id, row.get::<&[u8], _>(at), row.get::<i64, _>(at + 1))?;
        rec.admitted = row.get::<i64, _>(at + 2) as u64;
        if rec.state == ExecState::Queued && row.get::<&str, _>(at + 3) == "running" {
            rec.state = ExecState::Running;
            rec.agent = row.get::<Option<String>, _>(at + 4);
            rec.started_at = row.get::<Option<i64>, _>(at + 5).map(|t| t.max(0) as u64);
        }
        Ok(rec)
    }

    fn open_record(&self, id: &str, blob: &[u8], last_seq: i64) -> StoreResult<ExecutionRecord> {
        let json = self
            .keyring
            .open(Binding::Record(id), blob)
            .map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))?;
        let mut rec: ExecutionRecord = serde_json::from_slice(&json)
            .map_err(|e| StoreError::Corrupt(format!("record {id}: {e}")))?;
        // Events are appended without rewriting the record: the column is the truth.
        rec.last_seq = last_seq as u64;
        Ok(rec)
    }

    fn seal_event(&self, e: &ExecEvent) -> StoreResult<Vec<u8>> {
        let json = serde_json::to_vec(e).map_err(|err| {
            StoreError::Io(format!(
                "encoding event {} of {}: {err}",
                e.seq, e.execution_id
            ))
        })?;
        self.keyring
            .seal(
                Binding::Event {
                    execution: &e.execution_id,
                    seq: e.seq,
                },
                &json,
            )
            .map_err(|err| {
                StoreError::Io(format!(
                    "sealing event {} of {}: {err}",
                    e.seq, e.execution_id
                ))
            })
    }

    fn open_event(&self, id: &str, seq: u64, blob: &[u8]) -> StoreResult<ExecEvent> {
        let json = self
            .keyring
            .open(Binding::Event { execution: id, seq }, blob)
            .map_err(|e| StoreError::Corrupt(format!("event {seq} of {id}: {e}")))?;
        serde_json::from_slice(&json)
            .map_err(|e| StoreError::Corrupt(format!("event {seq} of {id}: {e}")))
    }

    /// The record of `id`, its row locked for the rest of the transaction.
    async fn lock(&self, tx: &mut Tx, id: &str) -> Result<Option<ExecutionRecord>, Failed> {
        let row = sqlx::query(concat!(
            "SELECT ",
            rec_cols!(),
            " FROM executions WHERE id = $1 FOR UPDATE"
        ))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await
        .ctx("reading an execution")?;
        match row {
            None => Ok(None),
            Some(row) => Ok(Some(self.record_of(id, &row, 0)?)),
        }
    }

    /// Writes `new` over `old` (a locked row) with `events` appended, and moves the
    /// counters: the events, the row and the first counter in one statement (the row is
    /// locked already; the counters are locked last, `queued` before `running`).
    async fn write(
        &self,
        tx: &mut Tx,
        old: &ExecutionRecord,
        new: &ExecutionRecord,
        events: &[ExecEvent],
    ) -> Result<(), Failed> {
        let (seqs, bodies) = self.sealed_events(events)?;
        let moves = counter_moves(old.state, new.state);
        let first = moves.first().copied();
        sqlx::query(
            "WITH ev AS (INSERT INTO events (execution_id, seq, body) \
                 SELECT $1, e.seq, e.body FROM unnest($8::bigint[], $9::bytea[]) AS e(seq, body)), \
             ex AS (UPDATE executions SET state = $2, cancel = $3, finished_at = $4, last_seq = $5, \
                 record = $6, agent = $7 WHERE id = $1) \
             UPDATE counters SET value = value + $11 WHERE name = $10",
        )
        .bind(&new.id)
        .bind(state_name(new.state))
        .bind(cancel_name(new.cancel))
        .bind(new.finished_at.map(i64_of))
        .bind(i64_of(new.last_seq))
        .bind(self.seal_record(new)?)
        .bind(&new.agent)
        .bind(&seqs)
        .bind(&bodies)
        .bind(first.map(|(name, _)| name))
        .bind(first.map_or(0, |(_, by)| by))
        .execute(&mut **tx)
        .await
        .ctx("writing an execution")?;
        for (name, by) in moves.iter().skip(1) {
            sqlx::query("UPDATE counters SET value = value + $2 WHERE name = $1")
                .bind(name)
                .bind(by)
                .execute(&mut **tx)
                .await
                .ctx("counting")?;
        }
        Ok(())
    }

    /// The seqs and sealed bodies of `events`, as arrays for `unnest`.
    fn sealed_events(&self, events: &[ExecEvent]) -> Result<(Vec<i64>, Vec<Vec<u8>>), Failed> {
        let mut seqs = Vec::with_capacity(events.len());
        let mut bodies = Vec::with_capacity(events.len());
        for e in events {
            seqs.push(i64_of(e.seq));
            bodies.push(self.seal_event(e)?);
        }
        Ok((seqs, bodies))
    }

    /// Inserts `events` of execution `id` in one statement.
    async fn insert_events(
        &self,
        tx: &mut Tx,
        id: &str,
        events: &[ExecEvent],
    ) -> Result<(), Failed> {
        let (seqs, bodies) = self.sealed_events(events)?;
        sqlx::query(
            "INSERT INTO events (execution_id, seq, body) \
             SELECT $1, e.seq, e.body FROM unnest($2::bigint[], $3::bytea[]) AS e(seq, body)",
        )
        .bind(id)
        .bind(&seqs)
        .bind(&bodies)
        .execute(&mut **tx)
        .await
        .ctx("appending events")?;
        Ok(())
    }

    async fn admit_tx(
        &self,
        tx: &mut Tx,
        new: &ExecutionRecord,
        rules: AdmissionRules,
        policy_version: Option<u64>,
    ) -> Result<Admission, Failed> {
        // Two 32-bit keys, org and user (a collision only serialises two users); and
        // whether the policies are still those of `policy_version`.
        let policies: i64 = sqlx::query_scalar(
            "SELECT v FROM (SELECT pg_advisory_xact_lock(hashtext($1), hashtext($2))) AS l, \
             LATERAL (SELECT value AS v FROM counters WHERE name = 'policies') AS c",
        )
        .bind(&new.org)
        .bind(&new.user)
        .fetch_one(&mut **tx)
        .await
        .ctx("locking the user")?;
        if policy_version.is_some_and(|v| i64_of(v) != policies) {
            self.policies.lock().unwrap().clear();
            return Ok(Admission::StalePolicy);
        }
        // The user's active executions, oldest first by admission, rows locked; and the
        // new id's row if it exists (a duplicate, refused).
        let rows = sqlx::query(concat!(
            "SELECT id, ",
            rec_cols!(),
            " FROM executions \
             WHERE id = $3 OR (org = $1 AND usr = $2 AND state IN ('queued', 'running') \
             AND cancel IS NULL) ORDER BY admitted FOR UPDATE"
        ))
        .bind(&new.org)
        .bind(&new.user)
        .bind(&new.id)
        .fetch_all(&mut **tx)
        .await
        .ctx("reading the user's executions")?;
        if let Some(row) = rows.iter().find(|r| r.get::<&str, _>(0) == new.id) {
            let from = serde_json::from_value(serde_json::Value::String(row.get(4)))
                .unwrap_or(ExecState::Queued);
            return Err(StoreError::IllegalTransition {
                id: new.id.clone(),
                from,
                to: ExecState::Queued,
            }
            .into());
        }
        let mut active = Vec::with_capacity(rows.len());
        for row in rows {
            let id: String = row.get(0);
            let rec = self.record_of(&id, &row, 1)?;
            if is_active(&rec) {
                active.push(rec);
            }
        }

        // R10, then R11 (see [`decide`]); the new one is the newest: the store orders
        // admissions.
        let decision = {
            let refs: Vec<&ExecutionRecord> = active.iter().collect();
            decide(&refs, new.tab_id.as_deref(), rules.max_parallel)
        };
        let (decisions, cap_new) = (decision.cancel, decision.cancel_new);

        // The queue limit, from the counter (locked last, after the execution rows).
        let queued: i64 =
            sqlx::query_scalar("SELECT value FROM counters WHERE name = 'queued' FOR UPDATE")
                .fetch_one(&mut **tx)
                .await
                .ctx("reading the queue counter")?;
        let queued = queued.max(0) as usize;
        if queued >= rules.max_queued {
            return Ok(Admission::QueueFull { queued });
        }

        let now = now_ms();
        let mut out = Vec::with_capacity(decisions.len() + usize::from(cap_new));
        let mut displaces = Vec::new();
        for (i, reason) in decisions {
            let old = &active[i];
            out.push((old.id.clone(), reason));
            if let Some((rec, event)) = cancelled(old, reason, now) {
                if rec.state == ExecState::Running {
                    displaces.push(rec.id.clone());
                }
                let events: Vec<ExecEvent> = event.into_iter().collect();
                self.write(tx, old, &rec, &events).await?;
            }
        }

        let mut rec = new.clone();
        rec.cancel = None;
        rec.last_seq = 1;
        rec.displaces = displaces;
        let mut events = vec![ExecEvent {
            execution_id: rec.id.clone(),
            seq: 1,
            at: now,
            body: EventBody::Queued,
        }];
        if cap_new {
            out.push((rec.id.clone(), CancelReason::ParallelismCap));
            if let Some((r, e)) = cancelled(&rec, CancelReason::ParallelismCap, now) {
                rec = r;
                events.extend(e);
            }
        }
        // The row, its events and the counter in one statement (the counter is locked
        // already).
        let (seqs, bodies) = self.sealed_events(&events)?;
        let counted = counter_moves(ExecState::Cancelled, rec.state);
        let first = counted.first().copied();
        let admitted: i64 = sqlx::query_scalar(
            "WITH ex AS (INSERT INTO executions (id, org, usr, tab_id, state, cancel, created_at, \
                 finished_at, last_seq, record) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
                 RETURNING id, admitted), \
             ev AS (INSERT INTO events (execution_id, seq, body) \
                 SELECT ex.id, e.seq, e.body FROM ex, unnest($11::bigint[], $12::bytea[]) AS e(seq, body)), \
             c AS (UPDATE counters SET value = value + $14 WHERE name = $13) \
             SELECT admitted FROM ex",
        )
        .bind(&rec.id)
        .bind(&rec.org)
        .bind(&rec.user)
        .bind(&rec.tab_id)
        .bind(state_name(rec.state))
        .bind(cancel_name(rec.cancel))
        .bind(i64_of(rec.created_at))
        .bind(rec.finished_at.map(i64_of))
        .bind(i64_of(rec.last_seq))
        .bind(self.seal_record(&rec)?)
        .bind(&seqs)
        .bind(&bodies)
        .bind(first.map(|(name, _)| name))
        .bind(first.map_or(0, |(_, by)| by))
        .fetch_one(&mut **tx)
        .await
        .ctx("storing the execution")?;
        rec.admitted = admitted.max(0) as u64;
        Ok(Admission::Admitted {
            cancelled: out,
            record: Box::new(rec),
            events,
        })
    }

    /// `mark_running` in one round trip: the row goes from queued to running (the start
    /// in its columns, see [`Self::record_of`]) and the counters move, in one statement;
    /// the counters are locked in name order (`queued` before `running`), as every other
    /// writer locks them. `None` when the row is not queued without a cancel (nothing was
    /// written): the full transaction finds out why.
    async fn start_simple(
        &self,
        id: &str,
        agent: &str,
        at: Millis,
    ) -> StoreResult<Option<(ExecutionRecord, Vec<u8>)>> {
        let (id, agent) = (id.to_string(), agent.to_string());
        self.simple(|me| async move {
            let row = sqlx::query(concat!(
                "WITH ex AS (UPDATE executions SET state = 'running', agent = $2, started_at = $3 \
                     WHERE id = $1 AND state = 'queued' AND cancel IS NULL \
                     RETURNING ", rec_cols!(), "), \
                 lk AS (SELECT name FROM counters \
                     WHERE name IN ('queued', 'running') AND EXISTS (SELECT 1 FROM ex) \
                     ORDER BY name FOR UPDATE), \
                 c AS (UPDATE counters SET value = value + CASE name WHEN 'queued' THEN -1 ELSE 1 END \
                     WHERE name IN (SELECT name FROM lk)) \
                 SELECT ", rec_cols!(), " FROM ex"
            ))
            .bind(&id)
            .bind(&agent)
            .bind(i64_of(at))
            .fetch_optional(&me.pool)
            .await
            .ctx("marking an execution running")?;
            match row {
                Some(row) => Ok(Some((me.record_of(&id, &row, 0)?, row.get::<Vec<u8>, _>(0)))),
                None => Ok(None),
            }
        })
        .await
    }

    /// `finish` in one round trip: the terminal record (over the record `start_simple`
    /// left, with `last` its last seq), its `finished` event and the `running` counter,
    /// in one statement that changes nothing unless the row is still exactly as that
    /// start left it — running, its sealed record unchanged (a cancel or any other change
    /// of the record rewrites it) and `last` its last seq (no other writer appended). The
    /// row is locked before the counter, as every writer locks them. `None` when nothing
    /// was written: the full transaction takes over.
    async fn finish_simple(
        &self,
        started: Started,
        last: u64,
        state: ExecState,
        result_key: Option<String>,
        at: Millis,
        summary: ResultSummary,
    ) -> StoreResult<Option<(ExecutionRecord, ExecEvent)>> {
        let old = ExecutionRecord {
            last_seq: last,
            ..started.record
        };
        if old.state != ExecState::Running {
            return Ok(None);
        }
        let (rec, event) = finished_with_event(&old, state, result_key, at, summary)?;
        let sealed_event = self.seal_event(&event)?;
        let sealed_record = self.seal_record(&rec)?;
        debug_assert_eq!(counter_moves(old.state, rec.state), [("running", -1)]);
        self.simple(|me| async move {
            let written = sqlx::query_scalar::<_, i64>(
                "WITH ex AS (UPDATE executions SET state = $2, cancel = $3, finished_at = $4, \
                     last_seq = $5, record = $6 \
                     WHERE id = $1 AND state = 'running' AND last_seq = $7 AND record = $8 \
                     RETURNING id), \
                 ev AS (INSERT INTO events (execution_id, seq, body) \
                     SELECT ex.id, $5, $9 FROM ex), \
                 c AS (UPDATE counters SET value = value - 1 \
                     WHERE name = 'running' AND EXISTS (SELECT 1 FROM ex)) \
                 SELECT count(*) FROM ex",
            )
            .bind(&rec.id)
            .bind(state_name(rec.state))
            .bind(cancel_name(rec.cancel))
            .bind(rec.finished_at.map(i64_of))
            .bind(i64_of(rec.last_seq))
            .bind(&sealed_record)
            .bind(i64_of(last))
            .bind(&started.sealed)
            .bind(&sealed_event)
            .fetch_one(&me.pool)
            .await
            .ctx("finishing an execution")?;
            Ok((written == 1).then_some((rec, event)))
        })
        .await
    }

    /// The org's policy, the user's override and the version of all policies, in one
    /// round trip.
    async fn read_policies(&self, org: &str, user: &str) -> StoreResult<CachedPolicies> {
        check_name("org", org)?;
        check_name("user", user)?;
        type Row = (
            Option<sqlx::types::Json<Policy>>,
            Option<sqlx::types::Json<Policy>>,
            i64,
        );
        let (o, u, v): Row = sqlx::query_as(
            "SELECT (SELECT policy FROM org_policies WHERE org = $1), \
                    (SELECT policy FROM user_policies WHERE org = $1 AND usr = $2), \
                    (SELECT value FROM counters WHERE name = 'policies')",
        )
        .bind(org)
        .bind(user)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| db_err("reading policies", e))?;
        Ok((o.map(|j| j.0), u.map(|j| j.0), v.max(0) as u64))
    }

    /// Admission in one round trip when it cancels nothing (the common case): the new
    /// record and its `queued` event, sealed here, go to `hatchery_admit_simple`, which
    /// stores them under the user's lock unless the id exists, the tab has an active
    /// execution or the user is at the cap. `None` then (nothing was stored): the full
    /// admission decides.
    async fn admit_simple(
        &self,
        new: &ExecutionRecord,
        rules: AdmissionRules,
        policy_version: Option<u64>,
    ) -> StoreResult<Option<Admission>> {
        let now = now_ms();
        let mut rec = new.clone();
        rec.cancel = None;
        rec.last_seq = 1;
        rec.displaces = Vec::new();
        let event = ExecEvent {
            execution_id: rec.id.clone(),
            seq: 1,
            at: now,
            body: EventBody::Queued,
        };
        let row = sqlx::query(
            "SELECT outcome, value FROM hatchery_admit_simple($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
        )
        .bind(&rec.id)
        .bind(&rec.org)
        .bind(&rec.user)
        .bind(&rec.tab_id)
        .bind(i64_of(rec.created_at))
        .bind(self.seal_record(&rec)?)
        .bind(self.seal_event(&event)?)
        .bind(i64::from(rules.max_parallel))
        .bind(i64_of(rules.max_queued as u64))
        .bind(policy_version.map(i64_of))
        .fetch_one(&self.pool)
        .await
        .ctx("admitting an execution");
        let row = match row {
            Ok(row) => row,
            // A deadlock or serialization failure: the full admission retries.
            Err(f) if is_retryable(&f.error, &f.sqlstate) => return Ok(None),
            Err(f) => return Err(f.error),
        };
        let value: Option<i64> = row.get(1);
        match row.get::<&str, _>(0) {
            "admitted" => {
                rec.admitted = value.unwrap_or(0).max(0) as u64;
                Ok(Some(Admission::Admitted {
                    cancelled: Vec::new(),
                    record: Box::new(rec),
                    events: vec![event],
                }))
            }
            "queue_full" => Ok(Some(Admission::QueueFull {
                queued: value.unwrap_or(0).max(0) as usize,
            })),
            "stale_policy" => {
                self.policies.lock().unwrap().clear();
                Ok(Some(Admission::StalePolicy))
            }
            _ => Ok(None),
        }
    }

    /// Marks every running execution of `agent` lost (its host row locked by the caller);
    /// returns their `finished` events.
    async fn lose_host(&self, tx: &mut Tx, agent: &str) -> Result<Vec<ExecEvent>, Failed> {
        sqlx::query("UPDATE hosts SET alive = FALSE WHERE agent = $1")
            .bind(agent)
            .execute(&mut **tx)
            .await
            .ctx("marking a host lapsed")?;
        let rows = sqlx::query(concat!(
            "SELECT id, ",
            rec_cols!(),
            " FROM executions \
             WHERE state = 'running' AND agent = $1 ORDER BY id FOR UPDATE"
        ))
        .bind(agent)
        .fetch_all(&mut **tx)
        .await
        .ctx("reading a host's executions")?;
        let mut events = Vec::with_capacity(rows.len());
        for row in &rows {
            let old = self.record_of(row.get::<&str, _>(0), row, 1)?;
            let (rec, event) =
                finished_with_event(&old, ExecState::Lost, None, now_ms(), lost_summary())?;
            self.write(tx, &old, &rec, std::slice::from_ref(&event))
                .await?;
            events.push(event);
        }
        Ok(events)
    }

    async fn get_policy(&self, sql: &'static str, keys: &[&str]) -> StoreResult<Option<Policy>> {
        let mut q = sqlx::query_scalar::<_, sqlx::types::Json<Policy>>(sql);
        for k in keys {
            q = q.bind(*k);
        }
        let p = q
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| db_err("reading a policy", e))?;
        Ok(p.map(|j| j.0))
    }
}

/// Runs `body` with a locked record, or `NotFound`.
macro_rules! locked {
    ($me:ident, $tx:ident, $id:expr) => {
        match $me.lock(&mut $tx, &$id).await? {
            Some(r) => r,
            None => return Err(StoreError::NotFound($id.clone()).into()),
        }
    };
}

#[async_trait]
impl Store for PgStore {
    async fn get_policies(
        &self,
        org: &str,
        user: &str,
    ) -> StoreResult<(Option<Policy>, Option<Policy>)> {
        let (o, u, _) = self.read_policies(org, user).await?;
        Ok((o, u))
    }

    async fn get_org_policy(&self, org: &str) -> StoreResult<Option<Policy>> {
        check_name("org", org)?;
        self.get_policy("SELECT policy FROM org_policies WHERE org = $1", &[org])
            .await
    }

    async fn put_org_policy(&self, org: &str, policy: Policy) -> StoreResult<()> {
        check_name("org", org)?;
        self.policies.lock().unwrap().clear();
        sqlx::query(
            "WITH p AS (INSERT INTO org_policies (org, policy) VALUES ($1, $2) \
                 ON CONFLICT (org) DO UPDATE SET policy = EXCLUDED.policy) \
             UPDATE counters SET value = value + 1 WHERE name = 'policies'",
        )
        .bind(org)
        .bind(sqlx::types::Json(policy))
        .execute(&self.pool)
        .await
        .map_err(|e| db_err("writing a policy", e))?;
        Ok(())
    }

    async fn get_user_policy(&self, org: &str, user: &str) -> StoreResult<Option<Policy>> {
        check_name("org", org)?;
        check_name("user", user)?;
        self.get_policy(
            "SELECT policy FROM user_policies WHERE org = $1 AND usr = $2",
            &[org, user],
        )
        .await
    }

    async fn put_user_policy(&self, org: &str, user: &str, policy: Policy) -> StoreResult<()> {
        check_name("org", org)?;
        check_name("user", user)?;
        self.policies.lock().unwrap().clear();
        sqlx::query(
            "WITH p AS (INSERT INTO user_policies (org, usr, policy) VALUES ($1, $2, $3) \
                 ON CONFLICT (org, usr) DO UPDATE SET policy = EXCLUDED.policy) \
             UPDATE counters SET value = value + 1 WHERE name = 'policies'",
        )
        .bind(org)
        .bind(user)
        .bind(sqlx::types::Json(policy))
        .execute(&self.pool)
        .await
        .map_err(|e| db_err("writing a policy", e))?;
        Ok(())
    }

    async fn admit(
        &self,
        record: ExecutionRecord,
        rules: AdmissionRules,
    ) -> StoreResult<Admission> {
        self.admit_at(record, rules, None).await
    }

    async fn policies_for_admission(
        &self,
        org: &str,
        user: &str,
    ) -> StoreResult<(Option<Policy>, Option<Policy>, Option<u64>)> {
        let key = (org.to_string(), user.to_string());
        if let Some((o, u, v)) = self.policies.lock().unwrap().get(&key).cloned() {
            return Ok((o, u, Some(v)));
        }
        let (o, u, v) = self.read_policies(org, user).await?;
        insert_bounded(
            &mut self.policies.lock().unwrap(),
            POLICIES_MAX,
            key,
            (o.clone(), u.clone(), v),
        );
        Ok((o, u, Some(v)))
    }

    async fn admit_at(
        &self,
        record: ExecutionRecord,
        rules: AdmissionRules,
        policy_version: Option<u64>,
    ) -> StoreResult<Admission> {
        check_name("execution id", &record.id)?;
        check_name("org", &record.org)?;
        check_name("user", &record.user)?;
        if record.state != ExecState::Queued {
            return Err(StoreError::IllegalTransition {
                id: record.id,
                from: record.state,
                to: ExecState::Queued,
            });
        }
        // On a task of its own, the full admission included: it completes even if the
        // caller stops waiting.
        let me = self.clone();
        tokio::spawn(async move {
            if let Some(done) = me.admit_simple(&record, rules, policy_version).await? {
                return Ok(done);
            }
            me.change(move |me, mut tx| {
                let record = record.clone();
                async move {
                    let out = me.admit_tx(&mut tx, &record, rules, policy_version).await?;
                    Ok((out, tx))
                }
            })
            .await
        })
        .await
        .map_err(|e| StoreError::Io(format!("a store task failed: {e}")))?
    }

    async fn get(&self, id: &str) -> StoreResult<Option<ExecutionRecord>> {
        let row = sqlx::query(concat!(
            "SELECT ",
            rec_cols!(),
            " FROM executions WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_err("reading an execution", e))?;
        row.map(|r| self.record_of(id, &r, 0)).transpose()
    }

    async fn active_counts(&self) -> StoreResult<ActiveCounts> {
        let rows = sqlx::query("SELECT name, value FROM counters")
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_err("reading the counters", e))?;
        let mut c = ActiveCounts::default();
        for row in rows {
            let v = row.get::<i64, _>(1).max(0) as u64;
            match row.get::<&str, _>(0) {
                "queued" => c.queued = v,
                "running" => c.running = v,
                _ => {}
            }
        }
        Ok(c)
    }

    async fn list(&self, filter: &ListFilter) -> StoreResult<Vec<ExecutionRecord>> {
        let mut q: QueryBuilder<Postgres> = QueryBuilder::new(concat!(
            "SELECT id, ",
            rec_cols!(),
            " FROM executions WHERE TRUE"
        ));
        if let Some(org) = &filter.org {
            q.push(" AND org = ").push_bind(org);
        }
        if let Some(user) = &filter.user {
            q.push(" AND usr = ").push_bind(user);
        }
        if let Some(tab) = &filter.tab_id {
            q.push(" AND tab_id = ").push_bind(tab);
        }
        if let Some(state) = filter.state {
            q.push(" AND state = ").push_bind(state_name(state));
        }
        if filter.active_only {
            q.push(" AND state IN ('queued', 'running')");
        }
        q.push(" ORDER BY created_at DESC, id DESC");
        if let Some(limit) = filter.limit {
            q.push(" LIMIT ").push_bind(i64_of(limit as u64));
        }
        let rows = q
            .build()
            .fetch_all(&self.pool)
            .await
            .map_err(|e| db_err("listing executions", e))?;
        rows.iter()
            .map(|r| self.record_of(r.get::<&str, _>(0), r, 1))
            .collect()
    }

    async fn request_cancel(
        &self,
        id: &str,
        reason: CancelReason,
    ) -> StoreResult<Option<ExecutionRecord>> {
        let id = id.to_string();
        self.change(move |me, mut tx| {
            let id = id.clone();
            async move {
                let Some(old) = me.lock(&mut tx, &id).await? else {
                    return Ok((None, tx));
                };
                match cancelled(&old, reason, now_ms()) {
                    Some((rec, event)) => {
                        let events: Vec<ExecEvent> = event.into_iter().collect();
                        me.write(&mut tx, &old, &rec, &events).await?;
                        Ok((Some(rec), tx))
                    }
                    None => Ok((Some(old), tx)),
                }
            }
        })
        .await
    }

    async fn mark_running(
        &self,
        id: &str,
        agent: &str,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        if let Some((rec, sealed)) = self.start_simple(id, agent, at).await? {
            self.guess_last_seq(&rec.id, Some(rec.last_seq));
            let started = Started {
                record: rec.clone(),
                sealed,
            };
            insert_bounded(
                &mut self.started.lock().unwrap(),
                STARTED_MAX,
                rec.id.clone(),
                started,
            );
            return Ok(rec);
        }
        let (id, agent) = (id.to_string(), agent.to_string());
        let rec = self
            .change(move |me, mut tx| {
                let (id, agent) = (id.clone(), agent.clone());
                async move {
                    let old = locked!(me, tx, id);
                    let rec = running(&old, &agent, at)?;
                    me.write(&mut tx, &old, &rec, &[]).await?;
                    Ok((rec, tx))
                }
            })
            .await?;
        self.guess_last_seq(&rec.id, Some(rec.last_seq));
        Ok(rec)
    }

    async fn mark_finished(
        &self,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        error: Option<String>,
        at: Millis,
    ) -> StoreResult<ExecutionRecord> {
        self.guess_last_seq(id, None);
        self.started.lock().unwrap().remove(id);
        let id = id.to_string();
        self.change(move |me, mut tx| {
            let (id, result_key, error) = (id.clone(), result_key.clone(), error.clone());
            async move {
                let old = locked!(me, tx, id);
                let rec = finished(&old, state, result_key, error, at)?;
                me.write(&mut tx, &old, &rec, &[]).await?;
                Ok((rec, tx))
            }
        })
        .await
    }

    async fn finish(
        &self,
        id: &str,
        state: ExecState,
        result_key: Option<String>,
        at: Millis,
        summary: ResultSummary,
    ) -> StoreResult<(ExecutionRecord, ExecEvent)> {
        let last = self.last_seqs.lock().unwrap().get(id).copied();
        let started = self.started.lock().unwrap().remove(id);
        self.guess_last_seq(id, None);
        if let (Some(last), Some(started)) = (last, started) {
            let simple = self
                .finish_simple(
                    started,
                    last,
                    state,
                    result_key.clone(),
                    at,
                    summary.clone(),
                )
                .await?;
            if let Some(done) = simple {
                return Ok(done);
            }
        }
        let id = id.to_string();
        self.change(move |me, mut tx| {
            let (id, result_key, summary) = (id.clone(), result_key.clone(), summary.clone());
            async move {
                let old = locked!(me, tx, id);
                let (rec, event) = finished_with_event(&old, state, result_key, at, summary)?;
                me.write(&mut tx, &old, &rec, std::slice::from_ref(&event))
                    .await?;
                Ok(((rec, event), tx))
            }
        })
        .await
    }

    async fn register_host(&self, agent: &str, lease_ms: u64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO hosts (agent, expires_at, alive) \
             VALUES ($1, now() + $2 * interval '1 millisecond', TRUE) \
             ON CONFLICT (agent) DO UPDATE SET expires_at = EXCLUDED.expires_at, alive = TRUE",
        )
        .bind(agent)
        .bind(i64_of(lease_ms) as f64)
        .execute(&self.pool)
        .await
        .map_err(|e| db_err("registering a host", e))?;
        Ok(())
    }

    async fn heartbeat(&self, agent: &str, lease_ms: u64) -> StoreResult<Lease> {
        let agent = agent.to_string();
        self.change(move |_me, mut tx| {
            let agent = agent.clone();
            async move {
                let row = sqlx::query("SELECT alive, state FROM hosts WHERE agent = $1 FOR UPDATE")
                    .bind(&agent)
                    .fetch_optional(&mut *tx)
                    .await
                    .ctx("reading a host")?;
                // Late but not declared lost by anyone yet: the host keeps its runs.
                let row = row.map(|r| (r.get::<bool, _>(0), r.get::<String, _>(1)));
                let lease = match row {
                    Some((true, state)) => {
                        sqlx::query(
                            "UPDATE hosts SET expires_at = now() + $2 * interval '1 millisecond' \
                             WHERE agent = $1",
                        )
                        .bind(&agent)
                        .bind(i64_of(lease_ms) as f64)
                        .execute(&mut *tx)
                        .await
                        .ctx("renewing a lease")?;
                        Lease::Held(HostState::parse(&state).unwrap_or_default())
                    }
                    _ => Lease::Lapsed,
                };
                Ok((lease, tx))
            }
        })
        .await
    }

    async fn set_host_state(&self, agent: &str, state: HostState) -> StoreResult<HostRecord> {
        let row = sqlx::query(
            "UPDATE hosts SET state = $2 WHERE agent = $1 \
             RETURNING alive, (extract(epoch FROM expires_at) * 1000)::bigint",
        )
        .bind(agent)
        .bind(state.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_err("setting a host's state", e))?
        .ok_or_else(|| StoreError::UnknownHost(agent.to_string()))?;
        Ok(HostRecord {
            agent: agent.to_string(),
            state,
            alive: row.get(0),
            lease_expires_at: row.get::<i64, _>(1).max(0) as u64,
        })
    }

    async fn hosts(&self) -> StoreResult<Vec<HostRecord>> {
        let rows = sqlx::query(
            "SELECT agent, state, alive, (extract(epoch FROM expires_at) * 1000)::bigint \
             FROM hosts ORDER BY agent",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_err("listing hosts", e))?;
        Ok(rows
            .iter()
            .map(|r| HostRecord {
                agent: r.get(0),
                state: HostState::parse(r.get::<&str, _>(1)).unwrap_or_default(),
                alive: r.get(2),
                lease_expires_at: r.get::<i64, _>(3).max(0) as u64,
            })
            .collect())
    }

    async fn put_group_statuses(&self, groups: &[GroupStatus]) -> StoreResult<()> {
        let names: Vec<String> = groups.iter().map(|g| g.group.clone()).collect();
        let bodies = groups
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| StoreError::Io(format!("encoding a group status: {e}")))?;
        // One statement: the groups named are upserted, the others dropped.
        sqlx::query(
            "WITH new AS (SELECT * FROM unnest($1::text[], $2::jsonb[]) AS n(grp, status)),              gone AS (DELETE FROM group_status WHERE grp <> ALL($1::text[]))              INSERT INTO group_status (grp, status) SELECT grp, status FROM new              ON CONFLICT (grp) DO UPDATE SET status = excluded.status",
        )
        .bind(&names)
        .bind(&bodies)
        .execute(&self.pool)
        .await
        .map_err(|e| db_err("publishing group statuses", e))?;
        Ok(())
    }

    async fn group_statuses(&self) -> StoreResult<Vec<GroupStatus>> {
        let rows: Vec<serde_json::Value> =
            sqlx::query_scalar("SELECT status FROM group_status ORDER BY grp")
                .fetch_all(&self.pool)
                .await
                .map_err(|e| db_err("reading group statuses", e))?;
        rows.into_iter()
            .map(|v| {
                serde_json::from_value(v)
                    .map_err(|e| StoreError::Corrupt(format!("a group status: {e}")))
            })
            .collect()
    }

    async fn reap_lapsed_hosts(&self) -> StoreResult<Vec<ExecEvent>> {
        self.change(move |me, mut tx| async move {
            let lapsed: Vec<String> = sqlx::query_scalar(
                "SELECT agent FROM hosts WHERE alive AND expires_at < now() \
                 ORDER BY agent FOR UPDATE SKIP LOCKED",
            )
            .fetch_all(&mut *tx)
            .await
            .ctx("reading lapsed hosts")?;
            let mut events = Vec::new();
            for agent in lapsed {
                events.extend(me.lose_host(&mut tx, &agent).await?);
            }
            Ok((events, tx))
        })
        .await
    }

    async fn lead(&self, role: &str, holder: &str, lease_ms: u64) -> StoreResult<Option<u64>> {
        let (role, holder) = (role.to_string(), holder.to_string());
        self.change(move |_me, mut tx| {
            let (role, holder) = (role.clone(), holder.clone());
            async move {
                // The row exists once; concurrent first takers serialise on the insert.
                sqlx::query(
                    "INSERT INTO leaders (role, holder, term, expires_at) \
                     VALUES ($1, '', 0, '-infinity') ON CONFLICT (role) DO NOTHING",
                )
                .bind(&role)
                .execute(&mut *tx)
                .await
                .ctx("preparing a leadership")?;
                let row = sqlx::query(
                    "SELECT holder, term, expires_at >= now() FROM leaders WHERE role = $1 FOR UPDATE",
                )
                .bind(&role)
                .fetch_one(&mut *tx)
                .await
                .ctx("reading a leadership")?;
                let (current, term, live) = (
                    row.get::<String, _>(0),
                    row.get::<i64, _>(1),
                    row.get::<bool, _>(2),
                );
                let term = if current == holder && live {
                    term
                } else if live {
                    return Ok((None, tx));
                } else {
                    term + 1
                };
                sqlx::query(
                    "UPDATE leaders SET holder = $2, term = $3, \
                     expires_at = now() + $4 * interval '1 millisecond' WHERE role = $1",
                )
                .bind(&role)
                .bind(&holder)
                .bind(term)
                .bind(i64_of(lease_ms) as f64)
                .execute(&mut *tx)
                .await
                .ctx("taking a leadership")?;
                Ok((Some(term as u64), tx))
            }
        })
        .await
    }

    async fn append_event(&self, id: &str, body: EventBody) -> StoreResult<ExecEvent> {
        let mut events = self.append_events(id, vec![body]).await?;
        events
            .pop()
            .ok_or_else(|| StoreError::Io(format!("appending an event to {id}: none stored")))
    }

    async fn append_events(&self, id: &str, bodies: Vec<EventBody>) -> StoreResult<Vec<ExecEvent>> {
        if bodies.is_empty() {
            return Ok(Vec::new());
        }
        // The agent running an execution is normally its only writer: its guess of the
        // last seq is right and the append is one round trip.
        if let Some(events) = self.append_guessed(id, &bodies).await? {
            return Ok(events);
        }
        let id = id.to_string();
        let events = self.change(move |me, mut tx| {
            let (id, bodies) = (id.clone(), bodies.clone());
            async move {
                // The row's counter takes the whole batch at once (the row stays locked
                // until commit): the seqs are `last - n + 1 ..= last`, gapless, and no
                // other append lands between them.
                let n = bodies.len() as i64;
                let last: Option<i64> = sqlx::query_scalar(
                    "UPDATE executions SET last_seq = last_seq + $2 WHERE id = $1 RETURNING last_seq",
                )
                .bind(&id)
                .bind(n)
                .fetch_optional(&mut *tx)
                .await
                .ctx("counting events")?;
                let Some(last) = last else {
                    return Err(StoreError::NotFound(id).into());
                };
                let first = (last - n + 1) as u64;
                let events = ExecEvent::numbered(&id, first, now_ms(), bodies);
                me.insert_events(&mut tx, &id, &events).await?;
                Ok((events, tx))
            }
        })
        .await?;
        if let Some(last) = events.last() {
            self.guess_last_seq(&last.execution_id, Some(last.seq));
        }
        Ok(events)
    }

    async fn events_after(&self, id: &str, after: u64) -> StoreResult<Vec<ExecEvent>> {
        let rows = sqlx::query(
            "SELECT seq, body FROM events WHERE execution_id = $1 AND seq > $2 ORDER BY seq",
        )
        .bind(id)
        .bind(i64_of(after))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_err("reading events", e))?;
        if rows.is_empty() && self.get(id).await?.is_none() {
            return Err(StoreError::NotFound(id.to_string()));
        }
        rows.iter()
            .map(|r| self.open_event(id, r.get::<i64, _>(0) as u64, r.get::<&[u8], _>(1)))
            .collect()
    }

    async fn get_with_events_after(
        &self,
        id: &str,
        after: u64,
    ) -> StoreResult<Option<(ExecutionRecord, Vec<ExecEvent>)>> {
        // One statement, one snapshot: the events are those of the record read.
        let row = sqlx::query(concat!(
            "SELECT ",
            rec_cols!(),
            ", (SELECT array_agg(seq ORDER BY seq) FROM events \
                 WHERE execution_id = $1 AND seq > $2), \
               (SELECT array_agg(body ORDER BY seq) FROM events \
                 WHERE execution_id = $1 AND seq > $2) \
             FROM executions WHERE id = $1"
        ))
        .bind(id)
        .bind(i64_of(after))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| db_err("reading an execution and its events", e))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let record = self.record_of(id, &row, 0)?;
        let seqs: Vec<i64> = row.get::<Option<Vec<i64>>, _>(6).unwrap_or_default();
        let bodies: Vec<Vec<u8>> = row.get::<Option<Vec<Vec<u8>>>, _>(7).unwrap_or_default();
        if seqs.len() != bodies.len() {
            return Err(StoreError::Corrupt(format!(
                "events of {id}: {} seqs for {} bodies",
                seqs.len(),
                bodies.len()
            )));
        }
        let events = seqs
            .iter()
            .zip(&bodies)
            .map(|(seq, body)| self.open_event(id, *seq as u64, body))
            .collect::<StoreResult<Vec<ExecEvent>>>()?;
        Ok(Some((record, events)))
    }

    async fn expired(&self, before: Millis, limit: usize) -> StoreResult<Vec<ExecutionRecord>> {
        let rows = sqlx::query(concat!(
            "SELECT id, ",
            rec_cols!(),
            " FROM executions \
             WHERE state NOT IN ('queued', 'running') AND COALESCE(finished_at, created_at) < $1 \
             ORDER BY COALESCE(finished_at, created_at), id LIMIT $2"
        ))
        .bind(i64_of(before))
        .bind(i64_of(limit as u64))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| db_err("reading expired executions", e))?;
        rows.iter()
            .map(|r| self.record_of(r.get::<&str, _>(0), r, 1))
            .collect()
    }

    async fn delete_expired(&self, ids: &[String], before: Millis) -> StoreResult<Vec<String>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids = ids.to_vec();
        self.change(move |_me, mut tx| {
            let ids = ids.clone();
            async move {
                // Their events go with them (ON DELETE CASCADE).
                let mut gone: Vec<String> = sqlx::query_scalar(
                    "DELETE FROM executions WHERE id = ANY($1) \
                     AND state NOT IN ('queued', 'running') \
                     AND COALESCE(finished_at, created_at) < $2 RETURNING id",
                )
                .bind(&ids)
                .bind(i64_of(before))
                .fetch_all(&mut *tx)
                .await
                .ctx("deleting expired executions")?;
                gone.sort();
                Ok((gone, tx))
            }
        })
        .await
    }
}
