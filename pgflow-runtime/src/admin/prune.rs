//! [`prune`]: finished runs older than an age, deleted or archived, in batches.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::Error;
use crate::store::retention;

/// What [`prune`] does.
#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// Runs that finished more than this long ago go.
    pub older_than: Duration,
    /// Move them to `pgflow.archived_runs` instead of deleting them.
    pub archive: bool,
    /// Count what would go; change nothing.
    pub dry_run: bool,
    /// Runs per transaction.
    pub batch: usize,
}

impl PruneOptions {
    /// Delete runs that finished more than `older_than` ago, 1,000 a batch.
    ///
    /// ```
    /// let o = pgflow_runtime::admin::PruneOptions::older_than(std::time::Duration::from_secs(3600));
    /// assert!(!o.archive && !o.dry_run);
    /// ```
    pub fn older_than(older_than: Duration) -> Self {
        Self {
            older_than,
            archive: false,
            dry_run: false,
            batch: 1_000,
        }
    }
}

/// What [`prune`] did (or, dry, would do).
#[derive(Debug, Clone, Serialize)]
pub struct PruneReport {
    /// Runs that finished before this (database clock) were pruned.
    pub cutoff: DateTime<Utc>,
    /// Runs pruned (or that would be).
    pub runs: i64,
    /// Their step states.
    pub steps: i64,
    /// Their map elements.
    pub elements: i64,
    /// Moved to `pgflow.archived_runs` rather than deleted.
    pub archived: bool,
    /// Nothing was changed.
    pub dry_run: bool,
    /// Another instance was pruning: this call did nothing.
    pub busy: bool,
}

/// Prunes the runs that finished (succeeded, failed or cancelled) more than
/// `options.older_than` ago, with their step states and map elements: deleted, or
/// moved to `pgflow.archived_runs`. In batches of `options.batch` runs, each its own
/// transaction holding the pruning lock (one pruner at a time: a call that finds it
/// taken returns `busy`); running runs and runs with a task still landing are kept.
///
/// ```no_run
/// use std::time::Duration;
/// use pgflow_runtime::admin::{self, PruneOptions};
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
/// let week = Duration::from_secs(7 * 24 * 3600);
/// let would = admin::prune(&pool, PruneOptions { dry_run: true, ..PruneOptions::older_than(week) }).await?;
/// println!("{} runs would go", would.runs);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::Config`] for an age the database cannot represent; database errors.
pub async fn prune(pool: &PgPool, options: PruneOptions) -> Result<PruneReport, Error> {
    let mut conn = pool.acquire().await?;
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await?;
    let age = chrono::Duration::from_std(options.older_than).map_err(|_| {
        Error::Config(format!(
            "retention age {:?} is too large",
            options.older_than
        ))
    })?;
    let cutoff = now.checked_sub_signed(age).ok_or_else(|| {
        Error::Config(format!(
            "retention age {:?} is too large",
            options.older_than
        ))
    })?;
    let mut report = PruneReport {
        cutoff,
        runs: 0,
        steps: 0,
        elements: 0,
        archived: options.archive,
        dry_run: options.dry_run,
        busy: false,
    };
    let bound = retention::id_bound(&mut conn, cutoff).await?;
    let batch = i64::try_from(options.batch.max(1)).unwrap_or(i64::MAX);
    if options.dry_run {
        let n = retention::prune_batch(&mut conn, bound, cutoff, i64::MAX, false, true).await?;
        report.runs = n.runs;
        report.steps = n.steps;
        report.elements = n.elements;
        return Ok(report);
    }
    loop {
        let mut tx = sqlx::Connection::begin(&mut *conn).await?;
        if !retention::try_lock(&mut tx).await? {
            report.busy = true;
            return Ok(report);
        }
        let n =
            retention::prune_batch(&mut tx, bound, cutoff, batch, options.archive, false).await?;
        tx.commit().await?;
        report.runs += n.runs;
        report.steps += n.steps;
        report.elements += n.elements;
        if n.runs < batch {
            return Ok(report);
        }
    }
}
