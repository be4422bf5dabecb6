//! [`schedules()`] and [`remove_schedule`]: the cron schedules stored in
//! `pgflow.schedules` (registered by runtimes from code, see
//! [`RuntimeBuilder::schedule`](crate::RuntimeBuilder::schedule)).

use sqlx::{PgExecutor, PgPool};

use crate::store::schedules::{self, ScheduleRow};
use crate::{Error, ScheduleInfo};

/// Every stored schedule, by name: its definition, next tick (and how far away it
/// is; an overdue one has no instance running it), last tick and the status of the
/// last run it started.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
/// for s in pgflow_runtime::admin::schedules(&pool).await? {
///     println!("{} ({}, {}): next {:?}", s.name, s.cron, s.time_zone, s.next_tick);
/// }
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::NotMigrated`]; database errors.
pub async fn schedules(pool: &PgPool) -> Result<Vec<ScheduleInfo>, Error> {
    list(pool).await
}

pub(crate) async fn list(db: impl PgExecutor<'_>) -> Result<Vec<ScheduleInfo>, Error> {
    Ok(schedules::list(db).await?.into_iter().map(info).collect())
}

/// Removes schedule `name`: no instance fires it any more, and what it started is
/// left as it is. An instance that registers it in code stores it again when it
/// next starts (with its first tick after then): to stop a schedule for good,
/// remove it from the code too. Returns the schedule as it was.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
/// let gone = pgflow_runtime::admin::remove_schedule(&pool, "nightly_report").await?;
/// println!("removed {} ({})", gone.name, gone.cron);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::UnknownSchedule`] naming the stored ones; database errors.
pub async fn remove_schedule(pool: &PgPool, name: &str) -> Result<ScheduleInfo, Error> {
    if let Some(row) = schedules::remove(pool, name).await? {
        return Ok(info(row));
    }
    let known: Vec<String> = list(pool).await?.into_iter().map(|s| s.name).collect();
    Err(Error::UnknownSchedule {
        name: name.to_owned(),
        known: if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        },
    })
}

fn info(r: ScheduleRow) -> ScheduleInfo {
    ScheduleInfo {
        missed: r.missed.parse().unwrap_or_default(),
        name: r.name,
        workflow: r.workflow,
        cron: r.cron,
        time_zone: r.time_zone,
        grace_ms: r.grace_ms,
        next_tick: r.next_tick,
        next_in_ms: r.next_in_ms,
        last_tick: r.last_tick,
        last_run_id: r.last_run_id,
        last_run_status: r.last_run_status,
        created_at: r.created_at,
        updated_at: r.updated_at,
    }
}
