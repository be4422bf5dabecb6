//! The instance registry: one row per runtime in `pgflow.instances`, heartbeats,
//! and the detection of instances that died.
//!
//! A runtime registers at start (id, host, pid, queues, capacity) and heartbeats
//! every `heartbeat_interval` with its load (steps executing now). An instance whose
//! heartbeat is older than `offline_after` is marked offline by whichever instance
//! runs the rescue next (one at a time, under an advisory lock), and the tasks it had
//! claimed go back to the queue with the attempt counted — through the same fenced
//! flush as completions, so a task that was completed meanwhile is never touched.
//!
//! Two live runtimes cannot share an id: the second start is refused. A restart
//! with the id of a process that is gone (same host, its pid no longer exists) or
//! whose heartbeat expired takes the id over; at start a runtime returns any claim
//! still held under its id to the queue at once (attempt counted).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tracing::warn;

use crate::Error;

/// A runtime instance as registered in `pgflow.instances`.
#[derive(Debug, Clone, PartialEq)]
pub struct InstanceInfo {
    /// The instance id (`$INSTANCE_ID`, `host-pid`, or set on the builder).
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id.
    pub pid: i32,
    /// The queues it serves and their concurrency.
    pub queues: BTreeMap<String, usize>,
    /// Total concurrency.
    pub capacity: i32,
    /// Steps executing at its last heartbeat.
    pub load: i32,
    /// `online` or `offline`.
    pub status: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_heartbeat: DateTime<Utc>,
    /// Time since its last heartbeat.
    pub idle: Duration,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    host: String,
    pid: i32,
    queues: String,
    capacity: i32,
    load: i32,
    status: String,
    started_at: DateTime<Utc>,
    last_heartbeat: DateTime<Utc>,
    idle_secs: f64,
}

/// Online instances and those that went offline in the last hour, by id.
pub(crate) async fn list(pool: &PgPool) -> Result<Vec<InstanceInfo>, Error> {
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT id, host, pid, queues::text AS queues, capacity, load, status, started_at,
                last_heartbeat,
                EXTRACT(EPOCH FROM (now() - last_heartbeat))::float8 AS idle_secs
         FROM pgflow.instances
         WHERE status = 'online' OR last_heartbeat > now() - interval '1 hour'
         ORDER BY id",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| InstanceInfo {
            queues: serde_json::from_str(&r.queues).unwrap_or_default(),
            idle: Duration::from_secs_f64(r.idle_secs.max(0.0)),
            id: r.id,
            host: r.host,
            pid: r.pid,
            capacity: r.capacity,
            load: r.load,
            status: r.status,
            started_at: r.started_at,
            last_heartbeat: r.last_heartbeat,
        })
        .collect())
}

/// Registers this runtime under `id`, refusing an id held by a live instance.
pub(crate) async fn register(
    pool: &PgPool,
    id: &str,
    queues: &[(String, usize)],
    offline_after: Duration,
) -> Result<(), Error> {
    let host = crate::runtime::hostname();
    let pid = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let queue_map: BTreeMap<&str, usize> = queues.iter().map(|(q, c)| (q.as_str(), *c)).collect();
    let queues_json = serde_json::to_string(&queue_map).unwrap_or_else(|_| "{}".to_owned());
    let capacity = i32::try_from(queues.iter().map(|q| q.1).sum::<usize>()).unwrap_or(i32::MAX);
    let offline_ms = i64::try_from(offline_after.as_millis()).unwrap_or(i64::MAX);
    // Inserted, or taken over when the holder is offline or silent too long. The
    // CTE returns the previous status so a takeover of a dead holder is known.
    let upsert = |force: bool| {
        sqlx::query_as::<_, (Option<String>,)>(
            "WITH prev AS (SELECT status, last_heartbeat FROM pgflow.instances WHERE id = $1)
             INSERT INTO pgflow.instances AS i
                 (id, host, pid, queues, capacity, load, status, started_at, last_heartbeat)
             VALUES ($1, $2, $3, $4::jsonb, $5, 0, 'online', now(), now())
             ON CONFLICT (id) DO UPDATE
             SET host = EXCLUDED.host, pid = EXCLUDED.pid, queues = EXCLUDED.queues,
                 capacity = EXCLUDED.capacity, load = 0, status = 'online',
                 started_at = now(), last_heartbeat = now()
             WHERE $7 OR i.status = 'offline'
                OR i.last_heartbeat < now() - interval '1 millisecond' * $6
             RETURNING (SELECT CASE WHEN p.status = 'online' THEN 'dead' ELSE p.status END FROM prev p)",
        )
        .bind(id)
        .bind(&host)
        .bind(pid)
        .bind(&queues_json)
        .bind(capacity)
        .bind(offline_ms)
        .bind(force)
    };
    if let Some((prev,)) = upsert(false).fetch_optional(pool).await? {
        if prev.as_deref() == Some("dead") {
            warn!(
                instance = id,
                "pgflow: taking over the id of an instance that stopped heartbeating"
            );
        }
        return Ok(());
    }
    // Held by an instance whose heartbeat is fresh: is it a dead process here?
    let holder: Option<(String, i32, f64)> = sqlx::query_as(
        "SELECT host, pid, EXTRACT(EPOCH FROM (now() - last_heartbeat))::float8
         FROM pgflow.instances WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?;
    if let Some((holder_host, holder_pid, secs)) = holder {
        let gone = holder_host == host
            && holder_pid != pid
            && !std::path::Path::new(&format!("/proc/{holder_pid}")).exists();
        if gone {
            warn!(
                instance = id,
                pid = holder_pid,
                "pgflow: taking over the id of a process that is gone"
            );
            upsert(true).fetch_optional(pool).await?;
            return Ok(());
        }
        return Err(Error::InstanceIdInUse {
            id: id.to_owned(),
            host: holder_host,
            pid: holder_pid,
            heartbeat_secs_ago: secs,
        });
    }
    // Deleted in between: try once more.
    upsert(false).fetch_optional(pool).await?;
    Ok(())
}

/// One heartbeat: liveness and load.
pub(crate) async fn heartbeat(pool: &PgPool, id: &str, load: usize) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pgflow.instances SET last_heartbeat = now(), load = $2, status = 'online'
         WHERE id = $1",
    )
    .bind(id)
    .bind(i32::try_from(load).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// Marks this instance offline (at shutdown).
pub(crate) async fn mark_offline(pool: &PgPool, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pgflow.instances SET status = 'offline', load = 0, last_heartbeat = now()
         WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}
