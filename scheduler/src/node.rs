//! The embedded single-host platform behind `hatchery up`: an embedded store (durable
//! under `data_dir/store`; or PostgreSQL when configured), an in-process bus (or Redis
//! Streams), encrypted objects under `data_dir/objects`,
//! the scheduler role, one agent, and the [`Platform`] front door for the API. Store and
//! objects seal with the same keyring; the data dir and everything in it is private
//! (0700 directories, 0600 files).
//!
//! The roles share nothing but the store, the bus and the objects, exactly as they will
//! when they run as separate processes on separate hosts over Redis and S3. The node also
//! runs retention: finished executions older than the platform's retention period are
//! deleted with their objects (the objects first).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::agent::{Agent, AgentConfig, AgentError, AgentHandle};
use crate::bus::Bus;
use crate::embedded::{EmbeddedBus, EmbeddedStore};
use crate::encrypted::{EncryptedObjects, S3Config};
use crate::objects::{ObjectError, Objects};
use crate::platform::{Platform, PlatformConfig};
use crate::policy::PolicyErrors;
use crate::postgres::{PgConfig, PgStore};
use crate::private_files;
use crate::redis_bus::{RedisBus, RedisConfig};
use crate::scaler::Scaling;
use crate::scheduling::{run_scheduler, run_scheduler_scaling};
use crate::seal::Keyring;
use crate::store::{Store, StoreError};

/// How often retention runs at most (it also runs once at start).
const RETENTION_EVERY: Duration = Duration::from_secs(3600);

/// Everything one embedded node needs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Records, events and objects live under this directory.
    pub data_dir: PathBuf,
    pub agent: AgentConfig,
    pub platform: PlatformConfig,
    /// The keys records, events and objects are sealed with (AES-256-GCM): sealing uses
    /// the current one, opening the one a blob names.
    pub keyring: Keyring,
    /// Keep executions, events and policies in PostgreSQL instead of the embedded store
    /// under `data_dir/store`.
    pub postgres: Option<PgConfig>,
    /// Carry work, live events and host status over Redis Streams instead of in-process
    /// channels.
    pub redis: Option<RedisConfig>,
    /// Keep objects in this S3 bucket instead of `data_dir/objects`.
    pub s3: Option<S3Config>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("data dir: {0}")]
    DataDir(String),
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("objects: {0}")]
    Objects(#[from] ObjectError),
    #[error("bus: {0}")]
    Bus(#[from] crate::bus::BusError),
    #[error("agent: {0}")]
    Agent(#[from] AgentError),
    #[error("scheduler: {0}")]
    Scheduler(String),
    /// The platform default policy fails the rule every policy passes.
    #[error("the platform default policy: {0}")]
    DefaultPolicy(#[from] PolicyErrors),
}

/// A running single-host platform.
pub struct EmbeddedNode {
    platform: Platform,
    agent: AgentHandle,
    scheduler: tokio::task::JoinHandle<()>,
    retention: tokio::task::JoinHandle<()>,
}

impl EmbeddedNode {
    /// Checks the default policy, opens the store and objects, starts the scheduler, then
    /// the agent (which reconciles executions a previous run left `running`), and
    /// retention.
    pub async fn start(cfg: NodeConfig) -> Result<EmbeddedNode, NodeError> {
        // A default that admits nothing (max_parallel 0) or everything never starts.
        crate::policy::validate_default(&cfg.platform.default_policy)?;
        crate::policy::validate_default(&cfg.agent.default_policy)?;
        private_files::create_dir(&cfg.data_dir).map_err(|e| {
            NodeError::DataDir(format!("preparing {}: {e}", cfg.data_dir.display()))
        })?;
        let store: Arc<dyn Store> = match &cfg.postgres {
            Some(pg) => Arc::new(PgStore::connect(pg, cfg.keyring.clone()).await?),
            None => Arc::new(EmbeddedStore::open(
                &cfg.data_dir.join("store"),
                cfg.keyring.clone(),
            )?),
        };
        let bus: Arc<dyn Bus> = match &cfg.redis {
            Some(r) => Arc::new(RedisBus::connect(r.clone(), cfg.keyring.clone()).await?),
            None => Arc::new(EmbeddedBus::new()),
        };
        let objects = match &cfg.s3 {
            Some(s3) => ObjectsConfig::S3(s3.clone()),
            None => ObjectsConfig::Folder(cfg.data_dir.join("objects")),
        }
        .open(cfg.keyring.clone())?;

        // Subscribed before the agent starts, so its first status is seen.
        let statuses = bus.subscribe_status();
        let scheduler = {
            let (store, bus) = (Arc::clone(&store), Arc::clone(&bus));
            tokio::spawn(async move {
                if let Err(e) = run_scheduler(store, bus, statuses, None).await {
                    tracing::info!(error = %e, "the scheduler stopped");
                }
            })
        };
        let agent_languages: Vec<String> =
            cfg.agent.languages.iter().map(|l| l.name.clone()).collect();
        let agent = match Agent::start(
            cfg.agent,
            Arc::clone(&store),
            Arc::clone(&bus),
            Arc::clone(&objects),
        )
        .await
        {
            Ok(a) => a,
            Err(e) => {
                scheduler.abort();
                return Err(e.into());
            }
        };
        for lang in &cfg.platform.languages {
            if !agent_languages.contains(lang) {
                tracing::warn!(
                    language = %lang,
                    "the platform accepts a language its agent does not run: \
                     such executions stay queued"
                );
            }
        }
        let platform = Platform {
            config: Arc::new(cfg.platform),
            store,
            bus,
            objects,
        };
        let retention = tokio::spawn(run_retention(platform.clone()));
        Ok(EmbeddedNode {
            platform,
            agent,
            scheduler,
            retention,
        })
    }

    /// The front door the API serves.
    pub fn platform(&self) -> Platform {
        self.platform.clone()
    }

    pub fn agent(&self) -> &AgentHandle {
        &self.agent
    }

    /// Waits until the agent's pools have a frozen sandbox each.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), NodeError> {
        Ok(self.agent.wait_ready(timeout).await?)
    }

    /// Stops the agent (see [`AgentHandle::shutdown`]), then the scheduler and retention.
    pub async fn shutdown(self) {
        self.agent.shutdown().await;
        self.scheduler.abort();
        self.retention.abort();
        let _ = self.scheduler.await;
        let _ = self.retention.await;
    }
}

/// Deletes finished executions older than the platform's retention period, with their
/// objects, for ever (once at start, then every tenth of the period, at most hourly):
/// objects first, then records ([`Platform::expire_old`]), so no pass ever leaves an
/// object behind.
pub async fn run_retention(platform: Platform) {
    let every =
        Duration::from_millis((platform.config.retention_ms / 10).max(1_000)).min(RETENTION_EVERY);
    loop {
        match platform.expire_old().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(expired = n, "expired old executions"),
            Err(e) => tracing::warn!(error = %e, "retention failed"),
        }
        tokio::time::sleep(every).await;
    }
}

/// Where code, results and artifacts are kept (sealed).
#[derive(Debug, Clone)]
pub enum ObjectsConfig {
    /// A local folder (one machine, or a mount every host shares).
    Folder(std::path::PathBuf),
    /// An S3 bucket.
    S3(S3Config),
}

impl ObjectsConfig {
    pub fn open(&self, keyring: Keyring) -> Result<Arc<dyn Objects>, NodeError> {
        Ok(match self {
            ObjectsConfig::Folder(dir) => Arc::new(EncryptedObjects::local(dir, keyring)?),
            ObjectsConfig::S3(s3) => Arc::new(EncryptedObjects::s3(s3, keyring)?),
        })
    }
}

/// The store's name for the scheduler's leadership.
const LEADER_ROLE: &str = "scheduler";

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What the roles of a cluster share: the store on PostgreSQL, the bus on Redis, and the
/// sealed objects. Every process of the cluster connects to the same ones with the same
/// keys.
#[derive(Clone)]
pub struct Engines {
    pub store: Arc<dyn Store>,
    pub bus: Arc<dyn Bus>,
    pub objects: Arc<dyn Objects>,
}

impl Engines {
    /// Connects to PostgreSQL (applying the schema) and Redis, and opens the objects (an
    /// S3 bucket, or a folder every process of the cluster sees).
    pub async fn connect(
        postgres: &PgConfig,
        redis: RedisConfig,
        objects: &ObjectsConfig,
        keyring: Keyring,
    ) -> Result<Engines, NodeError> {
        let store: Arc<dyn Store> = Arc::new(PgStore::connect(postgres, keyring.clone()).await?);
        let bus: Arc<dyn Bus> = Arc::new(RedisBus::connect(redis, keyring.clone()).await?);
        let objects = objects.open(keyring)?;
        Ok(Engines {
            store,
            bus,
            objects,
        })
    }

    /// The API's front door on these engines.
    pub fn platform(&self, config: PlatformConfig) -> Result<Platform, NodeError> {
        crate::policy::validate_default(&config.default_policy)?;
        Ok(Platform {
            config: Arc::new(config),
            store: Arc::clone(&self.store),
            bus: Arc::clone(&self.bus),
            objects: Arc::clone(&self.objects),
        })
    }

    /// The scheduler role, until `stop` (with the autoscaler when `scaling` is given):
    /// waits for the leadership (one scheduler of the
    /// cluster leads, under a lease of `lease` in the store), then places what is
    /// admitted and runs retention while it keeps renewing the lease; a scheduler that
    /// cannot renew in time stops placing at once and waits for the leadership again. A
    /// new leader starts from the store (everything queued is re-placed; the store's
    /// transitions make a repeat harmless).
    pub async fn run_scheduler(
        &self,
        config: PlatformConfig,
        name: &str,
        lease: Duration,
        scaling: Option<Scaling>,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<(), NodeError> {
        let platform = self.platform(config)?;
        tokio::pin!(stop);
        let lease_ms = lease.as_millis() as u64;
        let every = (lease / 3).max(Duration::from_millis(100));
        // When this scheduler last found the store unreachable.
        let mut store_trouble: Option<std::time::Instant> = None;
        loop {
            // Follow until the leadership is ours.
            let term = loop {
                match self.store.lead(LEADER_ROLE, name, lease_ms).await {
                    Ok(Some(term)) => break term,
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot ask for the leadership");
                        store_trouble = Some(std::time::Instant::now());
                    }
                }
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(every) => {}
                }
            };
            tracing::info!(scheduler = name, term, "leading the scheduling");
            let mut last_renewed = std::time::Instant::now();
            let statuses = self.bus.subscribe_status();
            let scheduler = tokio::spawn(run_scheduler_scaling(
                Arc::clone(&self.store),
                Arc::clone(&self.bus),
                statuses,
                store_trouble,
                scaling.clone(),
            ));
            let retention = tokio::spawn(run_retention(platform.clone()));
            let _guards = (AbortOnDrop(scheduler), AbortOnDrop(retention));
            loop {
                tokio::select! {
                    _ = &mut stop => return Ok(()),
                    _ = tokio::time::sleep(every) => {}
                }
                match self.store.lead(LEADER_ROLE, name, lease_ms).await {
                    Ok(Some(t)) if t == term => last_renewed = std::time::Instant::now(),
                    Ok(_) => {
                        tracing::warn!(
                            scheduler = name,
                            term,
                            "another scheduler leads now: stopping"
                        );
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the leadership");
                        store_trouble = Some(std::time::Instant::now());
                        if last_renewed.elapsed() >= lease {
                            tracing::warn!(
                                scheduler = name,
                                term,
                                "the leadership lapsed: stopping"
                            );
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Starts the agent role of this host on these engines.
    pub async fn start_agent(&self, config: AgentConfig) -> Result<AgentHandle, NodeError> {
        crate::policy::validate_default(&config.default_policy)?;
        Ok(Agent::start(
            config,
            Arc::clone(&self.store),
            Arc::clone(&self.bus),
            Arc::clone(&self.objects),
        )
        .await?)
    }
}
