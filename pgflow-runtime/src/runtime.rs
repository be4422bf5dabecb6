//! The public API of a started engine: [`Runtime`] (start, wait for, cancel and read
//! runs; stats; shutdown), [`RunHandle`], [`StartOptions`], and what they return.
//! Configuring and starting is [`RuntimeBuilder`](crate::RuntimeBuilder)'s job; the
//! work is the engine's (`engine/`); every statement is the store's (`store/`).

use std::collections::BTreeMap;
use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use pgflow::engine::from_json;
use pgflow::{RunError, RunId, Workflow, WorkflowDef};
use sqlx::{PgConnection, PgPool};

use crate::catalog::Entry;
use crate::engine::Engine;
use crate::store::{instances, runs};
use crate::{Error, RunHandle, RunOutcome, RunStatus, RuntimeBuilder};

/// A running pgflow engine; cheap to clone. See the crate docs.
///
/// Call [`shutdown`](Runtime::shutdown) (or [`run_until_signal`](Runtime::run_until_signal))
/// to stop it and wait until it has stopped. If the last clone of a runtime (and the
/// last [`RunHandle`] of its runs) is dropped without that, it shuts down in the
/// background all the same: it stops claiming, lets in-flight steps finish up to
/// the shutdown grace, gives back what it still holds and marks the instance
/// offline — nothing it claimed is stranded until its lease expires.
#[derive(Clone)]
pub struct Runtime {
    pub(crate) engine: Arc<Engine>,
    /// Shared by every clone; its drop stops the engine (see above).
    _stop_on_drop: Arc<StopOnDrop>,
}

impl Runtime {
    pub(crate) fn new(engine: Arc<Engine>) -> Self {
        Self {
            _stop_on_drop: Arc::new(StopOnDrop(Arc::clone(&engine))),
            engine,
        }
    }
}

/// Stops the engine when the last `Runtime` clone is dropped without `shutdown`.
struct StopOnDrop(Arc<Engine>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        if !self.0.is_running() {
            return;
        }
        let engine = Arc::clone(&self.0);
        // Without a tokio runtime its tasks (the loops) are gone with it, and the
        // claims return to the queue when the instance is seen dead.
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            tracing::info!(
                instance = %engine.instance_id,
                "pgflow: the last Runtime handle was dropped without shutdown(); shutting down"
            );
            handle.spawn(async move {
                if let Err(e) = stop(&engine).await {
                    tracing::warn!(error = %e, "pgflow: shutdown after drop failed");
                }
            });
        }
    }
}

/// Stops the engine's loops and marks the instance offline.
async fn stop(engine: &Engine) -> Result<(), Error> {
    if !engine.stop_loops().await {
        return Ok(()); // already stopped
    }
    instances::mark_offline(&engine.pool, &engine.instance_id).await?;
    Ok(())
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("instance_id", &self.engine.instance_id)
            .field("queues", &self.engine.queues)
            .finish_non_exhaustive()
    }
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

impl Runtime {
    /// A builder; see [`RuntimeBuilder`].
    pub fn builder() -> RuntimeBuilder {
        RuntimeBuilder::default()
    }

    /// This instance's id.
    pub fn instance_id(&self) -> &str {
        &self.engine.instance_id
    }

    /// The instances sharing this database: online ones and those that went offline
    /// in the last hour, with their load and time since their last heartbeat.
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn instances(&self) -> Result<Vec<InstanceInfo>, Error> {
        let rows = instances::list(&self.engine.pool, instances::Listing::Recent).await?;
        Ok(rows
            .into_iter()
            .map(|r| InstanceInfo {
                queues: serde_json::from_str(&r.queues).unwrap_or_default(),
                idle: Duration::from_millis(u64::try_from(r.idle_ms).unwrap_or(0)),
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

    /// The cron schedules stored in this database (by every runtime that registers
    /// one, not only this one), by name: definition, next and last tick, the last
    /// run's status. See [`admin::schedules`](crate::admin::schedules()).
    ///
    /// ```no_run
    /// # async fn demo(rt: pgflow_runtime::Runtime) -> Result<(), pgflow_runtime::Error> {
    /// for s in rt.schedules().await? {
    ///     println!("{}: `{}` in {}, next tick {:?}", s.name, s.cron, s.time_zone, s.next_tick);
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn schedules(&self) -> Result<Vec<crate::ScheduleInfo>, Error> {
        crate::admin::schedules(&self.engine.pool).await
    }

    /// Removes the stored schedule `name`: no instance fires it any more (runs it
    /// started are left alone). An instance that registers it in code stores it
    /// again at its next start, with its first tick after then — to stop a schedule
    /// for good, remove it from the code too. Returns false when there was none.
    ///
    /// ```no_run
    /// # async fn demo(rt: pgflow_runtime::Runtime) -> Result<(), pgflow_runtime::Error> {
    /// assert!(rt.remove_schedule("nightly_report").await?);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn remove_schedule(&self, name: &str) -> Result<bool, Error> {
        match crate::admin::remove_schedule(&self.engine.pool, name).await {
            Ok(_) => Ok(true),
            Err(Error::UnknownSchedule { .. }) => Ok(false),
            Err(e) => Err(e),
        }
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
        let c = &self.engine.counters;
        Stats {
            claims: c.claims.load(Ordering::Relaxed),
            tasks_claimed: c.tasks_claimed.load(Ordering::Relaxed),
            flushes: c.flushes.load(Ordering::Relaxed),
            completions: c.completions.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            runs_finished: c.runs_finished.load(Ordering::Relaxed),
        }
    }

    /// The pool the runtime uses. When the runtime made it (from a database URL),
    /// its connections are checked when they come back to it, and again when they
    /// are handed out only after a second or more idle (a round trip less per use
    /// under load).
    pub fn pool(&self) -> &PgPool {
        &self.engine.pool
    }

    /// Starts a run of `W` (one statement, committed before this returns) and
    /// returns its handle.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidInput`] when the input does not serialize; database errors.
    pub async fn start<W: Workflow>(&self, input: W::Input) -> Result<RunHandle<W::Output>, Error> {
        // one statement, committed on its own (its plan is generic after a few
        // executions on a connection: see `store::runs::start`)
        let mut conn = self.engine.pool.acquire().await?;
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
        let json = serialize_input(def, &input)?;
        let key = options.key.clone().or_else(|| W::key(&input));
        let (id, created) = self.start_one(conn, def, json, options, key).await?;
        // (inside the caller's transaction the claimer finds nothing yet; the
        // NOTIFY at its commit wakes it again)
        self.engine.wake_queue(def.queue());
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
        let mut runs = runs::NewRuns::default();
        for input in inputs {
            let options = runs::RunOptions {
                key: W::key(&input),
                ..runs::RunOptions::default()
            };
            runs.push(serialize_input(def, &input)?, options);
        }
        let mut tx = crate::store::begin_generic(&self.engine.pool).await?;
        let ids = self.insert(&mut tx, def, &runs).await?;
        tx.commit().await?;
        self.engine.wake_queue(def.queue());
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
            registered: registered_names(),
        })?;
        let json = input.to_string();
        let invalid = |e: pgflow::StepError| Error::InvalidInput {
            workflow: def.name().to_owned(),
            message: e.message().to_owned(),
        };
        (def.input().from_json)(&json).map_err(invalid)?;
        let key = match options.key.clone() {
            Some(key) => Some(key),
            None => def.key_of(&json).map_err(invalid)?,
        };
        let mut tx = crate::store::begin_generic(&self.engine.pool).await?;
        let (id, _) = self.start_one(&mut tx, def, json, options, key).await?;
        tx.commit().await?;
        self.engine.wake_queue(def.queue());
        Ok(id)
    }

    async fn start_one(
        &self,
        conn: &mut PgConnection,
        def: &'static WorkflowDef,
        input: String,
        options: StartOptions,
        key: Option<String>,
    ) -> Result<(RunId, bool), Error> {
        crate::store::subflows::check_user_key(def.name(), options.idempotency_key.as_deref())?;
        if let Some((debounce_key, window)) = options.debounce.clone() {
            return self
                .start_debounced(conn, def, input, options, key, (debounce_key, window))
                .await;
        }
        let mut runs = runs::NewRuns::default();
        runs.push(input, run_options(&options, key));
        if let Some(&id) = self.insert(conn, def, &runs).await?.first() {
            return Ok((RunId(id), true));
        }
        // The key matched an earlier run.
        let key = options.idempotency_key.unwrap_or_default();
        let id = runs::by_idempotency_key(conn, def.name(), &key).await?;
        id.map(|id| (RunId(id), false)).ok_or_else(|| {
            Error::Database(sqlx::Error::Protocol(format!(
                "idempotency key {key:?} conflicted but no run holds it"
            )))
        })
    }

    /// A debounced start (see [`StartOptions::debounce`]): in a transaction (a
    /// savepoint of the caller's) holding the (workflow, key) lock, joins the pending
    /// run — its input replaced, its start moved to `window` from now — or starts a
    /// new one due then. `(id, false)` when it joined one.
    async fn start_debounced(
        &self,
        conn: &mut PgConnection,
        def: &'static WorkflowDef,
        input: String,
        options: StartOptions,
        key: Option<String>,
        (debounce_key, window): (String, Duration),
    ) -> Result<(RunId, bool), Error> {
        use sqlx::Connection;
        let refuse = |message: &str| Error::InvalidInput {
            workflow: def.name().to_owned(),
            message: message.to_owned(),
        };
        if options.idempotency_key.is_some() {
            return Err(refuse(
                "a start takes a debounce key or an idempotency key, not both",
            ));
        }
        if def
            .plan()
            .roots()
            .iter()
            .any(|&r| def.steps()[r].map().is_some())
        {
            return Err(refuse(
                "a workflow whose first step is a map step cannot be debounced (its elements are fanned out at start)",
            ));
        }
        let run_at = Utc::now()
            + chrono::Duration::from_std(window).unwrap_or_else(|_| chrono::Duration::days(1));
        let mut tx = conn.begin().await?;
        runs::lock_debounce(&mut tx, def.name(), &debounce_key).await?;
        let joined =
            runs::debounce_into(&mut tx, (def.name(), &debounce_key), &input, run_at).await?;
        if let Some(id) = joined {
            tx.commit().await?;
            return Ok((RunId(id), false));
        }
        let mut runs = runs::NewRuns::default();
        runs.push(
            input,
            runs::RunOptions {
                run_at: Some(run_at),
                idempotency_key: None,
                debounce_key: Some(debounce_key),
                ..run_options(&options, key)
            },
        );
        let ids = self.insert(&mut tx, def, &runs).await?;
        tx.commit().await?;
        let id = ids.first().copied().ok_or_else(|| {
            Error::Database(sqlx::Error::Protocol(
                "a debounced start inserted no run".to_owned(),
            ))
        })?;
        Ok((RunId(id), true))
    }

    /// Inserts the runs (one statement on `conn`); the caller wakes the queue once
    /// they are visible.
    async fn insert(
        &self,
        conn: &mut PgConnection,
        def: &'static WorkflowDef,
        new: &runs::NewRuns,
    ) -> Result<Vec<i64>, Error> {
        let flow = self.flow(def)?;
        let ids = runs::start(conn, &runs::Shape::of_entry(flow), new).await?;
        if let Some(first) = ids.first() {
            tracing::info!(
                workflow = def.name(),
                version = def.version(),
                runs = ids.len(),
                run_id = first,
                "pgflow: run started"
            );
            self.warn_if_unserved(def);
        }
        Ok(ids)
    }

    /// At most once a minute per workflow version: in the background, warns when no
    /// live instance serves the version just started (its runs would wait).
    fn warn_if_unserved(&self, def: &'static WorkflowDef) {
        let key = (def.name(), def.version());
        let due = self
            .engine
            .served_checks
            .lock()
            .is_ok_and(|mut m| m.due(key, Duration::from_secs(60)));
        if !due {
            return;
        }
        let pool = self.engine.pool.clone();
        tokio::spawn(async move {
            let version = crate::store::version_i32(def.version());
            if let Ok(false) = instances::is_served(&pool, def.name(), version).await {
                tracing::warn!(
                    workflow = def.name(),
                    version = def.version(),
                    queue = def.queue(),
                    "pgflow: no live instance serves {} v{}: its runs wait until an instance \
                     that links it and serves queue `{}` is online",
                    def.name(),
                    def.version(),
                    def.queue()
                );
            }
        });
    }

    fn flow(&self, def: &'static WorkflowDef) -> Result<&Entry, Error> {
        self.engine
            .catalog
            .flow_of(def)
            .ok_or_else(|| Error::UnknownWorkflow {
                name: def.name().to_owned(),
                version: Some(def.version()),
                registered: registered_names(),
            })
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
    /// [`Error::RunNotFound`]; [`Error::StoredValue`] when the stored output does
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

    pub(crate) async fn outcome<O: serde::de::DeserializeOwned>(
        &self,
        id: RunId,
    ) -> Result<(String, Option<RunOutcome<O>>), Error> {
        let row = runs::outcome(&self.engine.pool, id.0)
            .await?
            .ok_or(Error::RunNotFound(id))?;
        let workflow = row.workflow;
        let outcome = match row.status.parse::<RunStatus>() {
            Ok(RunStatus::Succeeded) => {
                let o = from_json::<O>(row.output.as_deref().unwrap_or("null")).map_err(|e| {
                    Error::StoredValue {
                        workflow: workflow.clone(),
                        what: "output",
                        message: e.message().to_owned(),
                    }
                })?;
                Some(RunOutcome::Succeeded(o))
            }
            Ok(RunStatus::Failed) => {
                let e = row
                    .error
                    .as_deref()
                    .and_then(|e| serde_json::from_str::<RunError>(e).ok())
                    .unwrap_or_else(|| RunError::Internal {
                        workflow: workflow.clone(),
                        message: format!(
                            "unreadable stored error: {}",
                            row.error.unwrap_or_default()
                        ),
                    });
                Some(RunOutcome::Failed(e))
            }
            Ok(RunStatus::Cancelled) => Some(RunOutcome::Cancelled),
            Ok(RunStatus::Running) | Err(_) => None,
        };
        Ok((workflow, outcome))
    }

    /// Cancels a running run: its pending steps never start and steps running here
    /// see `ctx.is_cancelled()`. Its child runs (subflows) are cancelled with it; a
    /// cancelled child run fails the parent's step that waits for it. Returns false
    /// if the run had already finished.
    ///
    /// # Errors
    ///
    /// [`Error::RunNotFound`]; database errors.
    pub async fn cancel(&self, id: RunId) -> Result<bool, Error> {
        let row = crate::admin::repair::cancel_retrying(&self.engine.pool, id)
            .await?
            .ok_or(Error::RunNotFound(id))?;
        for &run in &row.ids {
            self.engine.cancel_local(run);
        }
        self.engine.wake_waiters(&row.ids);
        Ok(row.cancelled)
    }

    /// Sends signal `signal` of workflow `W` with its payload to run `run`: the step
    /// waiting for it (`#[step(signal = ..)]`) runs with it, now if it is waiting,
    /// else when it is reached. The constant `W::<signal name>` that `#[workflow]`
    /// generates types the payload, so a wrong one does not compile.
    ///
    /// ```no_run
    /// # use pgflow::{workflow, StepError, SignalOutcome};
    /// # use serde::{Deserialize, Serialize};
    /// # #[derive(Serialize, Deserialize)] pub struct Approval { pub by: String }
    /// # pub struct Review;
    /// # #[workflow(name = "runtime_signal_doc")]
    /// # impl Review {
    /// #     #[step(signal = approval, signal_timeout = "72h")]
    /// #     async fn publish(input: String, approval: Option<Approval>) -> Result<String, StepError> { Ok(input) }
    /// # }
    /// # async fn demo(rt: pgflow_runtime::Runtime) -> Result<(), pgflow_runtime::Error> {
    /// let run = rt.start::<Review>("cats".into()).await?;
    /// let outcome = rt.signal(run.id(), Review::approval, Approval { by: "ada".into() }).await?;
    /// assert!(matches!(outcome, SignalOutcome::Delivered | SignalOutcome::Kept));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::RunNotFound`]; [`Error::RunNotRunning`] for a finished or cancelled
    /// run; [`Error::UnknownSignal`] when the run is of another workflow (or version)
    /// whose steps do not wait for it; [`Error::InvalidInput`] when the payload does
    /// not serialize; database errors.
    pub async fn signal<W: Workflow, T: serde::Serialize>(
        &self,
        run: RunId,
        signal: pgflow::Signal<W, T>,
        payload: T,
    ) -> Result<pgflow::SignalOutcome, Error> {
        signal_in(&self.engine.pool, run, signal, payload).await
    }

    /// Re-runs a failed or cancelled run from its frontier, reusing every completed
    /// step's output, every skip decision and every completed element of a map step
    /// (only the failed or missing elements run again). See
    /// [`admin::retry`](crate::admin::retry).
    ///
    /// ```no_run
    /// # async fn demo(rt: pgflow_runtime::Runtime, id: pgflow::RunId) -> Result<(), pgflow_runtime::Error> {
    /// let report = rt.retry(id).await?;
    /// println!("reused {:?}, running again {:?}", report.reused, report.enqueued);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// As for [`admin::retry`](crate::admin::retry).
    pub async fn retry(&self, id: RunId) -> Result<crate::admin::RetryReport, Error> {
        crate::admin::retry(&self.engine.pool, id).await
    }

    /// Starts a new run of `W` from run `id` (a run of the same workflow, any
    /// version whose reused steps still match): the steps upstream of `from` keep
    /// their stored outputs, `from` and everything downstream of it run with this
    /// binary's code. `input: None` keeps the original input. See
    /// [`admin::fork`](crate::admin::fork).
    ///
    /// ```no_run
    /// # use pgflow::{workflow, StepError};
    /// # pub struct W;
    /// # #[workflow] impl W {
    /// #     #[step] async fn fetch(n: u8) -> Result<u8, StepError> { Ok(n) }
    /// #     #[step] async fn summarize(fetch: u8) -> Result<u8, StepError> { Ok(fetch) }
    /// # }
    /// # async fn demo(rt: pgflow_runtime::Runtime, id: pgflow::RunId) -> Result<(), pgflow_runtime::Error> {
    /// let fork = rt.fork::<W>(id, "summarize", None).await?;
    /// let output = fork.wait().await?;
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    ///
    /// [`Error::WrongWorkflow`] when run `id` is not a run of `W`;
    /// [`Error::InvalidInput`]; otherwise as for [`admin::fork`](crate::admin::fork).
    pub async fn fork<W: Workflow>(
        &self,
        id: RunId,
        from: &str,
        input: Option<W::Input>,
    ) -> Result<RunHandle<W::Output>, Error> {
        let def = W::definition();
        let json = input.map(|i| serialize_input(def, &i)).transpose()?;
        let mut conn = self.engine.pool.acquire().await?;
        let report = crate::admin::repair::fork_on(
            &mut conn,
            id,
            from,
            json.as_deref(),
            Some(def.version()),
            Some(def.name()),
        )
        .await?;
        self.engine.wake_queue(def.queue());
        Ok(self.handle(RunId(report.id), true))
    }

    /// Count, success rate, p50/p95 duration and total cost of the runs of
    /// `workflow` that finished since `since` (from `pgflow.job_results`).
    ///
    /// # Errors
    ///
    /// Database errors.
    pub async fn summary(&self, workflow: &str, since: DateTime<Utc>) -> Result<Summary, Error> {
        let r = runs::summary(&self.engine.pool, workflow, since).await?;
        Ok(Summary {
            count: r.count,
            success_rate: r.success_rate.unwrap_or(0.0),
            p50_ms: r.p50_ms.unwrap_or(0.0),
            p95_ms: r.p95_ms.unwrap_or(0.0),
            total_cost_cents: r.total_cost_cents.unwrap_or(0),
            tokens_in: r.tokens_in.unwrap_or(0),
            tokens_out: r.tokens_out.unwrap_or(0),
        })
    }

    /// Stops claiming, lets in-flight steps finish (up to the shutdown grace),
    /// flushes their completions, gives back what did not finish (the attempt
    /// is not counted), and marks the instance offline.
    ///
    /// # Errors
    ///
    /// Database errors while marking the instance offline.
    pub async fn shutdown(&self) -> Result<(), Error> {
        stop(&self.engine).await
    }

    /// How many `wait()`s are registered on this runtime (for its own tests).
    #[doc(hidden)]
    pub fn pending_waiters(&self) -> usize {
        self.engine.waiter_count()
    }
}

pub(crate) fn serialize_input<T: serde::Serialize>(
    def: &WorkflowDef,
    input: &T,
) -> Result<String, Error> {
    let invalid = |message: String| Error::InvalidInput {
        workflow: def.name().to_owned(),
        message,
    };
    let json = serde_json::to_string(input).map_err(|e| invalid(e.to_string()))?;
    // A NaN or infinite float is written as `null`: only then is the input walked.
    if json.contains("null") {
        pgflow::engine::check_finite(input).map_err(|e| invalid(e.message().to_owned()))?;
    }
    Ok(json)
}

/// The linked workflows, for error messages.
pub(crate) fn registered_names() -> String {
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

/// Options of one start: idempotency key, delayed start, priority, key, budget.
///
/// ```
/// use pgflow_runtime::StartOptions;
/// let opts = StartOptions::default()
///     .idempotency_key("order-42")
///     .priority(5)
///     .run_at(chrono::Utc::now() + chrono::Duration::seconds(30))
///     .key("tenant-acme")
///     .budget_cents(200);
/// ```
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    idempotency_key: Option<String>,
    run_at: Option<DateTime<Utc>>,
    priority: i16,
    key: Option<String>,
    budget_cents: Option<i64>,
    budget_tokens: Option<i64>,
    debounce: Option<(String, Duration)>,
}

impl StartOptions {
    /// A second start with the same key (for the same workflow) returns the first run.
    /// Keys starting with `subflow:` are reserved for child runs.
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

    /// The run's key (the tenant, customer or provider its usage is counted under),
    /// instead of the one `#[workflow(key = ..)]` computes from the input. Child runs
    /// (subflows) inherit it.
    pub fn key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// A budget in cents: a step whose estimate (`#[step(estimate_cents = ..)]`)
    /// would take the run's cost (reported plus reserved by running steps) past it is
    /// not started, and the run fails with `RunError::BudgetExceeded`.
    pub fn budget_cents(mut self, cents: u64) -> Self {
        self.budget_cents = Some(i64::try_from(cents).unwrap_or(i64::MAX));
        self
    }

    /// Debounces the start under `key`: while a run of the workflow started with the
    /// same debounce key has not started a step yet, this start joins it — the last
    /// input wins and the run starts `window` after this start; otherwise a new run
    /// starts, due `window` from now. So a burst of starts (a user typing, a webhook
    /// retried, a file saved ten times) becomes one run, on the burst's last input.
    /// The handle's [`created`](crate::RunHandle::created) is false for a start that
    /// joined a pending run. Not with an idempotency key, nor for a workflow whose
    /// first step is a map step.
    ///
    /// ```
    /// use std::time::Duration;
    /// let opts = pgflow_runtime::StartOptions::default().debounce("doc-42", Duration::from_secs(5));
    /// ```
    pub fn debounce(mut self, key: impl Into<String>, window: Duration) -> Self {
        self.debounce = Some((key.into(), window));
        self
    }

    /// A budget in tokens (in + out), enforced like [`budget_cents`](Self::budget_cents)
    /// against `#[step(estimate_tokens = ..)]`.
    pub fn budget_tokens(mut self, tokens: u64) -> Self {
        self.budget_tokens = Some(i64::try_from(tokens).unwrap_or(i64::MAX));
        self
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
    /// Sum of the tokens in and out the runs' steps reported (`ctx.add_usage`).
    pub tokens_in: i64,
    /// See `tokens_in`.
    pub tokens_out: i64,
}

/// [`Runtime::signal`] through any executor: a pool, a connection, or the
/// application's own transaction (the signal counts at its commit, with the
/// application's own writes).
///
/// ```no_run
/// # use pgflow::{workflow, StepError};
/// # pub struct Review;
/// # #[workflow(name = "signal_in_doc")]
/// # impl Review {
/// #     #[step(signal = approval)]
/// #     async fn publish(input: String, approval: bool) -> Result<String, StepError> { Ok(input) }
/// # }
/// # async fn demo(pool: sqlx::PgPool, run: pgflow::RunId) -> Result<(), pgflow_runtime::Error> {
/// let mut tx = pool.begin().await?;
/// // .. the application's own writes ..
/// pgflow_runtime::signal_in(&mut *tx, run, Review::approval, true).await?;
/// tx.commit().await?;
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// As for [`Runtime::signal`].
pub async fn signal_in<W: Workflow, T: serde::Serialize>(
    db: impl sqlx::PgExecutor<'_>,
    run: RunId,
    signal: pgflow::Signal<W, T>,
    payload: T,
) -> Result<pgflow::SignalOutcome, Error> {
    let json = serde_json::to_string(&payload).map_err(|e| Error::InvalidInput {
        workflow: W::NAME.to_owned(),
        message: format!(
            "the payload of signal `{}` does not serialize: {e}",
            signal.name()
        ),
    })?;
    crate::admin::send_json(db, run, signal.name(), &json).await
}

/// What a start's options ask of the run it inserts (its run key `key` resolved).
fn run_options(options: &StartOptions, key: Option<String>) -> runs::RunOptions {
    runs::RunOptions {
        priority: options.priority,
        run_at: options.run_at,
        idempotency_key: options.idempotency_key.clone(),
        key,
        budget_cents: options.budget_cents,
        budget_tokens: options.budget_tokens,
        debounce_key: None,
    }
}
