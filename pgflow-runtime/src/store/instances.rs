//! The instance registry, `pgflow.instances`: registration (refusing an id a live
//! instance holds), heartbeats, marking silent instances offline, listing.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::store::millis;

/// A registered instance as stored, with the time since its heartbeat.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct InstanceRow {
    pub(crate) id: String,
    pub(crate) host: String,
    pub(crate) pid: i32,
    /// Its queues and their concurrency, as stored (a JSON object).
    pub(crate) queues: String,
    pub(crate) capacity: i32,
    pub(crate) load: i32,
    pub(crate) status: String,
    pub(crate) started_at: DateTime<Utc>,
    pub(crate) last_heartbeat: DateTime<Utc>,
    /// Milliseconds since its last heartbeat (database clock).
    pub(crate) idle_ms: i64,
}

/// Which instances [`list`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listing {
    /// Online ones and those that went offline in the last hour, by id.
    Recent,
    /// All, most recent heartbeat first.
    All,
}

/// The registered instances.
pub(crate) async fn list(
    db: impl PgExecutor<'_>,
    listing: Listing,
) -> Result<Vec<InstanceRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, host, pid, queues::text AS queues, capacity, load, status, started_at,
                last_heartbeat,
                GREATEST((EXTRACT(EPOCH FROM (now() - last_heartbeat)) * 1000)::bigint, 0)
                    AS idle_ms
         FROM pgflow.instances
         WHERE $1 OR status = 'online' OR last_heartbeat > now() - interval '1 hour'
         ORDER BY CASE WHEN $1 THEN last_heartbeat END DESC, id",
    )
    .bind(listing == Listing::All)
    .fetch_all(db)
    .await
}

/// What registering this instance needs.
#[derive(Debug, Clone)]
pub(crate) struct Registration<'a> {
    pub(crate) id: &'a str,
    pub(crate) host: &'a str,
    pub(crate) pid: i32,
    /// Its queues and their concurrency (a JSON object).
    pub(crate) queues_json: &'a str,
    pub(crate) capacity: i32,
    /// The workflow versions it serves (`name:version`): linked, and on a served queue.
    pub(crate) served: &'a [String],
    /// A holder silent for longer than this is taken over.
    pub(crate) offline_after: Duration,
}

/// How [`register`] went.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Registered {
    /// Inserted, or taken over from an instance that is offline.
    Fresh,
    /// Taken over from a holder that stopped heartbeating (still marked online).
    TookOverSilent,
    /// A holder with a fresh heartbeat has the id.
    Held {
        host: String,
        pid: i32,
        heartbeat_secs_ago: f64,
    },
}

/// Inserts this instance, or takes its id over when the holder is offline, silent
/// longer than `offline_after`, or (`force`) known to be a dead process.
pub(crate) async fn register(
    pool: &sqlx::PgPool,
    r: &Registration<'_>,
    force: bool,
) -> Result<Registered, sqlx::Error> {
    // The CTE returns the previous status so a takeover of a dead holder is known.
    let prev: Option<(Option<String>,)> = sqlx::query_as(
        "WITH prev AS (SELECT status FROM pgflow.instances WHERE id = $1)
         INSERT INTO pgflow.instances AS i
             (id, host, pid, queues, capacity, load, status, started_at, last_heartbeat, served)
         VALUES ($1, $2, $3, $4::jsonb, $5, 0, 'online', now(), now(), $8)
         ON CONFLICT (id) DO UPDATE
         SET host = EXCLUDED.host, pid = EXCLUDED.pid, queues = EXCLUDED.queues,
             capacity = EXCLUDED.capacity, served = EXCLUDED.served, load = 0, status = 'online',
             started_at = now(), last_heartbeat = now()
         WHERE $7 OR i.status = 'offline'
            OR i.last_heartbeat < now() - interval '1 millisecond' * $6
         RETURNING (SELECT p.status FROM prev p)",
    )
    .bind(r.id)
    .bind(r.host)
    .bind(r.pid)
    .bind(r.queues_json)
    .bind(r.capacity)
    .bind(millis(r.offline_after))
    .bind(force)
    .bind(r.served)
    .fetch_optional(pool)
    .await?;
    if let Some((prev,)) = prev {
        return Ok(if prev.as_deref() == Some("online") && !force {
            Registered::TookOverSilent
        } else {
            Registered::Fresh
        });
    }
    let holder: Option<(String, i32, f64)> = sqlx::query_as(
        "SELECT host, pid, EXTRACT(EPOCH FROM (now() - last_heartbeat))::float8
         FROM pgflow.instances WHERE id = $1",
    )
    .bind(r.id)
    .fetch_optional(pool)
    .await?;
    Ok(match holder {
        Some((host, pid, heartbeat_secs_ago)) => Registered::Held {
            host,
            pid,
            heartbeat_secs_ago,
        },
        // Deleted in between: registering again inserts.
        None => Registered::Fresh,
    })
}

/// One heartbeat: liveness and load (by primary key).
pub(crate) async fn heartbeat(
    db: impl PgExecutor<'_>,
    id: &str,
    load: usize,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pgflow.instances SET last_heartbeat = now(), load = $2, status = 'online'
         WHERE id = $1",
    )
    .bind(id)
    .bind(i32::try_from(load).unwrap_or(i32::MAX))
    .execute(db)
    .await?;
    Ok(())
}

/// Marks this instance offline (at shutdown).
pub(crate) async fn mark_offline(db: impl PgExecutor<'_>, id: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE pgflow.instances SET status = 'offline', load = 0, last_heartbeat = now()
         WHERE id = $1",
    )
    .bind(id)
    .execute(db)
    .await?;
    Ok(())
}

/// Marks online instances silent for longer than `offline_after` offline; returns
/// their ids.
pub(crate) async fn mark_silent_offline(
    conn: &mut PgConnection,
    offline_after: Duration,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE pgflow.instances SET status = 'offline', load = 0
         WHERE status = 'online' AND last_heartbeat < now() - interval '1 millisecond' * $1
         RETURNING id",
    )
    .bind(millis(offline_after))
    .fetch_all(conn)
    .await
}

/// `name:version`, as `served` holds workflow versions.
pub(crate) fn served_key(workflow: &str, version: i32) -> String {
    format!("{workflow}:{version}")
}

/// Whether an online instance serves `workflow` at `version`.
pub(crate) async fn is_served(
    db: impl PgExecutor<'_>,
    workflow: &str,
    version: i32,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pgflow.instances
                        WHERE status = 'online' AND $1 = ANY (served))",
    )
    .bind(served_key(workflow, version))
    .fetch_one(db)
    .await
}

/// A workflow version — stored, or only named by running runs — with its running
/// runs and the online instances that serve it.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct VersionRow {
    pub(crate) workflow: String,
    pub(crate) version: i32,
    /// Its queue, from the stored definition (NULL when none is stored).
    pub(crate) queue: Option<String>,
    /// When it was stored (NULL when it is not).
    pub(crate) registered_at: Option<chrono::DateTime<chrono::Utc>>,
    pub(crate) running: i64,
    pub(crate) instances: Vec<String>,
}

impl VersionRow {
    /// Runs are in flight and no online instance serves it.
    pub(crate) fn is_stranded(&self) -> bool {
        self.running > 0 && self.instances.is_empty()
    }
}

/// Every stored workflow version, and every version running runs name without a
/// stored definition, with its running runs (one scan of the running runs) and the
/// online instances that serve it.
pub(crate) async fn versions(db: impl PgExecutor<'_>) -> Result<Vec<VersionRow>, sqlx::Error> {
    sqlx::query_as(
        "WITH running AS (
             SELECT workflow, version, count(*) AS n FROM pgflow.runs
             WHERE status = 'running' GROUP BY workflow, version
         ), v AS (
             SELECT COALESCE(w.name, r.workflow) AS workflow,
                    COALESCE(w.version, r.version) AS version,
                    w.definition ->> 'queue' AS queue, w.registered_at,
                    COALESCE(r.n, 0) AS running
             FROM pgflow.workflows w
             FULL JOIN running r ON r.workflow = w.name AND r.version = w.version
         )
         SELECT v.*,
                ARRAY(SELECT i.id FROM pgflow.instances i
                      WHERE i.status = 'online'
                        AND (v.workflow || ':' || v.version) = ANY (i.served)
                      ORDER BY i.id) AS instances
         FROM v
         ORDER BY v.workflow, v.version",
    )
    .fetch_all(db)
    .await
}
