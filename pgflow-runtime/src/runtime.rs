//! [`Runtime`]: builds from a [`RuntimeBuilder`], migrates, registers the linked
//! workflows, runs the workers, and starts, cancels and reads runs.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgflow::{CancelToken, Data, RunError, RunId, Workflow, WorkflowDef};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use crate::catalog::Catalog;
use crate::config::Config;
use crate::definitions::{self, version_i32};
use crate::instances::{self, InstanceInfo};
use crate::queue::{Completion, Msg};
use crate::{Error, MIGRATOR, mask_password, worker};

/// Configures and starts a [`Runtime`].
///
/// ```no_run
/// # async fn demo() -> Result<(), pgflow_runtime::Error> {
/// let rt = pgflow_runtime::Runtime::builder()
///     .database_url("postgres://postgres@127.0.0.1:5432/postgres")
///     .queue("default", 16)
///     .queue("llm", 4)
///     .instance_id("instance_a")
///     .data(String::from("shared state, read with ctx.data::<String>()"))
///     .start()
///     .await?;
/// rt.shutdown().await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Default)]
pub struct RuntimeBuilder {
    url: Option<String>,
    pool: Option<PgPool>,
    queues: Vec<(String, usize)>,
    instance_id: Option<String>,
    data: Data,
    config: Config,
}

impl RuntimeBuilder {
    /// Connects to this URL (the password is never logged or shown in errors).
    pub fn database_url(mut self, url: impl Into<String>) -> Self {
        self.url = Some(url.into());
        self
    }

    /// Uses this pool instead of connecting.
    pub fn pool(mut self, pool: PgPool) -> Self {
        self.pool = Some(pool);
        self
    }

    /// Serves `queue` with up to `concurrency` steps at once. A runtime with no
    /// queue only starts and reads runs (a producer).
    pub fn queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        self.queues.push((queue.into(), concurrency));
        self
    }

    /// This instance's id (default: `$INSTANCE_ID`, else `host-pid`).
    pub fn instance_id(mut self, id: impl Into<String>) -> Self {
        self.instance_id = Some(id.into());
        self
    }

    /// Shared state that steps read with `ctx.data::<T>()`.
    pub fn data<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.data.insert(value);
        self
    }

    /// How often idle workers poll for due tasks (default 250 ms); notifications
    /// wake them sooner.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.poll_interval = d;
        self
    }

    /// The most tasks one claim takes (default 500).
    pub fn claim_batch(mut self, n: usize) -> Self {
        self.config.claim_batch = n.max(1);
        self
    }

    /// The most completions one flush applies (default 2,000).
    pub fn flush_batch(mut self, n: usize) -> Self {
        self.config.flush_batch = n.max(1);
        self
    }

    /// Added to each step's timeout to get its lease (default 30 s).
    pub fn lease_grace(mut self, d: Duration) -> Self {
        self.config.lease_grace = d;
        self
    }

    /// How often this instance heartbeats into `pgflow.instances` (default 5 s).
    pub fn heartbeat_interval(mut self, d: Duration) -> Self {
        self.config.heartbeat_interval = d;
        self
    }

    /// An instance whose last heartbeat is older than this is marked offline and its
    /// claimed tasks return to the queue (default 30 s). Keep it several heartbeat
    /// intervals long.
    pub fn offline_after(mut self, d: Duration) -> Self {
        self.config.offline_after = d;
        self
    }

    /// How often expired leases and dead instances are looked for (default 1 s).
    pub fn rescue_interval(mut self, d: Duration) -> Self {
        self.config.rescue_interval = d;
        self
    }

    /// How long `shutdown` lets in-flight steps finish (default 30 s).
    pub fn shutdown_grace(mut self, d: Duration) -> Self {
        self.config.shutdown_grace = d;
        self
    }

    /// Whether `start` applies the migrations (default true).
    pub fn migrate(mut self, on: bool) -> Self {
        self.config.migrate = on;
        self
    }

    /// How often dead rows of the pgflow tables are checked and vacuumed (default
    /// every 2 s; `None` leaves it to the server's autovacuum).
    pub fn vacuum_interval(mut self, every: Option<Duration>) -> Self {
        self.config.vacuum_interval = every;
        self
    }

    /// Pool size when the runtime connects itself (default 10).
    pub fn max_connections(mut self, n: u32) -> Self {
        self.config.max_connections = n.max(2);
        self
    }

    /// Connects, migrates, registers every linked workflow and starts the workers.
    ///
    /// # Errors
    ///
    /// [`Error::Connect`] when the database cannot be reached; [`Error::Migrate`];
    /// [`Error::Registry`] for two workflows with one name and version;
    /// [`Error::DefinitionChanged`] for a changed definition under an old version.
    pub async fn start(self) -> Result<Runtime, Error> {
        let pool = match self.pool {
            Some(p) => p,
            None => {
                let url = self
                    .url
                    .or_else(|| std::env::var("DATABASE_URL").ok())
                    .ok_or_else(|| {
                        Error::Config(
                            "no database: call .database_url(..) or .pool(..), or set DATABASE_URL"
                                .into(),
                        )
                    })?;
                let opts: PgConnectOptions = url.parse().map_err(|e| Error::Connect {
                    url: mask_password(&url),
                    source: e,
                })?;
                PgPoolOptions::new()
                    .max_connections(self.config.max_connections)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect_with(opts)
                    .await
                    .map_err(|e| Error::Connect {
                        url: mask_password(&url),
                        source: e,
                    })?
            }
        };
        for (q, c) in &self.queues {
            if *c == 0 || q.is_empty() {
                return Err(Error::Config(format!(
                    "queue {q:?} needs a name and a concurrency of at least 1"
                )));
            }
        }
        if self.config.migrate {
            MIGRATOR.run(&pool).await?;
        }
        let registry = pgflow::registry()?;
        let defs: Vec<&'static WorkflowDef> = registry.workflows().to_vec();
        definitions::register(&pool, &defs).await?;
        let instance_id = self.instance_id.unwrap_or_else(default_instance_id);
        if instance_id.is_empty() {
            return Err(Error::Config("the instance id is empty".into()));
        }
        let catalog = Catalog::new(&defs, self.config.lease_grace);
        instances::register(&pool, &instance_id, &self.queues, self.config.offline_after).await?;

        let (tx, rx) = mpsc::unbounded_channel();
        let (shutdown, _) = watch::channel(false);
        let mut wakers = HashMap::new();
        for (q, _) in &self.queues {
            wakers.insert(q.clone(), Arc::new(Notify::new()));
        }
        let inner = Arc::new(Inner {
            pool,
            instance_id,
            catalog,
            data: Arc::new(self.data),
            config: self.config,
            queues: self.queues,
            wakers,
            completions: tx,
            shutdown,
            waiters: Mutex::new(HashMap::new()),
            cancels: Mutex::new(HashMap::new()),
            in_flight: Mutex::new(HashMap::new()),
            tasks: Mutex::new(None),
            stats: StatsCounters::default(),
            executing: AtomicUsize::new(0),
        });
        // Claims still held under this id belong to a predecessor that is gone
        // (a dead process whose id we took over, or one that shut down with claims
        // left): give them back before claiming anything.
        while worker::rescue_once(&inner, Some(&inner.instance_id)).await? > 0 {}
        let mut handles = vec![
            tokio::spawn(worker::flusher(Arc::clone(&inner), rx)),
            tokio::spawn(worker::heartbeat(Arc::clone(&inner))),
        ];
        let mut claimers = Vec::new();
        if !inner.queues.is_empty() {
            handles.push(tokio::spawn(worker::listener(Arc::clone(&inner))));
            handles.push(tokio::spawn(worker::rescuer(Arc::clone(&inner))));
            handles.push(tokio::spawn(worker::maintainer(Arc::clone(&inner))));
            for (q, c) in &inner.queues {
                claimers.push(tokio::spawn(worker::claimer(
                    Arc::clone(&inner),
                    q.clone(),
                    *c,
                )));
            }
        }
        if let Ok(mut t) = inner.tasks.lock() {
            *t = Some(Tasks {
                claimers,
                others: handles,
            });
        }
        Ok(Runtime { inner })
    }
}

fn default_instance_id() -> String {
    std::env::var("INSTANCE_ID")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()))
}

pub(crate) fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

struct Tasks {
    claimers: Vec<JoinHandle<()>>,
    others: Vec<JoinHandle<()>>,
}

/// A claim being executed here, keyed by (task id, claim token).
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    pub(crate) run_id: i64,
    pub(crate) step: i16,
    pub(crate) workflow: String,
    pub(crate) version: i32,
}

pub(crate) struct Inner {
    pub(crate) pool: PgPool,
    pub(crate) instance_id: String,
    pub(crate) catalog: Catalog,
    pub(crate) data: Arc<Data>,
    pub(crate) config: Config,
    pub(crate) queues: Vec<(String, usize)>,
    wakers: HashMap<String, Arc<Notify>>,
    pub(crate) completions: mpsc::UnboundedSender<Msg>,
    shutdown: watch::Sender<bool>,
    waiters: Mutex<HashMap<i64, Vec<oneshot::Sender<()>>>>,
    cancels: Mutex<HashMap<i64, (CancelToken, usize)>>,
    /// Claims being executed: (task id, token) -> (run, step, workflow, version).
    pub(crate) in_flight: Mutex<HashMap<(i64, i64), InFlight>>,
    /// The loops to stop at shutdown; taken by the first `shutdown`.
    tasks: Mutex<Option<Tasks>>,
    pub(crate) stats: StatsCounters,
    /// Steps executing now (the load reported in heartbeats).
    pub(crate) executing: AtomicUsize,
}

/// Counters the workers keep (see [`Runtime::stats`]).
#[derive(Debug, Default)]
pub(crate) struct StatsCounters {
    pub(crate) claims: AtomicU64,
    pub(crate) tasks_claimed: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) completions: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) runs_finished: AtomicU64,
}

/// What this runtime has done since it started: a cheap snapshot for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Claim statements that returned at least one task.
    pub claims: u64,
    /// Tasks claimed.
    pub tasks_claimed: u64,
    /// Flush transactions committed.
    pub flushes: u64,
    /// Completions applied (step attempts finished here).
    pub completions: u64,
    /// Completions rejected because their claim was lost.
    pub rejected: u64,
    /// Runs this runtime finished (succeeded or failed).
    pub runs_finished: u64,
}

impl Inner {
    pub(crate) fn shutdown_rx(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    pub(crate) fn waker(&self, queue: &str) -> Arc<Notify> {
        self.wakers
            .get(queue)
            .cloned()
            .unwrap_or_else(|| Arc::new(Notify::new()))
    }

    pub(crate) fn wake_queue(&self, queue: &str) {
        if let Some(w) = self.wakers.get(queue) {
            w.notify_one();
        }
    }

    pub(crate) fn wake_all(&self) {
        for w in self.wakers.values() {
            w.notify_one();
        }
    }

    pub(crate) fn wake_waiters(&self, runs: &[i64]) {
        if runs.is_empty() {
            return;
        }
        if let Ok(mut w) = self.waiters.lock() {
            for id in runs {
                for tx in w.remove(id).into_iter().flatten() {
                    let _ = tx.send(());
                }
            }
        }
    }

    fn register_waiter(&self, run: i64) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut w) = self.waiters.lock() {
            w.entry(run).or_default().push(tx);
        }
        rx
    }

    /// The cancel token shared by this run's steps executing here.
    pub(crate) fn cancel_token(&self, run: i64) -> CancelToken {
        let Ok(mut c) = self.cancels.lock() else {
            return CancelToken::new();
        };
        let e = c.entry(run).or_insert_with(|| (CancelToken::new(), 0));
        e.1 += 1;
        e.0.clone()
    }

    pub(crate) fn release_cancel_token(&self, run: i64) {
        if let Ok(mut c) = self.cancels.lock() {
            if let Some(e) = c.get_mut(&run) {
                e.1 = e.1.saturating_sub(1);
                if e.1 == 0 {
                    c.remove(&run);
                }
            }
        }
    }

    fn cancel_local(&self, run: i64) {
        if let Ok(c) = self.cancels.lock() {
            if let Some((t, _)) = c.get(&run) {
                t.cancel();
            }
        }
    }

    fn flow(&self, def: &'static WorkflowDef) -> Result<&crate::catalog::Flow, Error> {
        self.catalog
            .flow_of(def)
            .ok_or_else(|| Error::UnknownWorkflow {
                name: def.name().to_owned(),
                version: Some(def.version()),
                registered: self.registered_names(),
            })
    }

    fn registered_names(&self) -> String {
        pgflow::registry()
            .map(|r| {
                r.workflows()
                    .iter()
                    .map(|d| format!("{} v{}", d.name(), d.version()))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    }
}

/// Options of one start: idempotency key, delayed start, priority.
///
/// ```
/// use pgflow_runtime::StartOptions;
/// let opts = StartOptions::default()
///     .idempotency_key("order-42")
///     .priority(5)
///     .run_at(chrono::Utc::now() + chrono::Duration::seconds(30));
/// ```
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    idempotency_key: Option<String>,
    run_at: Option<DateTime<Utc>>,
    priority: i16,
}

impl StartOptions {
    /// A second start with the same key (for the same workflow) returns the first run.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Runs no earlier than `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }

    /// Added to every step's priority (higher runs first).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }
}

/// A started run; [`RunHandle::wait`] returns its output.
#[derive(Debug)]
pub struct RunHandle<O> {
    id: RunId,
    created: bool,
    rt: Runtime,
    _output: PhantomData<fn() -> O>,
}

impl<O> Clone for RunHandle<O> {
    fn clone(&self) -> Self {
        Self {
            id: self.id,
            created: self.created,
            rt: self.rt.clone(),
            _output: PhantomData,
        }
    }
}

impl<O: serde::de::DeserializeOwned> RunHandle<O> {
    /// The run's id.
    pub fn id(&self) -> RunId {
        self.id
    }

    /// False when an idempotency key matched an earlier run, which this handle is.
    pub fn created(&self) -> bool {
        self.created
    }

    /// Waits for the run to finish and returns its output.
    ///
    /// # Errors
    ///
    /// [`Error::Run`] when the run failed or was cancelled; [`Error::InvalidInput`]
    /// when the stored output does not deserialize; database errors.
    pub async fn wait(&self) -> Result<O, Error> {
        let mut poll = Duration::from_millis(20);
        loop {
            let done = self.rt.inner.register_waiter(self.id.0);
            if let (workflow, Some(outcome)) = self.rt.outcome::<O>(self.id).await? {
                return outcome.into_result(&workflow);
            }
            let _ = tokio::time::timeout(poll, done).await;
            poll = (poll * 2).min(Duration::from_secs(1));
        }
    }
}

/// Where a run stands.
#[derive(Debug)]
pub enum RunOutcome<O> {
    /// Not finished.
    Running,
    /// Finished with this output.
    Succeeded(O),
    /// Failed; the error has the failing step's attempt history.
    Failed(RunError),
    /// Cancelled.
    Cancelled,
}

impl<O> RunOutcome<O> {
    fn into_result(self, workflow: &str) -> Result<O, Error> {
        match self {
            Self::Succeeded(o) => Ok(o),
            Self::Failed(e) => Err(Error::Run(e)),
            Self::Cancelled | Self::Running => Err(Error::Run(RunError::Cancelled {
                workflow: workflow.to_owned(),
            })),
        }
    }
}

/// Aggregates over finished runs of a workflow (see [`Runtime::summary`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Finished runs (succeeded or failed).
    pub count: i64,
    /// Succeeded / finished, 0 to 1 (0 when there are none).
    pub success_rate: f64,
    /// Median duration, ms.
    pub p50_ms: f64,
    /// 95th percentile duration, ms.
    pub p95_ms: f64,
    /// Sum of `cost_cents`.
    pub total_cost_cents: i64,
}

/// A running pgflow engine; cheap to clone. See the crate docs.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("instance_id", &self.inner.instance_id)
            .field("queues", &self.inner.queues)
            .finish_non_exhaustive()
    }
}

const START_SQL: &str = "
WITH u AS (
    SELECT * FROM unnest($3::text[], $4::smallint[], $5::timestamptz[], $6::text[])
        WITH ORDINALITY AS u(input, priority, run_at, key, ord)
), r AS (
    INSERT INTO pgflow.runs (workflow, version, input, priority, run_at, idempotency_key)
    SELECT $1, $2, u.input::jsonb, u.priority, COALESCE(u.run_at, now()), u.key
    FROM u ORDER BY u.ord
    ON CONFLICT (workflow, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING
    RETURNING id, priority, run_at, idempotency_key
), t AS (
    INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, priority, max_attempts, run_at)
    SELECT r.id, s.step, $1, $2, $7,
           LEAST(GREATEST(s.priority::int + r.priority, -32768), 32767)::smallint,
           s.max_attempts, r.run_at
    FROM r CROSS JOIN unnest($8::smallint[], $9::smallint[], $10::int[])
        AS s(step, priority, max_attempts)
), j AS (
    INSERT INTO pgflow.step_states (run_id, step, status, remaining)
    SELECT r.id, j.step, 'waiting', j.n
    FROM r CROSS JOIN unnest($11::smallint[], $12::int[]) AS j(step, n)
), notified AS MATERIALIZED (
    -- wakes the queue's workers, in the same round trip; delivered at commit (of the
    -- caller's transaction, if any)
    SELECT pg_notify($13, $7) WHERE EXISTS (SELECT 1 FROM r)
)
SELECT r.id FROM r LEFT JOIN notified ON true ORDER BY r.id";

struct NewRun {
    input: String,
    options: StartOptions,
}

impl Runtime {
    /// A builder; see [`RuntimeBuilder`].
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    /// The instances sharing this database: online ones and those that went offline
    /// in the last hour, with their load and time since their last heartbeat.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn instances(&self) -> Result<Vec<InstanceInfo>, Error> {
        instances::list(&self.inner.pool).await
    }

    /// Runs until SIGTERM or SIGINT (Ctrl-C), then shuts down gracefully: stops
    /// claiming, lets in-flight steps finish up to the shutdown grace, flushes their
    /// completions, gives back what did not finish (attempt not counted) and marks
    /// the instance offline.
    ///
    /// ```no_run
    /// # async fn demo(rt: pgflow_runtime::Runtime) -> Result<(), pgflow_runtime::Error> {
    /// rt.run_until_signal().await?; // a worker's main loop
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`Runtime::shutdown`].
    pub async fn run_until_signal(&self) -> Result<(), Error> {
        crate::shutdown_signal().await;
        self.shutdown().await
    }

    /// Counters since start: claims, flushes, completions, finished runs.
    ///
    /// ```no_run
    /// # fn demo(rt: pgflow_runtime::Runtime) {
    /// let s = rt.stats();
    /// println!("{} steps completed in {} flushes", s.completions, s.flushes);
    /// # }
    /// ```
    pub fn stats(&self) -> Stats {
        let c = &self.inner.stats;
        Stats {
            claims: c.claims.load(Ordering::Relaxed),
            tasks_claimed: c.tasks_claimed.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            completions: c.completions.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            runs_finished: c.runs_finished.load(Ordering::Relaxed),
        }
    }

    /// The pool the runtime uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Starts a run of `W` (one round trip) and returns its handle.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the input does not serialize; database errors.
    pub async fn start<W: Workflow>(&self, input: W::Input) -> Result<RunHandle<W::Output>, Error> {
        let mut conn = self.inner.pool.acquire().await?;
        self.start_with::<W>(&mut conn, input, StartOptions::default())
            .await
    }

    /// Starts a run on `conn` — typically inside the caller's transaction, so the run
    /// exists only if the transaction commits.
    ///
    /// ```no_run
    /// # use pgflow::{workflow, StepError};
    /// # pub struct W;
    /// # #[workflow] impl W { #[step] async fn a(n: u8) -> Result<u8, StepError> { Ok(n) } }
    /// # async fn demo(rt: pgflow_runtime::Runtime) -> Result<(), pgflow_runtime::Error> {
    /// let mut tx = rt.pool().begin().await?;
    /// // .. the caller's own writes ..
    /// let run = rt.start_with::<W>(&mut tx, 7, pgflow_runtime::StartOptions::default()).await?;
    /// tx.commit().await?;
    /// assert_eq!(run.wait().await?, 7);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`Runtime::start`].
    pub async fn start_with<W: Workflow>(
        &self,
        conn: &mut PgConnection,
        input: W::Input,
        options: StartOptions,
    ) -> Result<RunHandle<W::Output>, Error> {
        let def = W::definition();
        let json = serde_json::to_string(&input).map_err(|e| Error::InvalidInput {
            workflow: def.name().to_owned(),
            message: e.to_string(),
        })?;
        let (id, created) = self.insert_one(conn, def, json, options).await?;
        Ok(self.handle(id, created))
    }

    /// Starts many runs of `W` in one statement; returns their ids in input order.
    ///
    /// # Errors
    ///
    /// As for [`Runtime::start`].
    pub async fn start_many<W: Workflow>(
        &self,
        inputs: impl IntoIterator<Item = W::Input>,
    ) -> Result<Vec<RunId>, Error> {
        let def = W::definition();
        let runs = inputs
            .into_iter()
            .map(|i| {
                serde_json::to_string(&i)
                    .map(|input| NewRun {
                        input,
                        options: StartOptions::default(),
                    })
                    .map_err(|e| Error::InvalidInput {
                        workflow: def.name().to_owned(),
                        message: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut conn = self.inner.pool.acquire().await?;
        let ids = self.insert(&mut conn, def, runs).await?;
        Ok(ids.into_iter().map(RunId).collect())
    }

    /// Starts a workflow by name with a JSON input (for tools and CLIs). The input is
    /// checked against the workflow's `Input` type before anything is inserted.
    /// `version: None` takes the highest registered version.
    ///
    /// # Errors
    ///
    /// [`Error::UnknownWorkflow`]; [`Error::InvalidInput`] naming the serde path of
    /// the mismatch; database errors.
    pub async fn start_by_name(
        &self,
        name: &str,
        version: Option<u32>,
        input: serde_json::Value,
        options: StartOptions,
    ) -> Result<RunId, Error> {
        let registry = pgflow::registry()?;
        let def = match version {
            Some(v) => registry.get(name, v),
            None => registry.latest(name),
        }
        .ok_or_else(|| Error::UnknownWorkflow {
            name: name.to_owned(),
            version,
            registered: self.inner.registered_names(),
        })?;
        let json = input.to_string();
        (def.input().from_json)(&json).map_err(|e| Error::InvalidInput {
            workflow: def.name().to_owned(),
            message: e.message().to_owned(),
        })?;
        let mut conn = self.inner.pool.acquire().await?;
        let (id, _) = self.insert_one(&mut conn, def, json, options).await?;
        Ok(id)
    }

    async fn insert_one(
        &self,
        conn: &mut PgConnection,
        def: &'static WorkflowDef,
        input: String,
        options: StartOptions,
    ) -> Result<(RunId, bool), Error> {
        let key = options.idempotency_key.clone();
        let ids = self
            .insert(conn, def, vec![NewRun { input, options }])
            .await?;
        if let Some(id) = ids.first() {
            return Ok((RunId(*id), true));
        }
        // The key matched an earlier run.
        let key = key.unwrap_or_default();
        let id: Option<(i64,)> = sqlx::query_as(
            "SELECT id FROM pgflow.runs WHERE workflow = $1 AND idempotency_key = $2",
        )
        .bind(def.name())
        .bind(&key)
        .fetch_optional(&mut *conn)
        .await?;
        id.map(|(id,)| (RunId(id), false)).ok_or_else(|| {
            Error::Database(sqlx::Error::Protocol(format!(
                "idempotency key {key:?} conflicted but no run holds it"
            )))
        })
    }

    async fn insert(
        &self,
        conn: &mut PgConnection,
        def: &'static WorkflowDef,
        runs: Vec<NewRun>,
    ) -> Result<Vec<i64>, Error> {
        let flow = self.inner.flow(def)?;
        let mut inputs = Vec::with_capacity(runs.len());
        let mut priorities = Vec::with_capacity(runs.len());
        let mut run_ats = Vec::with_capacity(runs.len());
        let mut keys = Vec::with_capacity(runs.len());
        for r in runs {
            inputs.push(r.input);
            priorities.push(r.options.priority);
            run_ats.push(r.options.run_at);
            keys.push(r.options.idempotency_key);
        }
        let steps = def.steps();
        let root_steps: Vec<i16> = flow.roots.clone();
        let root_priorities: Vec<i16> = flow
            .roots
            .iter()
            .map(|&s| steps[usize::try_from(s).unwrap_or(0)].options().priority)
            .collect();
        let root_attempts: Vec<i32> = flow
            .roots
            .iter()
            .map(|&s| {
                i32::try_from(
                    steps[usize::try_from(s).unwrap_or(0)]
                        .options()
                        .max_attempts,
                )
                .unwrap_or(i32::MAX)
            })
            .collect();
        let join_steps: Vec<i16> = flow.joins.iter().map(|j| j.0).collect();
        let join_counts: Vec<i32> = flow.joins.iter().map(|j| j.1).collect();
        let ids: Vec<(i64,)> = sqlx::query_as(START_SQL)
            .bind(def.name())
            .bind(version_i32(def.version()))
            .bind(&inputs)
            .bind(&priorities)
            .bind(&run_ats)
            .bind(&keys)
            .bind(def.queue())
            .bind(&root_steps)
            .bind(&root_priorities)
            .bind(&root_attempts)
            .bind(&join_steps)
            .bind(&join_counts)
            .bind(worker::CHANNEL)
            .fetch_all(&mut *conn)
            .await?;
        if !ids.is_empty() {
            self.inner.wake_queue(def.queue());
        }
        Ok(ids.into_iter().map(|r| r.0).collect())
    }

    /// A handle on an existing run of `W`.
    pub fn handle<O>(&self, id: RunId, created: bool) -> RunHandle<O> {
        RunHandle {
            id,
            created,
            rt: self.clone(),
            _output: PhantomData,
        }
    }

    /// Where run `id` stands, its output typed as `O`.
    ///
    /// # Errors
    ///
    /// [`Error::RunNotFound`]; [`Error::InvalidInput`] when the stored output does
    /// not deserialize into `O`; database errors.
    pub async fn result<O: serde::de::DeserializeOwned>(
        &self,
        id: RunId,
    ) -> Result<RunOutcome<O>, Error> {
        Ok(self
            .outcome::<O>(id)
            .await?
            .1
            .unwrap_or(RunOutcome::Running))
    }

    async fn outcome<O: serde::de::DeserializeOwned>(
        &self,
        id: RunId,
    ) -> Result<(String, Option<RunOutcome<O>>), Error> {
        let row: Option<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
            "SELECT status, workflow, output::text, error::text FROM pgflow.runs WHERE id = $1",
        )
        .bind(id.0)
        .fetch_optional(&self.inner.pool)
        .await?;
        let (status, workflow, output, error) = row.ok_or(Error::RunNotFound(id))?;
        let outcome = match status.as_str() {
            "succeeded" => {
                let o =
                    pgflow::from_json::<O>(output.as_deref().unwrap_or("null")).map_err(|e| {
                        Error::InvalidInput {
                            workflow: workflow.clone(),
                            message: format!("stored output: {}", e.message()),
                        }
                    })?;
                Some(RunOutcome::Succeeded(o))
            }
            "failed" => {
                let e = error
                    .as_deref()
                    .and_then(|e| serde_json::from_str::<RunError>(e).ok())
                    .unwrap_or(RunError::Serde {
                        workflow: workflow.clone(),
                        message: format!("unreadable error: {}", error.unwrap_or_default()),
                    });
                Some(RunOutcome::Failed(e))
            }
            "cancelled" => Some(RunOutcome::Cancelled),
            _ => None,
        };
        Ok((workflow, outcome))
    }

    /// Cancels a running run: its pending steps never start and steps running here
    /// see `ctx.is_cancelled()`. Returns false if the run had already finished.
    ///
    /// # Errors
    ///
    /// [`Error::RunNotFound`]; database errors.
    pub async fn cancel(&self, id: RunId) -> Result<bool, Error> {
        let row = crate::queue::cancel(&self.inner.pool, id.0).await?;
        let (_, cancelled) = row.ok_or(Error::RunNotFound(id))?;
        if cancelled {
            self.inner.cancel_local(id.0);
            self.inner.wake_waiters(&[id.0]);
        }
        Ok(cancelled)
    }

    /// Count, success rate, p50/p95 duration and total cost of the runs of
    /// `workflow` that finished since `since` (from `pgflow.job_results`).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn summary(&self, workflow: &str, since: DateTime<Utc>) -> Result<Summary, Error> {
        let (count, success_rate, p50, p95, cost): (
            i64,
            Option<f64>,
            Option<f64>,
            Option<f64>,
            Option<i64>,
        ) = sqlx::query_as(
            "SELECT count(*),
                        avg(CASE WHEN status = 'success' THEN 1.0 ELSE 0.0 END)::float8,
                        percentile_cont(0.5) WITHIN GROUP (ORDER BY duration_ms),
                        percentile_cont(0.95) WITHIN GROUP (ORDER BY duration_ms),
                        sum(cost_cents)::bigint
                 FROM pgflow.job_results
                 WHERE workflow = $1 AND completed_at >= $2",
        )
        .bind(workflow)
        .bind(since)
        .fetch_one(&self.inner.pool)
        .await?;
        Ok(Summary {
            count,
            success_rate: success_rate.unwrap_or(0.0),
            p50_ms: p50.unwrap_or(0.0),
            p95_ms: p95.unwrap_or(0.0),
            total_cost_cents: cost.unwrap_or(0),
        })
    }

    /// Stops claiming, lets in-flight steps finish (up to the shutdown grace),
    /// flushes their completions, and gives back what did not finish (the attempt
    /// is not counted).
    ///
    /// # Errors
    ///
    /// Database errors while giving tasks back.
    pub async fn shutdown(&self) -> Result<(), Error> {
        let _ = self.inner.shutdown.send(true);
        let Some(t) = self.inner.tasks.lock().ok().and_then(|mut t| t.take()) else {
            return Ok(()); // already shut down
        };
        // Claimers stop claiming and return once their executions are done
        // (or the grace has passed).
        for c in t.claimers {
            let _ = c.await;
        }
        // Executions still running past the grace: give their tasks back.
        let left: Vec<((i64, i64), InFlight)> = self
            .inner
            .in_flight
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, v.clone())).collect())
            .unwrap_or_default();
        for ((task_id, token), f) in left {
            let Some(flow) = self.inner.catalog.get(&f.workflow, f.version) else {
                continue;
            };
            let _ = self.inner.completions.send(Msg::Done(Completion {
                task_id,
                token,
                run_id: f.run_id,
                step: f.step,
                element: None,
                flow: (flow.def.name(), f.version),
                attempt: 0,
                outcome: crate::queue::Outcome::Release,
                cost_cents: 0,
            }));
        }
        // Everything sent so far is applied when the flusher answers.
        let (ack, flushed) = oneshot::channel();
        if self.inner.completions.send(Msg::Barrier(ack)).is_ok() {
            let _ = tokio::time::timeout(self.inner.config.shutdown_grace, flushed).await;
        }
        for h in t.others {
            h.abort();
            let _ = h.await;
        }
        instances::mark_offline(&self.inner.pool, &self.inner.instance_id).await?;
        Ok(())
    }
}
