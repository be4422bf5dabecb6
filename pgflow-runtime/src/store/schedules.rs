//! Cron schedules, `pgflow.schedules`: registering a runtime's schedules at start,
//! locking a due one to fire it, moving its next tick on, listing and removing.
//!
//! Firing is fenced on the row lock: a scheduler locks a due row with `FOR UPDATE
//! SKIP LOCKED` ([`lock_due`]), starts the tick's runs (`runs::start`, each with the
//! tick's idempotency key) and advances the row ([`advance`]) in one transaction, so
//! one instance fires a tick and the next one to lock the row sees it advanced. The
//! idempotency key (unique index `runs_idempotency_key`) makes a second start of a
//! tick return the first run, whatever happens to the row.
//!
//! A database holds a handful of schedules and an instance its own few: every
//! statement goes through the primary key (`name`) or reads the whole small table.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

/// A stored schedule's definition (what [`register`] compares).
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct StoredDefinition {
    pub(crate) name: String,
    pub(crate) workflow: String,
    pub(crate) cron: String,
    pub(crate) time_zone: String,
    pub(crate) missed: String,
    pub(crate) grace_ms: i64,
}

/// Locks the stored rows of `names` (primary key, in name order so that instances
/// starting together cannot deadlock) until the caller's transaction ends, and
/// returns them with the database's clock.
pub(crate) async fn lock_for_register(
    conn: &mut PgConnection,
    names: &[&str],
) -> Result<(DateTime<Utc>, Vec<StoredDefinition>), sqlx::Error> {
    let now: DateTime<Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *conn)
        .await?;
    let rows = sqlx::query_as(
        "SELECT name, workflow, cron, time_zone, missed, grace_ms
         FROM pgflow.schedules WHERE name = ANY($1) ORDER BY name FOR UPDATE",
    )
    .bind(names)
    .fetch_all(&mut *conn)
    .await?;
    Ok((now, rows))
}

/// Schedules to register, as the bind arrays of [`register`].
#[derive(Debug, Default)]
pub(crate) struct NewSchedules<'a> {
    pub(crate) names: Vec<&'a str>,
    pub(crate) workflows: Vec<&'a str>,
    pub(crate) crons: Vec<&'a str>,
    pub(crate) time_zones: Vec<&'a str>,
    pub(crate) missed: Vec<&'a str>,
    pub(crate) grace_ms: Vec<i64>,
    /// The first tick after now of each, by its expression and zone.
    pub(crate) next_ticks: Vec<Option<DateTime<Utc>>>,
}

/// Inserts the schedules not stored yet and updates those whose definition
/// changed (primary key); a row whose definition is the same is not written. Only a
/// changed expression or time zone moves `next_tick` (to the one given): a changed
/// policy or workflow keeps the ticks that are due.
pub(crate) async fn register(
    conn: &mut PgConnection,
    s: &NewSchedules<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO pgflow.schedules AS s
             (name, workflow, cron, time_zone, missed, grace_ms, next_tick)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::bigint[], $7::timestamptz[])
         ON CONFLICT (name) DO UPDATE SET
             workflow = excluded.workflow,
             cron = excluded.cron,
             time_zone = excluded.time_zone,
             missed = excluded.missed,
             grace_ms = excluded.grace_ms,
             next_tick = CASE WHEN (s.cron, s.time_zone) IS DISTINCT FROM
                                   (excluded.cron, excluded.time_zone)
                              THEN excluded.next_tick ELSE s.next_tick END,
             updated_at = now()
         WHERE (s.workflow, s.cron, s.time_zone, s.missed, s.grace_ms) IS DISTINCT FROM
               (excluded.workflow, excluded.cron, excluded.time_zone, excluded.missed,
                excluded.grace_ms)",
    )
    .bind(&s.names)
    .bind(&s.workflows)
    .bind(&s.crons)
    .bind(&s.time_zones)
    .bind(&s.missed)
    .bind(&s.grace_ms)
    .bind(&s.next_ticks)
    .execute(conn)
    .await?;
    Ok(())
}

/// A due schedule, locked for firing.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct DueRow {
    pub(crate) name: String,
    pub(crate) cron: String,
    pub(crate) time_zone: String,
    pub(crate) missed: String,
    pub(crate) grace_ms: i64,
    pub(crate) next_tick: DateTime<Utc>,
    pub(crate) last_tick: Option<DateTime<Utc>>,
    pub(crate) last_run_id: Option<i64>,
    /// The database's clock (the transaction's start).
    pub(crate) now: DateTime<Utc>,
}

/// Locks the due schedule with the earliest tick among `(names[i], workflows[i])` —
/// the schedules the caller registers in code, for the same workflow — skipping
/// rows another scheduler holds (it is firing them) and `excluded`. Held until the
/// caller's transaction ends. Primary key, over the caller's few names.
pub(crate) async fn lock_due(
    conn: &mut PgConnection,
    names: &[&str],
    workflows: &[&str],
    excluded: &[String],
) -> Result<Option<DueRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.name, s.cron, s.time_zone, s.missed, s.grace_ms, s.next_tick, s.last_tick,
                s.last_run_id, now() AS now
         FROM pgflow.schedules s
         JOIN unnest($1::text[], $2::text[]) AS c(name, workflow)
              ON c.name = s.name AND c.workflow = s.workflow
         WHERE s.next_tick <= now() AND s.name <> ALL($3)
         ORDER BY s.next_tick
         LIMIT 1
         FOR UPDATE OF s SKIP LOCKED",
    )
    .bind(names)
    .bind(workflows)
    .bind(excluded)
    .fetch_optional(conn)
    .await
}

/// Moves a schedule locked by [`lock_due`] on: its next tick, and the last tick that
/// started a run and that run (unchanged when this pass started none). Fenced on
/// the row lock the caller's transaction holds.
pub(crate) async fn advance(
    conn: &mut PgConnection,
    name: &str,
    next_tick: Option<DateTime<Utc>>,
    last_tick: Option<DateTime<Utc>>,
    last_run_id: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pgflow.schedules SET next_tick = $2, last_tick = $3, last_run_id = $4
         WHERE name = $1",
    )
    .bind(name)
    .bind(next_tick)
    .bind(last_tick)
    .bind(last_run_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// The earliest next tick among `(names[i], workflows[i])` and the database's clock,
/// for a scheduler to sleep until it. Primary key, over the caller's few names.
pub(crate) async fn earliest(
    db: impl PgExecutor<'_>,
    names: &[&str],
    workflows: &[&str],
) -> Result<(Option<DateTime<Utc>>, DateTime<Utc>), sqlx::Error> {
    sqlx::query_as(
        "SELECT min(s.next_tick), now()
         FROM pgflow.schedules s
         JOIN unnest($1::text[], $2::text[]) AS c(name, workflow)
              ON c.name = s.name AND c.workflow = s.workflow",
    )
    .bind(names)
    .bind(workflows)
    .fetch_one(db)
    .await
}

/// A stored schedule with its last run's status, as listings show it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ScheduleRow {
    pub(crate) name: String,
    pub(crate) workflow: String,
    pub(crate) cron: String,
    pub(crate) time_zone: String,
    pub(crate) missed: String,
    pub(crate) grace_ms: i64,
    pub(crate) next_tick: Option<DateTime<Utc>>,
    pub(crate) next_in_ms: Option<i64>,
    pub(crate) last_tick: Option<DateTime<Utc>>,
    pub(crate) last_run_id: Option<i64>,
    pub(crate) last_run_status: Option<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
}

/// Every stored schedule by name, with its last run's status (primary key of
/// `pgflow.runs`).
pub(crate) async fn list(db: impl PgExecutor<'_>) -> Result<Vec<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT s.name, s.workflow, s.cron, s.time_zone, s.missed, s.grace_ms, s.next_tick,
                (EXTRACT(EPOCH FROM (s.next_tick - now())) * 1000)::bigint AS next_in_ms,
                s.last_tick, s.last_run_id, r.status AS last_run_status, s.created_at,
                s.updated_at
         FROM pgflow.schedules s LEFT JOIN pgflow.runs r ON r.id = s.last_run_id
         ORDER BY s.name",
    )
    .fetch_all(db)
    .await
}

/// Deletes schedule `name` (primary key); the row as it was, if there was one.
pub(crate) async fn remove(
    db: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<ScheduleRow>, sqlx::Error> {
    sqlx::query_as(
        "WITH d AS (DELETE FROM pgflow.schedules WHERE name = $1 RETURNING *)
         SELECT d.name, d.workflow, d.cron, d.time_zone, d.missed, d.grace_ms, d.next_tick,
                (EXTRACT(EPOCH FROM (d.next_tick - now())) * 1000)::bigint AS next_in_ms,
                d.last_tick, d.last_run_id, r.status AS last_run_status, d.created_at,
                d.updated_at
         FROM d LEFT JOIN pgflow.runs r ON r.id = d.last_run_id",
    )
    .bind(name)
    .fetch_optional(db)
    .await
}
