//! Operator functions over a pool: what the `pgflow` CLI runs.
//!
//! Everything here works from the database alone — the step tables come from
//! `pgflow.workflows` (stored by every runtime at start from
//! [`WorkflowDef::describe`](pgflow::WorkflowDef::describe)), so a binary that links
//! none of the workflows can inspect, retry and cancel their runs.
//!
//! ```no_run
//! use pgflow_runtime::admin;
//!
//! # async fn demo() -> Result<(), admin::AdminError> {
//! let pool = admin::connect("postgres://postgres@127.0.0.1:5432/postgres").await?;
//! let status = admin::status(&pool).await?;
//! for q in &status.queues {
//!     println!("{}: {} available, {} running", q.queue, q.available, q.running);
//! }
//! let failed = admin::list_runs(&pool, &admin::RunFilter {
//!     status: Some(admin::RunStatus::Failed),
//!     ..Default::default()
//! }).await?;
//! for run in failed {
//!     admin::retry(&pool, pgflow::RunId(run.id)).await?;
//! }
//! # Ok(()) }
//! ```

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgflow::{AttemptFailure, RunError, RunId};
use serde::{Deserialize, Serialize, Serializer};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

use crate::{Error, MIGRATOR, mask_password, worker};

/// What the operator functions fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// An error of the runtime: [`Error::Connect`] (unreachable database),
    /// [`Error::Migrate`], [`Error::RunNotFound`].
    #[error(transparent)]
    Runtime(#[from] Error),
    /// A query failed.
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    /// The database has no (or an incomplete) pgflow schema.
    #[error(
        "the pgflow schema is missing in this database ({0}); run `pgflow migrate` or start a \
         runtime against it first"
    )]
    NotMigrated(#[source] sqlx::Error),
    /// `retry` was asked for a run that is not failed.
    #[error("run {id} is {status}, not failed: only a failed run can be retried")]
    NotFailed {
        /// The run.
        id: RunId,
        /// Its status.
        status: String,
    },
    /// `cancel` was asked for a run that already finished.
    #[error("run {id} has already {status}: only a running run can be cancelled")]
    NotRunning {
        /// The run.
        id: RunId,
        /// Its status.
        status: String,
    },
    /// A run's workflow version has no row in `pgflow.workflows`.
    #[error(
        "workflow `{workflow}` version {version} has no stored definition in pgflow.workflows \
         (a runtime that links it stores it at start)"
    )]
    MissingDefinition {
        /// The workflow.
        workflow: String,
        /// Its version.
        version: i32,
    },
    /// A stored definition cannot be read, or retry cannot handle it.
    #[error("workflow `{workflow}` version {version}: {message}")]
    Definition {
        /// The workflow.
        workflow: String,
        /// Its version.
        version: i32,
        /// What is wrong.
        message: String,
    },
    /// A duration such as `--since` did not parse.
    #[error(
        "invalid duration {input:?}: expected a number and a unit, like 30s, 15m, 1h, 7d or 1h30m"
    )]
    InvalidDuration {
        /// What was given.
        input: String,
    },
    /// A run status filter did not parse.
    #[error("invalid run status {0:?}: expected one of running, succeeded, failed, cancelled")]
    InvalidStatus(String),
}

impl From<sqlx::Error> for AdminError {
    fn from(e: sqlx::Error) -> Self {
        // undefined_table, invalid_schema_name: the migrations were never applied.
        let code = e
            .as_database_error()
            .and_then(|d| d.code())
            .map(|c| c.into_owned());
        match code.as_deref() {
            Some("42P01" | "3F000") => Self::NotMigrated(e),
            _ => Self::Database(e),
        }
    }
}

/// How long [`connect`] waits for the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects a small pool (2 connections) to `url`.
///
/// # Errors
///
/// [`Error::Connect`] (inside [`AdminError::Runtime`]) naming the URL with its
/// password masked and what to check, when the URL is malformed or the server
/// cannot be reached.
pub async fn connect(url: &str) -> Result<PgPool, AdminError> {
    let connect_error = |source| {
        AdminError::Runtime(Error::Connect {
            url: mask_password(url),
            source,
        })
    };
    let opts: PgConnectOptions = url.parse().map_err(connect_error)?;
    // One plain connection first: a pool retries a refused connection until its
    // acquire timeout and then reports only the timeout, not the cause.
    let probe = tokio::time::timeout(CONNECT_TIMEOUT, PgConnection::connect_with(&opts))
        .await
        .map_err(|_| {
            connect_error(sqlx::Error::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            )))
        })?
        .map_err(connect_error)?;
    let _ = probe.close().await;
    PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(CONNECT_TIMEOUT)
        .connect_with(opts)
        .await
        .map_err(connect_error)
}

/// One migration file.
#[derive(Debug, Clone, Serialize)]
pub struct Migration {
    /// Its number (`0001`).
    pub version: i64,
    /// Its name (`init`).
    pub description: String,
}

/// What [`migrate`] did.
#[derive(Debug, Clone, Serialize)]
pub struct MigrateReport {
    /// The migrations applied now.
    pub applied: Vec<Migration>,
    /// How many were applied before.
    pub already_applied: usize,
}

/// Applies the pgflow migrations that are not applied yet.
///
/// # Errors
///
/// [`Error::Migrate`] (inside [`AdminError::Runtime`]); database errors.
pub async fn migrate(pool: &PgPool) -> Result<MigrateReport, AdminError> {
    use sqlx::migrate::Migrate;
    let before: HashSet<i64> = {
        let mut conn = pool.acquire().await?;
        conn.ensure_migrations_table().await.map_err(Error::from)?;
        conn.list_applied_migrations()
            .await
            .map_err(Error::from)?
            .into_iter()
            .map(|m| m.version)
            .collect()
    };
    MIGRATOR.run(pool).await.map_err(Error::from)?;
    let applied = MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration() && !before.contains(&m.version))
        .map(|m| Migration {
            version: m.version,
            description: m.description.to_string(),
        })
        .collect();
    Ok(MigrateReport {
        applied,
        already_applied: before.len(),
    })
}

// ---------------------------------------------------------------------------------
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
    /// Unclaimed and due later (retries waiting for their backoff, delayed starts).
    pub scheduled: i64,
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

/// Instances, queue depths and run counts. The run counts scan `pgflow.runs`.
///
/// # Errors
///
/// [`AdminError::NotMigrated`]; database errors.
pub async fn status(pool: &PgPool) -> Result<Status, AdminError> {
    type InstanceRow = (
        String,
        String,
        i32,
        String,
        i32,
        i32,
        String,
        DateTime<Utc>,
        DateTime<Utc>,
        i64,
    );
    let rows: Vec<InstanceRow> = sqlx::query_as(
        "SELECT id, host, pid, queues::text, capacity, load, status, started_at, last_heartbeat,
                (EXTRACT(EPOCH FROM (now() - last_heartbeat)) * 1000)::bigint
         FROM pgflow.instances
         ORDER BY last_heartbeat DESC, id",
    )
    .fetch_all(pool)
    .await?;
    let instances = rows
        .into_iter()
        .map(|r| Instance {
            id: r.0,
            host: r.1,
            pid: r.2,
            queues: serde_json::from_str(&r.3).unwrap_or(serde_json::Value::String(r.3)),
            capacity: r.4,
            load: r.5,
            status: r.6,
            started_at: r.7,
            last_heartbeat: r.8,
            idle_ms: r.9.max(0),
        })
        .collect();

    let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(
        "SELECT queue,
                count(*) FILTER (WHERE claimed_by IS NULL AND run_at <= now()),
                count(*) FILTER (WHERE claimed_by IS NULL AND run_at > now()),
                count(*) FILTER (WHERE claimed_by IS NOT NULL)
         FROM pgflow.tasks
         GROUP BY queue
         ORDER BY queue",
    )
    .fetch_all(pool)
    .await?;
    let queues = rows
        .into_iter()
        .map(|r| QueueDepth {
            queue: r.0,
            available: r.1,
            scheduled: r.2,
            running: r.3,
        })
        .collect();

    let rows: Vec<(String, i64, i64, i64, i64)> = sqlx::query_as(
        "SELECT workflow,
                count(*) FILTER (WHERE status = 'running'),
                count(*) FILTER (WHERE status = 'succeeded'),
                count(*) FILTER (WHERE status = 'failed'),
                count(*) FILTER (WHERE status = 'cancelled')
         FROM pgflow.runs
         GROUP BY workflow
         ORDER BY workflow",
    )
    .fetch_all(pool)
    .await?;
    let runs = rows
        .into_iter()
        .map(|r| WorkflowRuns {
            workflow: r.0,
            running: r.1,
            succeeded: r.2,
            failed: r.3,
            cancelled: r.4,
        })
        .collect();
    Ok(Status {
        instances,
        queues,
        runs,
    })
}

// ---------------------------------------------------------------------------------
// runs

/// The status of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Not finished.
    Running,
    /// Finished with an output.
    Succeeded,
    /// A step failed for good.
    Failed,
    /// Cancelled.
    Cancelled,
}

impl RunStatus {
    /// The name stored in `pgflow.runs.status`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for RunStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RunStatus {
    type Err = AdminError;

    /// ```
    /// use pgflow_runtime::admin::RunStatus;
    /// assert_eq!("failed".parse::<RunStatus>().unwrap(), RunStatus::Failed);
    /// assert!("done".parse::<RunStatus>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "running" => Ok(Self::Running),
            "succeeded" => Ok(Self::Succeeded),
            "failed" => Ok(Self::Failed),
            "cancelled" => Ok(Self::Cancelled),
            _ => Err(AdminError::InvalidStatus(s.to_owned())),
        }
    }
}

/// Which runs [`list_runs`] returns: newest first.
#[derive(Debug, Clone)]
pub struct RunFilter {
    /// Only runs of this workflow.
    pub workflow: Option<String>,
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// At most this many (default 20).
    pub limit: u32,
}

impl Default for RunFilter {
    fn default() -> Self {
        Self {
            workflow: None,
            status: None,
            limit: 20,
        }
    }
}

/// One run, as listed.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// Its id.
    pub id: i64,
    /// Its workflow.
    pub workflow: String,
    /// The workflow version it runs.
    pub version: i32,
    /// `running`, `succeeded`, `failed` or `cancelled`.
    pub status: String,
    /// When it was started.
    pub created_at: DateTime<Utc>,
    /// When it was due (later than `created_at` for a delayed start).
    pub run_at: DateTime<Utc>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
    /// From due to finished, for a finished run (as in `pgflow.job_results`).
    pub duration_ms: Option<i64>,
    /// Cost recorded by its steps.
    pub cost_cents: i64,
    /// The instance that finished it.
    pub instance_id: Option<String>,
    /// Why it failed, in one line, with the failing step's every attempt.
    pub error: Option<String>,
    /// The step that failed it.
    pub failed_step: Option<String>,
    /// The last failed attempt of that step: `attempt 3 retryable: HTTP 503`.
    pub last_error: Option<String>,
}

type RunRow = (
    i64,
    String,
    i32,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    Option<i64>,
    i64,
    Option<String>,
    Option<String>,
);

const RUN_COLUMNS: &str = "id, workflow, version, status, created_at, run_at, completed_at,
    (EXTRACT(EPOCH FROM (completed_at - GREATEST(created_at, run_at))) * 1000)::bigint,
    cost_cents, instance_id, error::text";

impl RunSummary {
    fn from_row(r: RunRow) -> Self {
        let error =
            r.10.as_deref()
                .map(|json| serde_json::from_str::<RunError>(json).map_err(|_| json.to_owned()));
        let (failed_step, last_error) = match &error {
            Some(Ok(e)) => (
                e.failed_step().map(str::to_owned),
                e.history().last().map(ToString::to_string),
            ),
            _ => (None, None),
        };
        Self {
            id: r.0,
            workflow: r.1,
            version: r.2,
            status: r.3,
            created_at: r.4,
            run_at: r.5,
            completed_at: r.6,
            duration_ms: r.7,
            cost_cents: r.8,
            instance_id: r.9,
            // A stored error that is not a `RunError` is shown as stored.
            error: error.map(|e| e.map_or_else(|raw| raw, |e| e.to_string())),
            failed_step,
            last_error,
        }
    }
}

/// The newest runs matching `filter`.
///
/// # Errors
///
/// [`AdminError::NotMigrated`]; database errors.
pub async fn list_runs(pool: &PgPool, filter: &RunFilter) -> Result<Vec<RunSummary>, AdminError> {
    let sql = format!(
        "SELECT {RUN_COLUMNS} FROM pgflow.runs
         WHERE ($1::text IS NULL OR workflow = $1) AND ($2::text IS NULL OR status = $2)
         ORDER BY id DESC
         LIMIT $3"
    );
    let rows: Vec<RunRow> = sqlx::query_as(&sql)
        .bind(filter.workflow.as_deref())
        .bind(filter.status.map(RunStatus::as_str))
        .bind(i64::from(filter.limit))
        .fetch_all(pool)
        .await?;
    Ok(rows.into_iter().map(RunSummary::from_row).collect())
}

/// Where a step of a run stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum StepStatus {
    /// Its output is stored (or, for the last step, the run succeeded).
    Completed,
    /// It failed for good.
    Failed,
    /// The run is running and the step waits for its parents.
    Waiting,
    /// A task is in the queue (due now, or later for a retry's backoff).
    Queued,
    /// An instance is executing it.
    Running,
    /// The run finished without it running.
    NotStarted,
    /// A state this version of the tool does not know, as stored.
    Other(String),
}

impl StepStatus {
    /// The name shown and serialized: `completed`, `not_started`, ..
    pub fn as_str(&self) -> &str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Waiting => "waiting",
            Self::Queued => "queued",
            Self::Running => "running",
            Self::NotStarted => "not_started",
            Self::Other(s) => s,
        }
    }
}

impl fmt::Display for StepStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str().replace('_', " "))
    }
}

impl Serialize for StepStatus {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// One step of a run.
#[derive(Debug, Clone, Serialize)]
pub struct StepDetail {
    /// Its index in the workflow's step table.
    pub index: usize,
    /// Its name.
    pub name: String,
    /// The steps it depends on.
    pub parents: Vec<String>,
    /// Where it stands.
    pub status: StepStatus,
    /// Attempts made (including the one running); `None` when not recorded (the last
    /// step of a succeeded run stores no step row).
    pub attempts: Option<i32>,
    /// From when the step became ready (its last parent completed, or the run
    /// became due) to when it finished, or until now while it is queued or running;
    /// includes queue wait and retry backoff.
    pub duration_ms: Option<i64>,
    /// When it finished.
    pub completed_at: Option<DateTime<Utc>>,
    /// The instance that finished it, or the one running it.
    pub instance_id: Option<String>,
    /// The last failed attempt, in one line.
    pub error: Option<String>,
    /// Every failed attempt, oldest first.
    pub errors: Vec<AttemptFailure>,
}

/// One run with its steps.
#[derive(Debug, Clone, Serialize)]
pub struct RunDetail {
    /// The run.
    #[serde(flatten)]
    pub run: RunSummary,
    /// Its input.
    pub input: serde_json::Value,
    /// Its output, once succeeded.
    pub output: Option<serde_json::Value>,
    /// The stored error, once failed.
    pub error_detail: Option<serde_json::Value>,
    /// Its steps in graph order (parents before children, then declaration order).
    pub steps: Vec<StepDetail>,
}

/// A stored step table, read from `pgflow.workflows.definition`.
#[derive(Debug, Deserialize)]
struct StoredDef {
    #[serde(default = "default_queue")]
    queue: String,
    steps: Vec<StoredStep>,
}

#[derive(Debug, Deserialize)]
struct StoredStep {
    name: String,
    #[serde(default = "default_kind")]
    kind: String,
    #[serde(default)]
    parents: Vec<String>,
    #[serde(default = "default_max_attempts")]
    max_attempts: u32,
    #[serde(default)]
    priority: i16,
}

fn default_queue() -> String {
    "default".to_owned()
}
fn default_kind() -> String {
    "single".to_owned()
}
fn default_max_attempts() -> u32 {
    3
}

/// A stored step table with its edges resolved.
#[derive(Debug)]
struct Graph {
    def: StoredDef,
    /// Per step, its parents' indices.
    parents: Vec<Vec<usize>>,
    /// Per step, whether another step depends on it.
    has_children: Vec<bool>,
    /// Parents before children, ties in declaration order.
    order: Vec<usize>,
}

impl Graph {
    fn new(def: StoredDef) -> Result<Self, String> {
        let index: HashMap<&str, usize> = def
            .steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut parents = Vec::with_capacity(def.steps.len());
        let mut has_children = vec![false; def.steps.len()];
        for s in &def.steps {
            let mut ps = Vec::with_capacity(s.parents.len());
            for p in &s.parents {
                let &i = index
                    .get(p.as_str())
                    .ok_or_else(|| format!("step `{}` names an unknown parent `{p}`", s.name))?;
                has_children[i] = true;
                ps.push(i);
            }
            parents.push(ps);
        }
        let order = topological_order(&parents)
            .ok_or_else(|| "the stored step graph has a cycle".to_owned())?;
        Ok(Self {
            def,
            parents,
            has_children,
            order,
        })
    }
}

/// Kahn's algorithm, always taking the lowest ready index: parents first, and
/// declaration order among steps that are ready together. `None` on a cycle.
fn topological_order(parents: &[Vec<usize>]) -> Option<Vec<usize>> {
    let n = parents.len();
    let mut missing: Vec<usize> = parents.iter().map(Vec::len).collect();
    let mut done = vec![false; n];
    let mut order = Vec::with_capacity(n);
    while order.len() < n {
        let next = (0..n).find(|&i| !done[i] && missing[i] == 0)?;
        done[next] = true;
        order.push(next);
        for (child, ps) in parents.iter().enumerate() {
            missing[child] -= ps.iter().filter(|&&p| p == next).count();
        }
    }
    Some(order)
}

async fn load_graph(
    conn: &mut PgConnection,
    workflow: &str,
    version: i32,
) -> Result<Graph, AdminError> {
    let text: Option<(String,)> = sqlx::query_as(
        "SELECT definition::text FROM pgflow.workflows WHERE name = $1 AND version = $2",
    )
    .bind(workflow)
    .bind(version)
    .fetch_optional(&mut *conn)
    .await?;
    let (text,) = text.ok_or_else(|| AdminError::MissingDefinition {
        workflow: workflow.to_owned(),
        version,
    })?;
    let invalid = |message: String| AdminError::Definition {
        workflow: workflow.to_owned(),
        version,
        message,
    };
    let def: StoredDef = serde_json::from_str(&text)
        .map_err(|e| invalid(format!("the stored definition is not readable: {e}")))?;
    Graph::new(def).map_err(invalid)
}

fn parse_errors(json: Option<&str>) -> Vec<AttemptFailure> {
    json.and_then(|j| serde_json::from_str(j).ok())
        .unwrap_or_default()
}

fn millis_between(from: DateTime<Utc>, to: DateTime<Utc>) -> i64 {
    (to - from).num_milliseconds().max(0)
}

/// Run `id` with each of its steps, in graph order.
///
/// # Errors
///
/// [`Error::RunNotFound`] (inside [`AdminError::Runtime`]);
/// [`AdminError::MissingDefinition`] / [`AdminError::Definition`] when the stored
/// step table is missing or unreadable; database errors.
pub async fn run_detail(pool: &PgPool, id: RunId) -> Result<RunDetail, AdminError> {
    // One snapshot for the run, its steps and its tasks.
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let sql = format!(
        "SELECT {RUN_COLUMNS}, input::text, output::text, now() FROM pgflow.runs WHERE id = $1"
    );
    type DetailRow = (RunRow, String, Option<String>, DateTime<Utc>);
    let row: Option<sqlx::postgres::PgRow> = sqlx::query(&sql)
        .bind(id.0)
        .fetch_optional(&mut *tx)
        .await?;
    let row = row.ok_or(Error::RunNotFound(id))?;
    let (run, input, output, now): DetailRow = {
        use sqlx::Row;
        (
            (
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
                row.try_get(4)?,
                row.try_get(5)?,
                row.try_get(6)?,
                row.try_get(7)?,
                row.try_get(8)?,
                row.try_get(9)?,
                row.try_get(10)?,
            ),
            row.try_get(11)?,
            row.try_get(12)?,
            row.try_get(13)?,
        )
    };
    let error_json = run.10.clone();
    let run = RunSummary::from_row(run);
    let graph = load_graph(&mut tx, &run.workflow, run.version).await?;

    type StateRow = (
        i16,
        String,
        i32,
        Option<String>,
        Option<String>,
        Option<DateTime<Utc>>,
    );
    let states: Vec<StateRow> = sqlx::query_as(
        "SELECT step, status, attempts, errors::text, instance_id, completed_at
         FROM pgflow.step_states WHERE run_id = $1",
    )
    .bind(id.0)
    .fetch_all(&mut *tx)
    .await?;
    let states: HashMap<usize, StateRow> = states
        .into_iter()
        .filter_map(|s| usize::try_from(s.0).ok().map(|i| (i, s)))
        .collect();

    type TaskRow = (i16, i32, Option<String>, Option<String>, DateTime<Utc>);
    let tasks: Vec<TaskRow> = sqlx::query_as(
        "SELECT step, attempt, claimed_by, errors::text, created_at
         FROM pgflow.tasks WHERE run_id = $1 ORDER BY id",
    )
    .bind(id.0)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut tasks_of: HashMap<usize, Vec<TaskRow>> = HashMap::new();
    for t in tasks {
        if let Ok(i) = usize::try_from(t.0) {
            tasks_of.entry(i).or_default().push(t);
        }
    }

    let run_start = run.run_at.max(run.created_at);
    let succeeded = run.status == "succeeded";
    let running = run.status == "running";
    let mut steps = Vec::with_capacity(graph.order.len());
    for &i in &graph.order {
        let def = &graph.def.steps[i];
        // When the step became ready: its last parent's completion, or the run start.
        let ready_at = graph.parents[i].iter().try_fold(run_start, |at, p| {
            states
                .get(p)
                .filter(|s| s.1 == "completed")
                .and_then(|s| s.5)
                .map(|c| at.max(c))
        });
        let mut detail = StepDetail {
            index: i,
            name: def.name.clone(),
            parents: graph.parents[i]
                .iter()
                .map(|&p| graph.def.steps[p].name.clone())
                .collect(),
            status: StepStatus::NotStarted,
            attempts: None,
            duration_ms: None,
            completed_at: None,
            instance_id: None,
            error: None,
            errors: Vec::new(),
        };
        let state = states.get(&i).filter(|s| s.1 != "waiting");
        let tasks = tasks_of.get(&i);
        if let Some(s) = state {
            detail.status = match s.1.as_str() {
                "completed" => StepStatus::Completed,
                "failed" => StepStatus::Failed,
                other => StepStatus::Other(other.to_owned()),
            };
            detail.attempts = Some(s.2);
            detail.errors = parse_errors(s.3.as_deref());
            detail.instance_id = s.4.clone();
            detail.completed_at = s.5;
            detail.duration_ms = ready_at.zip(s.5).map(|(a, b)| millis_between(a, b));
        } else if succeeded && !graph.has_children[i] {
            // The last step's output is the run's output; it keeps no step row.
            detail.status = StepStatus::Completed;
            detail.completed_at = run.completed_at;
            detail.instance_id = run.instance_id.clone();
            detail.duration_ms = ready_at
                .zip(run.completed_at)
                .map(|(a, b)| millis_between(a, b));
        } else if let Some(ts) = tasks.filter(|t| !t.is_empty()) {
            let claimed = ts.iter().find(|t| t.2.is_some());
            detail.status = if claimed.is_some() {
                StepStatus::Running
            } else {
                StepStatus::Queued
            };
            let current = claimed.or_else(|| ts.last());
            if let Some(t) = current {
                // A queued task's attempt is the one it will make next.
                detail.attempts = Some(if claimed.is_some() {
                    t.1
                } else {
                    t.1.saturating_sub(1)
                });
                detail.errors = parse_errors(t.3.as_deref());
                detail.instance_id = t.2.clone();
                detail.duration_ms = ts
                    .iter()
                    .map(|t| t.4)
                    .min()
                    .map(|enqueued| millis_between(enqueued, now));
            }
        } else if running {
            detail.status = StepStatus::Waiting;
        }
        detail.error = detail.errors.last().map(ToString::to_string);
        steps.push(detail);
    }
    Ok(RunDetail {
        input: serde_json::from_str(&input).unwrap_or(serde_json::Value::String(input)),
        output: output.map(|o| serde_json::from_str(&o).unwrap_or(serde_json::Value::String(o))),
        error_detail: error_json
            .map(|e| serde_json::from_str(&e).unwrap_or(serde_json::Value::String(e))),
        run,
        steps,
    })
}

// ---------------------------------------------------------------------------------
// results

/// The three monitoring aggregates over `pgflow.job_results`.
#[derive(Debug, Clone, Serialize)]
pub struct Results {
    /// The window: runs finished in the last this many seconds.
    pub since_secs: u64,
    /// The workflow filter, if any.
    pub workflow: Option<String>,
    /// Per workflow: count, success rate, average and p95 duration, total cost.
    pub workflows: Vec<WorkflowResult>,
    /// Per instance that finished runs: how the work was distributed.
    pub instances: Vec<InstanceResult>,
    /// Per workflow and status (`success`/`failure`): count, average duration, cost.
    pub statuses: Vec<StatusResult>,
}

/// Finished runs of one workflow.
#[derive(Debug, Clone, Serialize)]
pub struct WorkflowResult {
    /// The workflow.
    pub workflow: String,
    /// Runs finished.
    pub count: i64,
    /// Of which succeeded.
    pub succeeded: i64,
    /// succeeded / count, 0 to 1.
    pub success_rate: f64,
    /// Average duration (ms).
    pub avg_ms: f64,
    /// 95th percentile duration (ms).
    pub p95_ms: f64,
    /// Total cost.
    pub total_cost_cents: i64,
}

/// Finished runs per finishing instance.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceResult {
    /// The instance (none for runs no instance finished).
    pub instance_id: Option<String>,
    /// Runs finished.
    pub count: i64,
    /// Of which succeeded.
    pub succeeded: i64,
    /// Of which failed.
    pub failed: i64,
    /// Its share of all runs in the window, 0 to 1.
    pub share: f64,
}

/// Finished runs per workflow and status.
#[derive(Debug, Clone, Serialize)]
pub struct StatusResult {
    /// The workflow.
    pub workflow: String,
    /// `success` or `failure`.
    pub status: String,
    /// Runs.
    pub count: i64,
    /// Average duration (ms).
    pub avg_ms: f64,
    /// Total cost.
    pub total_cost_cents: i64,
}

/// Aggregates over runs that finished within `since` of now (database clock),
/// optionally of one workflow. These scan `pgflow.runs` through the view.
///
/// # Errors
///
/// [`AdminError::NotMigrated`]; database errors.
pub async fn results(
    pool: &PgPool,
    since: Duration,
    workflow: Option<&str>,
) -> Result<Results, AdminError> {
    let secs = since.as_secs_f64();
    const WINDOW: &str = "completed_at >= now() - $1::float8 * interval '1 second'
                          AND ($2::text IS NULL OR workflow = $2)";
    type WorkflowRow = (String, i64, i64, Option<f64>, Option<f64>, i64);
    let rows: Vec<WorkflowRow> = sqlx::query_as(&format!(
        "SELECT workflow, count(*), count(*) FILTER (WHERE status = 'success'),
                avg(duration_ms)::float8,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms),
                COALESCE(sum(cost_cents), 0)::bigint
         FROM pgflow.job_results WHERE {WINDOW}
         GROUP BY workflow ORDER BY workflow"
    ))
    .bind(secs)
    .bind(workflow)
    .fetch_all(pool)
    .await?;
    let workflows = rows
        .into_iter()
        .map(|r| WorkflowResult {
            workflow: r.0,
            count: r.1,
            succeeded: r.2,
            success_rate: ratio(r.2, r.1),
            avg_ms: r.3.unwrap_or(0.0),
            p95_ms: r.4.unwrap_or(0.0),
            total_cost_cents: r.5,
        })
        .collect();

    let rows: Vec<(Option<String>, i64, i64, i64)> = sqlx::query_as(&format!(
        "SELECT instance_id, count(*),
                count(*) FILTER (WHERE status = 'success'),
                count(*) FILTER (WHERE status = 'failure')
         FROM pgflow.job_results WHERE {WINDOW}
         GROUP BY instance_id ORDER BY count(*) DESC, instance_id"
    ))
    .bind(secs)
    .bind(workflow)
    .fetch_all(pool)
    .await?;
    let total: i64 = rows.iter().map(|r| r.1).sum();
    let instances = rows
        .into_iter()
        .map(|r| InstanceResult {
            share: ratio(r.1, total),
            instance_id: r.0,
            count: r.1,
            succeeded: r.2,
            failed: r.3,
        })
        .collect();

    let rows: Vec<(String, String, i64, Option<f64>, i64)> = sqlx::query_as(&format!(
        "SELECT workflow, status, count(*), avg(duration_ms)::float8,
                COALESCE(sum(cost_cents), 0)::bigint
         FROM pgflow.job_results WHERE {WINDOW}
         GROUP BY workflow, status ORDER BY workflow, status DESC"
    ))
    .bind(secs)
    .bind(workflow)
    .fetch_all(pool)
    .await?;
    let statuses = rows
        .into_iter()
        .map(|r| StatusResult {
            workflow: r.0,
            status: r.1,
            count: r.2,
            avg_ms: r.3.unwrap_or(0.0),
            total_cost_cents: r.4,
        })
        .collect();
    Ok(Results {
        since_secs: since.as_secs(),
        workflow: workflow.map(str::to_owned),
        workflows,
        instances,
        statuses,
    })
}

fn ratio(part: i64, whole: i64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// Parses a duration such as `30s`, `15m`, `1h`, `7d`, `2w` or `1h30m`.
///
/// ```
/// use std::time::Duration;
/// use pgflow_runtime::admin::parse_duration;
/// assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
/// assert_eq!(parse_duration("7d").unwrap(), Duration::from_secs(7 * 86400));
/// assert!(parse_duration("soon").is_err());
/// ```
///
/// # Errors
///
/// [`AdminError::InvalidDuration`] for anything else (a unit is required).
pub fn parse_duration(input: &str) -> Result<Duration, AdminError> {
    let invalid = || AdminError::InvalidDuration {
        input: input.to_owned(),
    };
    let s = input.trim();
    if s.is_empty() {
        return Err(invalid());
    }
    let mut total: u64 = 0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(invalid)?;
        if digits == 0 {
            return Err(invalid());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit: u64 = match &rest[..unit_len] {
            "s" => 1,
            "m" => 60,
            "h" => 3_600,
            "d" => 86_400,
            "w" => 604_800,
            _ => return Err(invalid()),
        };
        rest = &rest[unit_len..];
        total = n
            .checked_mul(unit)
            .and_then(|x| total.checked_add(x))
            .ok_or_else(invalid)?;
    }
    Ok(Duration::from_secs(total))
}

// ---------------------------------------------------------------------------------
// retry and cancel

/// What [`retry`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RetryReport {
    /// The run, running again.
    pub id: i64,
    /// Its workflow.
    pub workflow: String,
    /// Steps whose stored outputs are reused (not run again).
    pub reused: Vec<String>,
    /// Failed steps whose state was cleared.
    pub cleared: Vec<String>,
    /// Steps enqueued now (their parents are all completed).
    pub enqueued: Vec<String>,
}

/// Re-runs a failed run from its failed steps, reusing every completed step's
/// stored output.
///
/// In one transaction, holding the run's row lock: checks that the run is
/// `failed`; deletes every task row the run still has (an attempt still executing
/// somewhere then has its completion rejected by the claim fence, so nothing it
/// does applies; the step is enqueued afresh instead); deletes the failed step
/// states; re-creates the join counters of the steps not completed (parents still
/// to complete); enqueues every step that is not completed and whose parents all
/// are, with a fresh attempt budget; sets the run back to `running` with no error
/// and no completion time. Its cost so far is kept. Workers are notified at commit.
///
/// # Errors
///
/// [`Error::RunNotFound`] (inside [`AdminError::Runtime`]); [`AdminError::NotFailed`]
/// for a run that is running, succeeded or cancelled;
/// [`AdminError::MissingDefinition`]; [`AdminError::Definition`] for a step table
/// retry cannot rebuild (a step kind other than `single`, an unknown step state);
/// database errors.
pub async fn retry(pool: &PgPool, id: RunId) -> Result<RetryReport, AdminError> {
    let mut tx = pool.begin().await?;
    let row: Option<(String, String, i32, i16)> = sqlx::query_as(
        "SELECT status, workflow, version, priority FROM pgflow.runs WHERE id = $1 FOR UPDATE",
    )
    .bind(id.0)
    .fetch_optional(&mut *tx)
    .await?;
    let (status, workflow, version, run_priority) = row.ok_or(Error::RunNotFound(id))?;
    if status != "failed" {
        return Err(AdminError::NotFailed { id, status });
    }
    let graph = load_graph(&mut tx, &workflow, version).await?;
    let refuse = |message: String| AdminError::Definition {
        workflow: workflow.clone(),
        version,
        message,
    };
    if let Some(s) = graph.def.steps.iter().find(|s| s.kind != "single") {
        return Err(refuse(format!(
            "step `{}` is a `{}` step; retry can only rebuild runs of single steps",
            s.name, s.kind
        )));
    }
    let n = graph.def.steps.len();

    // Take every task of the run: this waits for a flush that holds one, and makes
    // any later completion of an attempt still executing fail its fence.
    sqlx::query("DELETE FROM pgflow.tasks WHERE run_id = $1")
        .bind(id.0)
        .execute(&mut *tx)
        .await?;
    let cleared: Vec<(i16,)> = sqlx::query_as(
        "DELETE FROM pgflow.step_states WHERE run_id = $1 AND status = 'failed' RETURNING step",
    )
    .bind(id.0)
    .fetch_all(&mut *tx)
    .await?;
    let states: Vec<(i16, String)> =
        sqlx::query_as("SELECT step, status FROM pgflow.step_states WHERE run_id = $1")
            .bind(id.0)
            .fetch_all(&mut *tx)
            .await?;
    let mut completed = vec![false; n];
    for (step, state) in &states {
        let i = usize::try_from(*step)
            .ok()
            .filter(|&i| i < n)
            .ok_or_else(|| refuse(format!("run {id} has a state for unknown step {step}")))?;
        match state.as_str() {
            "completed" => completed[i] = true,
            "waiting" => {}
            other => {
                return Err(refuse(format!(
                    "step `{}` of run {id} is in state `{other}`, which retry does not know",
                    graph.def.steps[i].name
                )));
            }
        }
    }

    let mut join_steps: Vec<i16> = Vec::new();
    let mut join_remaining: Vec<i32> = Vec::new();
    let mut ready: Vec<usize> = Vec::new();
    for &i in &graph.order {
        if completed[i] {
            continue;
        }
        let parents = &graph.parents[i];
        let left = parents.iter().filter(|&&p| !completed[p]).count();
        if parents.len() > 1 {
            join_steps.push(step_i16(i));
            join_remaining.push(i32::try_from(left).unwrap_or(i32::MAX));
        }
        if left == 0 {
            ready.push(i);
        }
    }
    if ready.is_empty() {
        return Err(refuse(format!(
            "run {id} has no step left to run; it cannot be retried"
        )));
    }
    if !join_steps.is_empty() {
        sqlx::query(
            "INSERT INTO pgflow.step_states (run_id, step, status, remaining)
             SELECT $1, j.step, 'waiting', j.remaining
             FROM unnest($2::smallint[], $3::int[]) AS j(step, remaining)
             ON CONFLICT (run_id, step) DO UPDATE SET remaining = EXCLUDED.remaining",
        )
        .bind(id.0)
        .bind(&join_steps)
        .bind(&join_remaining)
        .execute(&mut *tx)
        .await?;
    }
    let steps: Vec<i16> = ready.iter().map(|&i| step_i16(i)).collect();
    let priorities: Vec<i16> = ready.iter().map(|&i| graph.def.steps[i].priority).collect();
    let attempts: Vec<i32> = ready
        .iter()
        .map(|&i| i32::try_from(graph.def.steps[i].max_attempts.max(1)).unwrap_or(i32::MAX))
        .collect();
    sqlx::query(
        "INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, priority, max_attempts, run_at)
         SELECT $1, u.step, $2, $3, $4,
                LEAST(GREATEST(u.priority::int + $5::int, -32768), 32767)::smallint,
                u.max_attempts, now()
         FROM unnest($6::smallint[], $7::smallint[], $8::int[]) AS u(step, priority, max_attempts)",
    )
    .bind(id.0)
    .bind(&workflow)
    .bind(version)
    .bind(&graph.def.queue)
    .bind(i32::from(run_priority))
    .bind(&steps)
    .bind(&priorities)
    .bind(&attempts)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "UPDATE pgflow.runs SET status = 'running', error = NULL, completed_at = NULL,
                instance_id = NULL
         WHERE id = $1",
    )
    .bind(id.0)
    .execute(&mut *tx)
    .await?;
    // Delivered at commit: idle workers of the queue claim at once.
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(worker::CHANNEL)
        .bind(&graph.def.queue)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;

    let name = |i: usize| graph.def.steps[i].name.clone();
    Ok(RetryReport {
        id: id.0,
        reused: graph
            .order
            .iter()
            .filter(|&&i| completed[i])
            .map(|&i| name(i))
            .collect(),
        cleared: cleared
            .iter()
            .filter_map(|(s,)| usize::try_from(*s).ok().filter(|&i| i < n))
            .map(name)
            .collect(),
        enqueued: ready.into_iter().map(name).collect(),
        workflow,
    })
}

fn step_i16(i: usize) -> i16 {
    i16::try_from(i).unwrap_or(i16::MAX)
}

/// What [`cancel`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CancelReport {
    /// The run.
    pub id: i64,
    /// False when the run was already cancelled.
    pub cancelled: bool,
}

/// Cancels a running run: it is marked `cancelled` and its queued tasks are
/// deleted, so no further step starts. Steps executing right now finish (a runtime
/// in another process is not interrupted) and their results are discarded.
/// Cancelling a cancelled run changes nothing.
///
/// # Errors
///
/// [`Error::RunNotFound`] (inside [`AdminError::Runtime`]); [`AdminError::NotRunning`]
/// for a run that succeeded or failed; database errors.
pub async fn cancel(pool: &PgPool, id: RunId) -> Result<CancelReport, AdminError> {
    let (status, cancelled) = crate::queue::cancel(pool, id.0)
        .await?
        .ok_or(Error::RunNotFound(id))?;
    match status.as_str() {
        "running" | "cancelled" => Ok(CancelReport {
            id: id.0,
            cancelled,
        }),
        _ => Err(AdminError::NotRunning { id, status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("45s").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(
            parse_duration("2w").unwrap(),
            Duration::from_secs(1_209_600)
        );
        assert_eq!(
            parse_duration("1d12h").unwrap(),
            Duration::from_secs(129_600)
        );
        for bad in [
            "",
            "10",
            "h",
            "1x",
            "1h30",
            "-1h",
            "1.5h",
            "99999999999999999999w",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn graph_order_puts_parents_first_then_declaration_order() {
        // 0 <- 2, 1 <- 0 and 2: declared out of order.
        let parents = vec![vec![2], vec![0, 2], vec![]];
        assert_eq!(topological_order(&parents), Some(vec![2, 0, 1]));
        let diamond = vec![vec![], vec![0], vec![0], vec![1, 2]];
        assert_eq!(topological_order(&diamond), Some(vec![0, 1, 2, 3]));
        assert_eq!(topological_order(&[vec![1], vec![0]]), None);
    }

    #[test]
    fn stored_definitions_resolve_parents_and_tolerate_unknown_keys() {
        let def: StoredDef = serde_json::from_value(serde_json::json!({
            "name": "w", "version": 1, "queue": "llm", "future": true,
            "steps": [
                {"name": "a", "kind": "single", "parents": [], "max_attempts": 5, "priority": 2},
                {"name": "b", "parents": ["a"]},
            ]
        }))
        .unwrap();
        let g = Graph::new(def).unwrap();
        assert_eq!(g.def.queue, "llm");
        assert_eq!(g.parents, vec![vec![], vec![0]]);
        assert_eq!(g.has_children, vec![true, false]);
        assert_eq!(g.def.steps[1].max_attempts, 3);
        let bad: StoredDef = serde_json::from_value(serde_json::json!({
            "steps": [{"name": "a", "parents": ["zz"]}]
        }))
        .unwrap();
        assert!(Graph::new(bad).unwrap_err().contains("unknown parent `zz`"));
    }

    #[test]
    fn step_status_names() {
        assert_eq!(StepStatus::NotStarted.to_string(), "not started");
        assert_eq!(
            serde_json::to_string(&StepStatus::NotStarted).unwrap(),
            "\"not_started\""
        );
        assert_eq!(StepStatus::Other("skipped".into()).to_string(), "skipped");
    }
}
