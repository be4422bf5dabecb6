//! Runtime settings and their defaults.

use std::time::Duration;

/// Tunables of a runtime; every field has a builder method on
/// [`RuntimeBuilder`](crate::RuntimeBuilder).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    /// How often an idle worker looks for due tasks without a notification
    /// (retries whose `run_at` arrived, missed notifications).
    pub(crate) poll_interval: Duration,
    /// The most tasks one claim statement takes.
    pub(crate) claim_batch: usize,
    /// The most completions one flush transaction applies.
    pub(crate) flush_batch: usize,
    /// The most bytes of outputs one flush transaction carries (a completion larger
    /// than this is flushed alone): PostgreSQL refuses a message over 1 GiB.
    pub(crate) flush_batch_bytes: usize,
    /// The largest output (JSON) a step may return; a larger one fails the step
    /// permanently. PostgreSQL cannot store a `jsonb` much over 255 MiB.
    pub(crate) max_output_bytes: usize,
    /// Added to a step's timeout to get its lease: a claim older than that is
    /// considered lost and its task goes back to the queue.
    pub(crate) lease_grace: Duration,
    /// How often this instance heartbeats.
    pub(crate) heartbeat_interval: Duration,
    /// An instance silent for longer is offline and its claims return to the queue.
    pub(crate) offline_after: Duration,
    /// How often expired leases and dead instances are looked for.
    pub(crate) rescue_interval: Duration,
    /// The shortest time between two NOTIFYs for the same queue from this runtime.
    pub(crate) notify_debounce: Duration,
    /// How long `shutdown` lets in-flight steps finish.
    pub(crate) shutdown_grace: Duration,
    /// Whether `start` applies the migrations.
    pub(crate) migrate: bool,
    /// How often the maintainer looks for dead rows to vacuum (`None`: never).
    pub(crate) vacuum_interval: Option<Duration>,
    /// Pool size when the runtime makes its own pool.
    pub(crate) max_connections: u32,
    /// Pruning of finished runs (`None`: kept forever).
    pub(crate) retention: Option<crate::Retention>,
    /// Queues claimed round robin across run keys (`RuntimeBuilder::fair_queue`).
    pub(crate) fair_queues: Vec<String>,
    /// Queues with a concurrency limit per run key (`RuntimeBuilder::key_concurrency`).
    pub(crate) key_limits: Vec<(String, u32)>,
    /// Rate limits and budgets per period steps count against (`RuntimeBuilder::limit`).
    pub(crate) limits: Vec<crate::Limit>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_millis(250),
            claim_batch: 500,
            flush_batch: 2_000,
            flush_batch_bytes: 32 << 20,
            max_output_bytes: 255 << 20,
            lease_grace: Duration::from_secs(30),
            rescue_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            offline_after: Duration::from_secs(30),
            notify_debounce: Duration::from_millis(5),
            shutdown_grace: Duration::from_secs(30),
            migrate: true,
            max_connections: 10,
            vacuum_interval: Some(Duration::from_secs(2)),
            retention: None,
            fair_queues: Vec::new(),
            key_limits: Vec::new(),
            limits: Vec::new(),
        }
    }
}
