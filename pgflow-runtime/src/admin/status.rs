//! [`status`]: the state of a cluster — instances, queue depths, runs per workflow,
//! per workflow version the runs in flight and the instances serving it, and the
//! cron schedules.

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::store::{instances, runs, tasks};
use crate::{Error, ScheduleInfo};

// status

/// The state of a cluster: instances, queues, runs.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Registered instances, most recent heartbeat first.
    pub instances: Vec<Instance>,
    /// Tasks per queue and state (only queues with tasks).
    pub queues: Vec<QueueDepth>,
    /// Runs per workflow and status.
    pub runs: Vec<WorkflowRuns>,
    /// Every registered workflow version: runs in flight, instances serving it.
    pub versions: Vec<VersionStatus>,
    /// Workflow versions with running runs that no online instance serves.
    pub unserved: Vec<UnservedRuns>,
    /// The cron schedules, by name (see [`admin::schedules`](crate::admin::schedules())).
    pub schedules: Vec<ScheduleInfo>,
}

/// One registered workflow version (a row of `pgflow.workflows`), as a rolling
/// deploy watches it: the runs still running on it and the online instances that
/// can run them. A version with runs and no instance is stranded until one serving
/// it comes online (see [`Status::unserved`]).
#[derive(Debug, Clone, Serialize)]
pub struct VersionStatus {
    /// The workflow.
    pub workflow: String,
    /// The version.
    pub version: i32,
    /// Its queue, as stored.
    pub queue: String,
    /// When an instance first registered it.
    pub registered_at: DateTime<Utc>,
    /// Runs of this version still running (pinned to it until they finish).
    pub running: i64,
    /// Ids of the online instances that serve it.
    pub instances: Vec<String>,
}

impl VersionStatus {
    /// Runs are in flight and no online instance serves this version.
    pub fn is_stranded(&self) -> bool {
        self.running > 0 && self.instances.is_empty()
    }
}

/// Running runs of a workflow version that no online instance serves: they wait
/// until an instance that links that version and serves its queue is online (a
/// version nobody deploys any more strands them).
#[derive(Debug, Clone, Serialize)]
pub struct UnservedRuns {
    /// The workflow.
    pub workflow: String,
    /// Its version.
    pub version: i32,
    /// Running runs of it.
    pub runs: i64,
    /// Its queue (as stored; `?` when no definition is stored).
    pub queue: String,
}

/// One row of `pgflow.instances`.
#[derive(Debug, Clone, Serialize)]
pub struct Instance {
    /// Its id.
    pub id: String,
    /// Its host.
    pub host: String,
    /// Its process id.
    pub pid: i32,
    /// The queues it serves and their concurrency, as stored (JSON).
    pub queues: serde_json::Value,
    /// Steps it can run at once.
    pub capacity: i32,
    /// Steps it was running at its last heartbeat.
    pub load: i32,
    /// `online` or `offline`, as stored.
    pub status: String,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Its last heartbeat.
    pub last_heartbeat: DateTime<Utc>,
    /// Time since its last heartbeat (database clock), in milliseconds.
    pub idle_ms: i64,
}

/// Tasks of one queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueDepth {
    /// The queue.
    pub queue: String,
    /// Unclaimed and due: what workers claim next.
    pub available: i64,
    /// Unclaimed and due later (retries waiting for their backoff, delayed starts
    /// and steps, snoozes).
    pub scheduled: i64,
    /// Steps waiting for a signal (until it comes, or their timeout).
    pub awaiting_signal: i64,
    /// Steps waiting for their child run (a subflow) to finish.
    pub awaiting_subflow: i64,
    /// Claimed by an instance.
    pub running: i64,
}

/// Runs of one workflow (all versions) per status.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowRuns {
    /// The workflow.
    pub workflow: String,
    /// Not finished.
    pub running: i64,
    /// Finished with an output.
    pub succeeded: i64,
    /// Failed.
    pub failed: i64,
    /// Cancelled.
    pub cancelled: i64,
}

/// Instances, queue depths, run counts, the running runs no online instance
/// serves, and the schedules. The run counts scan `pgflow.runs`.
///
/// # Errors
///
/// [`Error::NotMigrated`]; database errors.
pub async fn status(pool: &PgPool) -> Result<Status, Error> {
    read(pool, Parts::ALL).await
}

/// Which parts of a [`Status`] [`read`] fills (the others stay empty): a page or a
/// scrape reads what it shows, not every count of the table.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Parts {
    pub(crate) instances: bool,
    pub(crate) queues: bool,
    pub(crate) runs: bool,
    pub(crate) versions: bool,
    pub(crate) schedules: bool,
}

impl Parts {
    const ALL: Parts = Parts {
        instances: true,
        queues: true,
        runs: true,
        versions: true,
        schedules: true,
    };
}

/// The `parts` of the status, on one connection.
pub(crate) async fn read(pool: &PgPool, parts: Parts) -> Result<Status, Error> {
    let mut conn = pool.acquire().await?;
    let mut st = Status {
        instances: Vec::new(),
        queues: Vec::new(),
        runs: Vec::new(),
        versions: Vec::new(),
        unserved: Vec::new(),
        schedules: Vec::new(),
    };
    if parts.instances {
        st.instances = instances(&mut conn).await?;
    }
    if parts.queues {
        st.queues = queues(&mut conn).await?;
    }
    if parts.runs {
        st.runs = run_counts(&mut conn).await?;
    }
    if parts.versions {
        (st.versions, st.unserved) = versions(&mut conn).await?;
    }
    if parts.schedules {
        st.schedules = super::schedules::list(&mut *conn).await?;
    }
    Ok(st)
}

/// Every instance (the [`Status::instances`] part).
async fn instances(conn: &mut PgConnection) -> Result<Vec<Instance>, Error> {
    Ok(instances::list(&mut *conn, instances::Listing::All)
        .await?
        .into_iter()
        .map(|r| Instance {
            queues: serde_json::from_str(&r.queues).unwrap_or(serde_json::Value::String(r.queues)),
            id: r.id,
            host: r.host,
            pid: r.pid,
            capacity: r.capacity,
            load: r.load,
            status: r.status,
            started_at: r.started_at,
            last_heartbeat: r.last_heartbeat,
            idle_ms: r.idle_ms,
        })
        .collect())
}

/// Each queue's tasks by state (the [`Status::queues`] part).
async fn queues(conn: &mut PgConnection) -> Result<Vec<QueueDepth>, Error> {
    Ok(tasks::depths(conn)
        .await?
        .into_iter()
        .map(|r| QueueDepth {
            queue: r.queue,
            available: r.available,
            scheduled: r.scheduled,
            awaiting_signal: r.awaiting_signal,
            awaiting_subflow: r.awaiting_subflow,
            running: r.running,
        })
        .collect())
}

/// Runs per workflow and status (the [`Status::runs`] part: a count over `runs`).
async fn run_counts(conn: &mut PgConnection) -> Result<Vec<WorkflowRuns>, Error> {
    Ok(runs::counts(&mut *conn)
        .await?
        .into_iter()
        .map(|r| WorkflowRuns {
            workflow: r.workflow,
            running: r.running,
            succeeded: r.succeeded,
            failed: r.failed,
            cancelled: r.cancelled,
        })
        .collect())
}

/// The versions, and among them those with runs no online instance serves (the
/// [`Status::versions`] and [`Status::unserved`] parts): one scan of the running
/// runs for both.
async fn versions(
    conn: &mut PgConnection,
) -> Result<(Vec<VersionStatus>, Vec<UnservedRuns>), Error> {
    let rows = instances::versions(&mut *conn).await?;
    let unserved = rows
        .iter()
        .filter(|r| r.is_stranded())
        .map(|r| UnservedRuns {
            workflow: r.workflow.clone(),
            version: r.version,
            runs: r.running,
            queue: r.queue.clone().unwrap_or_else(|| "?".to_owned()),
        })
        .collect();
    let versions = rows
        .into_iter()
        .filter_map(|r| {
            Some(VersionStatus {
                registered_at: r.registered_at?,
                workflow: r.workflow,
                version: r.version,
                queue: r.queue.unwrap_or_else(|| "?".to_owned()),
                running: r.running,
                instances: r.instances,
            })
        })
        .collect();
    Ok((versions, unserved))
}
