//! The worker loops of a runtime: one claimer per queue, the step executions it
//! spawns, the flusher that applies completions in batches, the listener that turns
//! `NOTIFY pgflow_tasks` into wake-ups, and the rescuer that returns expired leases
//! to the queue.
//!
//! Claims run on connections of their own with `synchronous_commit = off`: a claim
//! lost in a crash only puts the task back (its completion would then fail the
//! fence), so claims need no fsync. Completions are durable: each flush is one
//! synchronous commit for the whole batch.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgflow::policy;
use pgflow::{
    AttemptFailure, CostMeter, ErrorKind, MapOps, ParamSource, RunId, StepContext, StepDef,
    StepError, StepInputs, StepOutput, StepValue,
};
use serde_json::value::RawValue;
use sqlx::{Connection, PgConnection};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::{Instrument, debug, info_span, warn};

use crate::queue::{self, Claimed, Completion, Msg, Outcome};
use crate::runtime::{InFlight, Inner};

/// The channel of notifications that tasks are ready: the payload is the queue.
pub(crate) const CHANNEL: &str = "pgflow_tasks";

/// Backoff after a database error in a loop: 50 ms doubling to 5 s.
pub(crate) struct Backoff(u32);

impl Backoff {
    pub(crate) fn new() -> Self {
        Self(0)
    }
    pub(crate) fn reset(&mut self) {
        self.0 = 0;
    }
    pub(crate) fn next(&mut self) -> Duration {
        let d = Duration::from_millis(50u64.saturating_mul(1 << self.0.min(7)))
            .min(Duration::from_secs(5));
        self.0 = self.0.saturating_add(1);
        d
    }
}

async fn claim_connection(inner: &Inner) -> Result<PgConnection, sqlx::Error> {
    let options = inner.pool.connect_options();
    let connect = PgConnection::connect_with(&options);
    let mut conn = tokio::time::timeout(Duration::from_secs(10), connect)
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    // Claims need no fsync (see the module docs); a claim never runs long, so a
    // statement timeout bounds a wait on a broken server (and so shutdown).
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut conn)
        .await?;
    sqlx::query("SET statement_timeout = '30s'")
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// Claims tasks of `queue` while there are free slots, and spawns their executions.
pub(crate) async fn claimer(inner: Arc<Inner>, queue: String, concurrency: usize) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let waker = inner.waker(&queue);
    let mut shutdown = inner.shutdown_rx();
    let mut conn: Option<PgConnection> = None;
    let mut backoff = Backoff::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let free = slots.available_permits();
        if free == 0 {
            tokio::select! {
                permit = Arc::clone(&slots).acquire_owned() => drop(permit),
                _ = shutdown.changed() => {}
            }
            continue;
        }
        let limit = free.min(inner.config.claim_batch);
        if conn.is_none() {
            match claim_connection(&inner).await {
                Ok(c) => conn = Some(c),
                Err(e) => {
                    warn!(queue = %queue, error = %e, "pgflow: cannot open a claim connection; retrying");
                    sleep_or_shutdown(backoff.next(), &mut shutdown).await;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        let token = fastrand::i64(1..);
        match queue::claim(c, &inner.catalog, &inner.instance_id, token, &queue, limit).await {
            Ok(tasks) => {
                backoff.reset();
                let got = tasks.len();
                if got > 0 {
                    inner.stats.claims.fetch_add(1, Ordering::Relaxed);
                    inner
                        .stats
                        .tasks_claimed
                        .fetch_add(got as u64, Ordering::Relaxed);
                }
                for task in tasks {
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        break;
                    };
                    let inner = Arc::clone(&inner);
                    tokio::spawn(execute(inner, task, token, permit));
                }
                if got == limit {
                    continue; // there may be more
                }
            }
            Err(e) => {
                warn!(queue = %queue, error = %e, "pgflow: claim failed; retrying");
                conn = None;
                sleep_or_shutdown(backoff.next(), &mut shutdown).await;
                continue;
            }
        }
        tokio::select! {
            _ = waker.notified() => {}
            _ = tokio::time::sleep(inner.config.poll_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
    // Drain: wait until every execution gave its slot back (bounded by the grace).
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(inner.config.shutdown_grace, slots.acquire_many(all)).await;
}

async fn sleep_or_shutdown(d: Duration, shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = shutdown.changed() => {}
    }
}

/// Runs one claimed task and hands its completion to the flusher.
async fn execute(inner: Arc<Inner>, task: Claimed, token: i64, permit: OwnedSemaphorePermit) {
    let span = info_span!("pgflow.step", workflow = %task.workflow, run_id = task.run_id, step = task.step, element = task.element, attempt = task.attempt);
    let key = (task.task_id, token);
    let cost = CostMeter::new();
    inner.executing.fetch_add(1, Ordering::Relaxed);
    inner
        .in_flight
        .lock()
        .map(|mut m| {
            m.insert(
                key,
                InFlight {
                    run_id: task.run_id,
                    step: task.step,
                    workflow: task.workflow.clone(),
                    version: task.version,
                },
            )
        })
        .ok();
    let outcome = run_task(&inner, &task, cost.clone()).instrument(span).await;
    let (workflow, version) = match inner.catalog.get(&task.workflow, task.version) {
        Some(flow) => (
            flow.def.name(),
            crate::definitions::version_i32(flow.def.version()),
        ),
        None => ("", task.version),
    };
    let completion = Completion {
        task_id: task.task_id,
        token,
        run_id: task.run_id,
        step: task.step,
        element: task.element,
        flow: (workflow, version),
        attempt: task.attempt,
        outcome,
        cost_cents: cost.total(),
    };
    inner.in_flight.lock().map(|mut m| m.remove(&key)).ok();
    inner.executing.fetch_sub(1, Ordering::Relaxed);
    if inner.completions.send(Msg::Done(completion)).is_err() {
        warn!("pgflow: completion dropped: the flusher stopped (its lease will expire)");
    }
    drop(permit);
}

fn prior_errors(task: &Claimed) -> Vec<AttemptFailure> {
    task.errors
        .as_deref()
        .and_then(|e| serde_json::from_str(e).ok())
        .unwrap_or_default()
}

async fn run_task(inner: &Inner, task: &Claimed, cost: CostMeter) -> Outcome {
    if task.run_status != "running" {
        return Outcome::Discard;
    }
    let attempt = u32::try_from(task.attempt).unwrap_or(1).max(1);
    let element = task.element.and_then(|e| usize::try_from(e).ok());
    let fail_now = |e: StepError| {
        let mut history = prior_errors(task);
        history.push(AttemptFailure::new(attempt, &e));
        Outcome::Failed { history, element }
    };
    let Some(flow) = inner.catalog.get(&task.workflow, task.version) else {
        return fail_now(StepError::permanent(format!(
            "workflow `{}` version {} is not registered in this instance",
            task.workflow, task.version
        )));
    };
    let Some(step) = usize::try_from(task.step)
        .ok()
        .and_then(|s| flow.def.steps().get(s))
    else {
        return fail_now(StepError::permanent(format!(
            "step {} does not exist",
            task.step
        )));
    };
    if let (Some(map), None) = (step.map(), element) {
        return expand(step, map, task).unwrap_or_else(fail_now);
    }
    let inputs = match build_inputs(flow.def.name(), step, task) {
        Ok(i) => i,
        Err(e) => return fail_now(e),
    };
    let cancel = inner.cancel_token(task.run_id);
    let ctx = StepContext::builder(flow.def.name(), step.name())
        .run_id(RunId(task.run_id))
        .attempt(attempt)
        .element(element)
        .data(Arc::clone(&inner.data))
        .cost(cost)
        .cancel(cancel)
        .build();
    let result = policy::run_attempt(step, inputs, ctx).await;
    inner.release_cancel_token(task.run_id);
    let result = result.and_then(|out| match out {
        StepOutput::Completed(v) => v.to_json().map(Some),
        StepOutput::Skipped => Ok(None),
    });
    match result {
        Ok(Some(json)) => Outcome::Succeeded(json.get().to_owned()),
        Ok(None) => Outcome::Skipped {
            reason: format!(
                "`when = {}` was false",
                step.predicate().unwrap_or("(no predicate)")
            ),
        },
        Err(e) => {
            debug!(error = %e, "pgflow: step attempt failed");
            let max = step.options().max_attempts.max(1);
            if e.is_retryable() && attempt < max {
                Outcome::Retry {
                    delay: policy::retry_delay(step.options(), attempt, &e),
                    failure: AttemptFailure::new(attempt, &e),
                }
            } else {
                fail_now(e)
            }
        }
    }
}

/// The first task of a map step: checks that what it maps over is a JSON array and
/// hands it to the flush, which inserts one task per element. An empty array
/// completes the step with `[]` at once.
fn expand(step: &StepDef, map: &MapOps, task: &Claimed) -> Result<Outcome, StepError> {
    let param = step.params().get(map.param()).ok_or_else(|| {
        StepError::permanent(format!(
            "map step `{}` has no element parameter",
            step.name()
        ))
    })?;
    let items = source_json(param.source, param.name, task)?.ok_or_else(|| {
        StepError::permanent(format!(
            "map step `{}` maps over a skipped step",
            step.name()
        ))
    })?;
    // Counting needs no allocation per element.
    let count = serde_json::from_str::<Vec<serde::de::IgnoredAny>>(items)
        .map_err(|e| {
            StepError::permanent(format!(
                "map step `{}` maps over a JSON array, but parameter `{}` gets something else: {e}",
                step.name(),
                param.name
            ))
        })?
        .len();
    Ok(if count == 0 {
        Outcome::Succeeded("[]".to_owned())
    } else {
        Outcome::Expand {
            items: items.to_owned(),
        }
    })
}

/// The stored JSON that feeds a parameter: the run input or a parent's output
/// (`None` when that parent was skipped).
fn source_json<'t>(
    source: ParamSource,
    name: &str,
    task: &'t Claimed,
) -> Result<Option<&'t str>, StepError> {
    match source {
        ParamSource::Input => task.input.as_deref().map(Some).ok_or_else(|| {
            StepError::permanent(format!("the run input for `{name}` was not loaded"))
        }),
        ParamSource::Step(i) => {
            let want = crate::catalog::step_i16(i);
            let pos = task
                .parent_steps
                .as_ref()
                .and_then(|s| s.iter().position(|&x| x == want));
            pos.and_then(|pos| task.parent_outputs.as_ref().and_then(|o| o.get(pos)))
                .map(Option::as_deref)
                .ok_or_else(|| {
                    StepError::permanent(format!(
                        "the output of parent step {i} (parameter `{name}`) is missing"
                    ))
                })
        }
    }
}

fn build_inputs(
    workflow: &'static str,
    step: &'static StepDef,
    task: &Claimed,
) -> Result<StepInputs, StepError> {
    let raw = |json: &str| {
        RawValue::from_string(json.to_owned())
            .map(StepValue::Json)
            .map_err(|e| StepError::permanent(format!("stored JSON is not valid: {e}")))
    };
    let element = step
        .map()
        .map(|m| m.param())
        .filter(|_| task.element.is_some());
    let mut values = Vec::with_capacity(step.params().len());
    for (k, p) in step.params().iter().enumerate() {
        let json = if Some(k) == element {
            Some(task.item.as_deref().ok_or_else(|| {
                StepError::permanent(format!("the element for `{}` was not loaded", p.name))
            })?)
        } else {
            source_json(p.source, p.name, task)?
        };
        values.push(json.map(raw).transpose()?);
    }
    Ok(StepInputs::with_skipped(workflow, step.name(), values))
}

/// Applies completions in batches: everything that queued up while the previous
/// flush ran goes into the next one.
pub(crate) async fn flusher(inner: Arc<Inner>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut last_notify: HashMap<String, Instant> = HashMap::new();
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut barriers = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Done(c) => batch.push(c),
                Msg::Barrier(ack) => {
                    barriers.push(ack);
                    break;
                }
            }
            if batch.len() < inner.config.flush_batch {
                next = rx.try_recv().ok();
            }
        }
        if batch.is_empty() {
            for ack in barriers {
                let _ = ack.send(());
            }
            continue;
        }
        let size = batch.len() as u64;
        let flushed = flush_resilient(&inner, batch).await;
        let stats = &inner.stats;
        stats.flushes.fetch_add(1, Ordering::Relaxed);
        stats.completions.fetch_add(
            size.saturating_sub(flushed.rejected.len() as u64),
            Ordering::Relaxed,
        );
        stats
            .rejected
            .fetch_add(flushed.rejected.len() as u64, Ordering::Relaxed);
        stats
            .runs_finished
            .fetch_add(flushed.finished_runs.len() as u64, Ordering::Relaxed);
        for id in &flushed.rejected {
            warn!(
                task_id = id,
                "pgflow: completion rejected: the claim was lost (lease expired and the task was claimed again)"
            );
        }
        inner.wake_waiters(&flushed.finished_runs);
        for q in flushed.queues {
            inner.wake_queue(&q);
            let due = last_notify
                .get(&q)
                .is_none_or(|t| t.elapsed() >= inner.config.notify_debounce);
            if due {
                if let Err(e) = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(CHANNEL)
                    .bind(&q)
                    .execute(&inner.pool)
                    .await
                {
                    debug!(error = %e, "pgflow: notify failed (pollers will find the tasks)");
                }
                last_notify.insert(q, Instant::now());
            }
        }
        for ack in barriers {
            let _ = ack.send(());
        }
    }
}

/// Flushes `batch`, retrying on connection errors, deadlocks and serialization
/// failures until it applies. A batch that the database rejects for its content is
/// split; a single completion it rejects (an output Postgres cannot store) fails its
/// run with the database's message.
async fn flush_resilient(inner: &Inner, batch: Vec<Completion>) -> queue::Flushed {
    let mut backoff = Backoff::new();
    let mut pending = vec![batch];
    let mut total = queue::Flushed::default();
    while let Some(batch) = pending.pop() {
        loop {
            match queue::flush(&inner.pool, &inner.catalog, &inner.instance_id, &batch).await {
                Ok(f) => {
                    total.rejected.extend(f.rejected);
                    total.finished_runs.extend(f.finished_runs);
                    total.queues.extend(f.queues);
                    break;
                }
                // Two flushes that locked the same rows in another order: nothing is
                // wrong with the batch, so apply it again.
                Err(sqlx::Error::Database(db))
                    if matches!(db.code().as_deref(), Some("40P01" | "40001")) =>
                {
                    debug!(error = %db, "pgflow: flush conflicted with another; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(sqlx::Error::Database(db)) if is_content_error(&*db) && batch.len() > 1 => {
                    debug!(error = %db, "pgflow: flush rejected; splitting the batch");
                    let mut batch = batch;
                    let half = batch.split_off(batch.len() / 2);
                    pending.push(half);
                    pending.push(batch);
                    break;
                }
                Err(sqlx::Error::Database(db)) if is_content_error(&*db) => {
                    let mut c = batch.into_iter().next().expect("a batch of one");
                    if matches!(
                        c.outcome,
                        Outcome::Failed { .. } | Outcome::Discard | Outcome::Release
                    ) {
                        warn!(error = %db, task_id = c.task_id, "pgflow: a completion could not be applied; its lease will return the task");
                        break;
                    }
                    let e = StepError::permanent(format!(
                        "the database refused the step's result: {db}"
                    ));
                    let attempt = u32::try_from(c.attempt).unwrap_or(1);
                    c.outcome = Outcome::Failed {
                        history: vec![AttemptFailure::new(attempt, &e)],
                        element: c.element.and_then(|e| usize::try_from(e).ok()),
                    };
                    pending.push(vec![c]);
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "pgflow: flush failed; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }
    total
}

/// Whether the database refused a flush for what it contains (a value it cannot
/// store, a constraint, a limit) rather than for its state (restart, failover,
/// timeouts, lack of resources), which a retry outlives.
fn is_content_error(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.code().is_some_and(|c| {
        ["21", "22", "23", "54"]
            .iter()
            .any(|class| c.starts_with(class))
    })
}

/// Turns `NOTIFY pgflow_tasks` into local wake-ups. Reconnects on its own.
pub(crate) async fn listener(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown_rx();
    let mut backoff = Backoff::new();
    while !*shutdown.borrow() {
        let mut listener = match sqlx::postgres::PgListener::connect_with(&inner.pool).await {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "pgflow: cannot LISTEN; polling until it can");
                sleep_or_shutdown(backoff.next(), &mut shutdown).await;
                continue;
            }
        };
        if let Err(e) = listener.listen(CHANNEL).await {
            warn!(error = %e, "pgflow: LISTEN failed");
            sleep_or_shutdown(backoff.next(), &mut shutdown).await;
            continue;
        }
        backoff.reset();
        // After (re)connecting, notifications may have been missed: look now.
        inner.wake_all();
        loop {
            tokio::select! {
                n = listener.try_recv() => match n {
                    Ok(Some(n)) => inner.wake_queue(n.payload()),
                    Ok(None) => { inner.wake_all(); }
                    Err(e) => {
                        warn!(error = %e, "pgflow: LISTEN connection lost; reconnecting");
                        break;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Runs the rescue every `rescue_interval` (see [`rescue_once`]) and heartbeats
/// every `heartbeat_interval`.
pub(crate) async fn rescuer(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown_rx();
    let mut backoff = Backoff::new();
    loop {
        sleep_or_shutdown(inner.config.rescue_interval, &mut shutdown).await;
        if *shutdown.borrow() {
            return;
        }
        match rescue_once(&inner, None).await {
            Ok(n) => {
                backoff.reset();
                if n > 0 {
                    debug!(tasks = n, "pgflow: rescued tasks returned to the queue");
                }
            }
            Err(e) => {
                warn!(error = %e, "pgflow: rescue failed");
                sleep_or_shutdown(backoff.next(), &mut shutdown).await;
            }
        }
    }
}

/// Heartbeats this instance with its load until shutdown.
///
/// It keeps beating during a graceful shutdown's drain (shutdown stops it right
/// before marking the instance offline), so a long drain is not mistaken for death.
pub(crate) async fn heartbeat(inner: Arc<Inner>) {
    loop {
        tokio::time::sleep(inner.config.heartbeat_interval).await;
        let load = inner.executing.load(Ordering::Relaxed);
        if let Err(e) = crate::instances::heartbeat(&inner.pool, &inner.instance_id, load).await {
            warn!(error = %e, "pgflow: heartbeat failed");
        }
    }
}

/// Advisory lock key under which one instance at a time rescues ("pgflow" in ASCII).
const RESCUE_LOCK: i64 = 0x7067_666c_6f77;

/// A claimed task to give back.
#[derive(sqlx::FromRow)]
struct Stranded {
    id: i64,
    token: i64,
    run_id: i64,
    step: i16,
    workflow: String,
    version: i32,
    attempt: i32,
    max: i32,
    errors: Option<String>,
    owner: Option<String>,
    owner_offline: bool,
    /// For an element task of a map step: its index.
    element: Option<i32>,
}

/// One rescue, in one transaction under an advisory lock (one instance at a time):
/// instances silent for longer than `offline_after` are marked offline; tasks they
/// had claimed, and tasks whose lease expired, go back to the queue with the attempt
/// counted (or fail their run when it was the last attempt). With `owner`, only the
/// claims of that instance id are given back (a restart taking over a dead id).
/// Everything goes through the fenced flush: a task completed meanwhile (its claim
/// token gone) is left alone.
pub(crate) async fn rescue_once(inner: &Inner, owner: Option<&str>) -> Result<usize, sqlx::Error> {
    let mut tx = inner.pool.begin().await?;
    // The periodic rescue skips a round another instance is doing; a takeover waits
    // for it, so that the dead predecessor's claims are surely given back.
    let locked: bool = if owner.is_some() {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(RESCUE_LOCK)
            .execute(&mut *tx)
            .await?;
        true
    } else {
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RESCUE_LOCK)
            .fetch_one(&mut *tx)
            .await?
    };
    if !locked {
        return Ok(0);
    }
    let offline_ms = i64::try_from(inner.config.offline_after.as_millis()).unwrap_or(i64::MAX);
    let gone: Vec<String> = sqlx::query_scalar(
        "UPDATE pgflow.instances SET status = 'offline', load = 0
         WHERE status = 'online' AND last_heartbeat < now() - interval '1 millisecond' * $1
         RETURNING id",
    )
    .bind(offline_ms)
    .fetch_all(&mut *tx)
    .await?;
    for id in &gone {
        warn!(instance = %id, "pgflow: instance missed its heartbeats; marked offline, its tasks return to the queue");
    }
    let c = &inner.catalog.claim;
    let rows: Vec<Stranded> = sqlx::query_as(
        "SELECT t.id, t.claim_token AS token, t.run_id, t.step, t.workflow, t.version,
                t.attempt, t.max_attempts AS max, t.errors::text AS errors,
                t.claimed_by AS owner, COALESCE(i.status = 'offline', false) AS owner_offline,
                t.element
         FROM pgflow.tasks t
         LEFT JOIN pgflow.instances i ON i.id = t.claimed_by
         WHERE t.claimed_by IS NOT NULL
           AND CASE WHEN $3::text IS NULL
                    THEN t.lease_until < now() OR i.status = 'offline'
                    ELSE t.claimed_by = $3 END
           AND (t.workflow, t.version) IN
               (SELECT DISTINCT * FROM unnest($1::text[], $2::int[]))
         ORDER BY t.lease_until
         LIMIT 1000
         FOR UPDATE OF t SKIP LOCKED",
    )
    .bind(&c.step_workflow)
    .bind(&c.step_version)
    .bind(owner)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let mut batch = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(flow) = inner.catalog.get(&r.workflow, r.version) else {
            continue;
        };
        let Some(def) = usize::try_from(r.step)
            .ok()
            .and_then(|s| flow.def.steps().get(s))
        else {
            continue;
        };
        let attempt = u32::try_from(r.attempt).unwrap_or(1);
        let who = r.owner.unwrap_or_default();
        let why = if r.owner_offline || owner.is_some() {
            format!("instance `{who}` died while running the step (it stopped heartbeating)")
        } else {
            format!("lease expired: instance `{who}` did not complete the step in time")
        };
        let e = StepError::from_parts(ErrorKind::Timeout, why, None);
        let failure = AttemptFailure::new(attempt, &e);
        let outcome = if r.attempt < r.max {
            Outcome::Retry {
                delay: policy::retry_delay(def.options(), attempt, &e),
                failure,
            }
        } else {
            let mut history: Vec<AttemptFailure> = r
                .errors
                .as_deref()
                .and_then(|e| serde_json::from_str(e).ok())
                .unwrap_or_default();
            history.push(failure);
            Outcome::Failed {
                history,
                element: r.element.and_then(|e| usize::try_from(e).ok()),
            }
        };
        batch.push(Completion {
            task_id: r.id,
            token: r.token,
            run_id: r.run_id,
            step: r.step,
            element: r.element,
            flow: (flow.def.name(), r.version),
            attempt: r.attempt,
            outcome,
            cost_cents: 0,
        });
    }
    let n = batch.len();
    let flushed = match queue::apply(&mut tx, &inner.catalog, &inner.instance_id, &batch).await {
        Ok(f) => {
            tx.commit().await?;
            f
        }
        Err(sqlx::Error::Database(db)) if is_content_error(&*db) => {
            // Something in the batch cannot be applied as a whole: keep the
            // offline marks, then give the tasks back through the flush path that
            // splits a batch down to the completion at fault.
            drop(tx);
            debug!(error = %db, "pgflow: rescue batch refused; applying it piecewise");
            sqlx::query(
                "UPDATE pgflow.instances SET status = 'offline', load = 0
                 WHERE status = 'online' AND last_heartbeat < now() - interval '1 millisecond' * $1",
            )
            .bind(offline_ms)
            .execute(&inner.pool)
            .await?;
            flush_resilient(inner, batch).await
        }
        Err(e) => return Err(e),
    };
    inner.wake_waiters(&flushed.finished_runs);
    for q in flushed.queues {
        inner.wake_queue(&q);
    }
    Ok(n)
}

/// Tables the maintainer vacuums, with the dead-row count that triggers it.
const VACUUM_TABLES: &[(&str, i64)] = &[
    ("tasks", 20_000),
    ("step_states", 100_000),
    ("runs", 100_000),
];

/// Keeps the hot tables small: vacuums `pgflow.tasks` (and the other pgflow tables)
/// once enough rows died. The queue deletes every finished task and rewrites claimed
/// ones, so without vacuum the claim index fills with dead entries and throughput
/// decays; this does not rely on the server's autovacuum being on or quick enough.
/// `SKIP_LOCKED` makes a vacuum that another instance is running a no-op here.
pub(crate) async fn maintainer(inner: Arc<Inner>) {
    let Some(interval) = inner.config.vacuum_interval else {
        return;
    };
    let mut shutdown = inner.shutdown_rx();
    loop {
        sleep_or_shutdown(interval, &mut shutdown).await;
        if *shutdown.borrow() {
            return;
        }
        let dead: Vec<(String, i64)> = match sqlx::query_as(
            "SELECT relname::text, n_dead_tup FROM pg_stat_user_tables WHERE schemaname = 'pgflow'",
        )
        .fetch_all(&inner.pool)
        .await
        {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, "pgflow: reading table statistics failed");
                continue;
            }
        };
        for (table, threshold) in VACUUM_TABLES {
            let n = dead.iter().find(|(t, _)| t == table).map_or(0, |d| d.1);
            if n < *threshold {
                continue;
            }
            // Identifiers cannot be bound; these are constants of this module.
            let sql = format!("VACUUM (SKIP_LOCKED) pgflow.{table}");
            let started = Instant::now();
            match sqlx::query(&sql).execute(&inner.pool).await {
                Ok(_) => debug!(
                    table,
                    dead = n,
                    ms = started.elapsed().as_millis() as u64,
                    "pgflow: vacuumed"
                ),
                Err(e) => debug!(table, error = %e, "pgflow: vacuum failed"),
            }
        }
    }
}
