//! Retention: finished runs (with their step states and map elements) pruned —
//! deleted, or moved to `pgflow.archived_runs` — once older than an age, in small
//! batches, by one instance at a time. Off unless configured
//! ([`RuntimeBuilder::retention`](crate::RuntimeBuilder::retention)); the
//! `pgflow prune` command and [`admin::prune`](crate::admin::prune) do the same on
//! demand.
//!
//! ```no_run
//! use std::time::Duration;
//! use pgflow_runtime::{Retention, Runtime};
//!
//! # async fn demo() -> Result<(), pgflow_runtime::Error> {
//! let rt = Runtime::builder()
//!     .queue("default", 16)
//!     .retention(Retention::after(Duration::from_secs(7 * 24 * 3600)).archive(true))
//!     .start()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! A pruned run is gone from `pgflow.runs`: its idempotency key is free again (a
//! start with it starts a new run) and `pgflow.job_results` no longer counts it.

use std::time::Duration;

/// How long finished runs are kept, and how they are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub(crate) after: Duration,
    pub(crate) archive: bool,
    pub(crate) batch: usize,
    pub(crate) every: Duration,
}

impl Retention {
    /// Prunes runs that finished (succeeded, failed or cancelled) more than `after`
    /// ago; by default deleted (see [`Retention::archive`]), 1,000 runs a batch,
    /// looked for every minute.
    ///
    /// ```
    /// let r = pgflow_runtime::Retention::after(std::time::Duration::from_secs(86_400));
    /// ```
    pub fn after(after: Duration) -> Self {
        Self {
            after,
            archive: false,
            batch: 1_000,
            every: Duration::from_secs(60),
        }
    }

    /// Moves pruned runs to `pgflow.archived_runs` (one row per run with its steps
    /// as JSON) instead of deleting them.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let r = pgflow_runtime::Retention::after(Duration::from_secs(60)).archive(true);
    /// ```
    pub fn archive(mut self, on: bool) -> Self {
        self.archive = on;
        self
    }

    /// Runs pruned per transaction (default 1,000; at least 1): smaller batches hold
    /// locks and the server for less time each.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let r = pgflow_runtime::Retention::after(Duration::from_secs(60)).batch(200);
    /// ```
    pub fn batch(mut self, runs: usize) -> Self {
        self.batch = runs.max(1);
        self
    }

    /// How often the pruner looks for runs to prune (default every minute).
    ///
    /// ```
    /// # use std::time::Duration;
    /// let r = pgflow_runtime::Retention::after(Duration::from_secs(60))
    ///     .every(Duration::from_secs(10));
    /// ```
    pub fn every(mut self, every: Duration) -> Self {
        self.every = every;
        self
    }
}
