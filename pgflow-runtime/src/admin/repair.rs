//! Repairs: [`retry`] a failed or cancelled run from where it stopped, [`fork`] a
//! run into a new one from a chosen step, [`cancel`] a running one.
//!
//! Retry and fork share one move, [`enqueue_frontier`]: given which steps of a run
//! are done (their outputs or skips stored), it re-creates the join counters of the
//! others and enqueues the ready ones, resuming a map step whose completed elements
//! were kept by enqueueing only its missing elements.

use std::collections::{HashMap, HashSet};

use pgflow::{Definition, Plan, RunId};
use serde::Serialize;
use sqlx::{PgConnection, PgPool};

use crate::admin::runs::load_definition;
use crate::catalog::step_rows;
use crate::store::tasks::{self, NewTasks};
use crate::store::{StepState, notify, runs, step_i16, step_index, steps, version_i32};
use crate::{Error, RunStatus};

/// What [`retry`] did.
#[derive(Debug, Clone, Serialize)]
pub struct RetryReport {
    /// The run, running again.
    pub id: i64,
    /// Its workflow.
    pub workflow: String,
    /// Steps whose stored outputs (or skips) are reused (not run again).
    pub reused: Vec<String>,
    /// Failed steps (and map steps with no completed element) whose state was
    /// cleared: they run again from scratch.
    pub cleared: Vec<String>,
    /// Map steps resumed: their completed elements are kept, the others run again.
    pub resumed: Vec<ResumedMap>,
    /// Steps enqueued now (their parents are all done), resumed map steps included.
    pub enqueued: Vec<String>,
    /// Its failed or cancelled child runs (subflows, and theirs), retried with it.
    pub children: Vec<i64>,
}

/// A map step that a [`retry`] resumed.
#[derive(Debug, Clone, Serialize)]
pub struct ResumedMap {
    /// The step.
    pub step: String,
    /// Elements whose stored outputs are kept.
    pub kept: i64,
    /// Elements enqueued to run again.
    pub rerun: i64,
}

/// Re-runs a failed or cancelled run from its frontier: every completed step's
/// stored output and every skipped step's decision are reused, a map step keeps its
/// completed elements and runs only the others, and the steps that failed (or never
/// ran) run again with a fresh attempt budget.
///
/// In one transaction, holding the run's row lock: checks that the run is `failed`
/// or `cancelled`; deletes every task row the run still has (an attempt still
/// executing somewhere then has its completion rejected by the claim fence, so
/// nothing it does applies; the step is enqueued afresh instead); clears the failed
/// step states (a map step with no completed element is cleared too and fans out
/// again in full); sets the run back to `running` with no error and no completion
/// time (its cost so far is kept); re-creates the join counters of the steps not
/// done and enqueues every step whose parents are all done (a map step that kept
/// completed elements gets tasks for its missing elements only). Workers are
/// notified at commit.
///
/// ```no_run
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
/// let report = pgflow_runtime::admin::retry(&pool, pgflow::RunId(42)).await?;
/// for m in &report.resumed {
///     println!("{}: {} elements kept, {} run again", m.step, m.kept, m.rerun);
/// }
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::RunNotFound`]; [`Error::NotFailed`] for a run that is running or
/// succeeded; [`Error::MissingDefinition`]; [`Error::Definition`] for a stored step
/// table or step state retry cannot use; database errors.
pub async fn retry(pool: &PgPool, id: RunId) -> Result<RetryReport, Error> {
    let mut tx = pool.begin().await?;
    let report = retry_in(&mut tx, id).await?;
    tx.commit().await?;
    Ok(report)
}

/// [`retry`] in the caller's transaction; its failed or cancelled child runs
/// (subflows) are retried first, so the steps that started them find them running
/// again (a step never starts a second child).
fn retry_in<'c>(
    tx: &'c mut PgConnection,
    id: RunId,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<RetryReport, Error>> + Send + 'c>> {
    Box::pin(async move {
        let mut report = retry_one(&mut *tx, id).await?;
        for child in runs::unfinished_children(&mut *tx, id.0).await? {
            let r = retry_in(&mut *tx, RunId(child)).await?;
            report.children.push(r.id);
            report.children.extend(r.children);
        }
        Ok(report)
    })
}

async fn retry_one(tx: &mut PgConnection, id: RunId) -> Result<RetryReport, Error> {
    let run = runs::detail(&mut *tx, id.0, true)
        .await?
        .ok_or(Error::RunNotFound(id))?
        .run;
    if run.status != RunStatus::Failed.as_str() && run.status != RunStatus::Cancelled.as_str() {
        return Err(Error::NotFailed {
            id,
            status: run.status,
        });
    }
    let (def, plan) = load_definition(&mut *tx, &run.workflow, run.version).await?;
    let refuse = |message: String| Error::Definition {
        workflow: run.workflow.clone(),
        version: run.version,
        message,
    };
    let n = def.steps.len();

    tasks::delete_of_run(&mut *tx, id.0).await?;
    let elements: HashMap<i16, i64> = steps::elements_of_run(&mut *tx, id.0)
        .await?
        .into_iter()
        .map(|e| (e.step, e.completed))
        .collect();
    let mut done = vec![false; n];
    let mut keep = vec![false; n];
    let mut cleared = Vec::new();
    for s in steps::of_run(&mut *tx, id.0).await? {
        let i = step_index(s.step)
            .filter(|&i| i < n)
            .ok_or_else(|| refuse(format!("run {id} has a state for unknown step {}", s.step)))?;
        match StepState::from_name(&s.status) {
            Some(StepState::Completed | StepState::Skipped) => done[i] = true,
            Some(StepState::Waiting) => {}
            Some(StepState::Failed | StepState::Running) => {
                if def.steps[i].map.is_some() && elements.get(&s.step).is_some_and(|&k| k > 0) {
                    keep[i] = true;
                } else {
                    cleared.push(i);
                }
            }
            None => {
                return Err(refuse(format!(
                    "step `{}` of run {id} is in state `{}`, which retry does not know",
                    def.steps[i].name, s.status
                )));
            }
        }
    }
    let cleared_steps: Vec<i16> = cleared.iter().map(|&i| step_i16(i)).collect();
    steps::clear(&mut *tx, id.0, &cleared_steps).await?;
    runs::reopen(&mut *tx, id.0).await?;
    let frontier = enqueue_frontier(&mut *tx, id.0, run.version, &def, &plan, &done, &keep).await?;
    if frontier.ready.is_empty() {
        return Err(refuse(format!(
            "run {id} has no step left to run; it cannot be retried"
        )));
    }

    let name = |i: usize| def.steps[i].name.clone();
    let resumed = frontier
        .resumed
        .iter()
        .map(|&(i, rerun)| ResumedMap {
            step: name(i),
            kept: elements.get(&step_i16(i)).copied().unwrap_or(0),
            rerun,
        })
        .collect();
    cleared.extend(frontier.restarted.iter().copied());
    cleared.sort_unstable();
    Ok(RetryReport {
        id: id.0,
        reused: plan
            .order()
            .iter()
            .filter(|&&i| done[i])
            .map(|&i| name(i))
            .collect(),
        cleared: cleared.into_iter().map(name).collect(),
        resumed,
        enqueued: frontier.ready.into_iter().map(name).collect(),
        workflow: run.workflow,
        children: Vec::new(),
    })
}

/// What [`enqueue_frontier`] did.
#[derive(Debug, Default)]
pub(crate) struct Frontier {
    /// Steps enqueued (resumed map steps included), in graph order.
    pub(crate) ready: Vec<usize>,
    /// Map steps resumed, with the number of elements enqueued.
    pub(crate) resumed: Vec<(usize, i64)>,
    /// Map steps that were to be resumed but had no element left to run: their
    /// elements were cleared and they fan out again in full.
    pub(crate) restarted: Vec<usize>,
}

/// Enqueues the frontier of running run `run_id` of the stored definition `def`
/// at `version`: `done[i]` says step `i`'s output (or skip) is stored. Sets the join
/// counters of the steps not done (parents still to complete) and enqueues every
/// step not done whose parents all are. A ready map step with `keep[i]` has
/// completed elements stored: only its missing elements are enqueued. Notifies the
/// queues that got tasks (delivered at commit).
pub(crate) async fn enqueue_frontier(
    conn: &mut PgConnection,
    run_id: i64,
    version: i32,
    def: &Definition,
    plan: &Plan,
    done: &[bool],
    keep: &[bool],
) -> Result<Frontier, Error> {
    let mut join_steps = Vec::new();
    let mut join_remaining = Vec::new();
    let mut frontier = Frontier::default();
    for &i in plan.order() {
        if done[i] {
            continue;
        }
        let left = plan.parents(i).iter().filter(|&&p| !done[p]).count();
        if plan.is_join(i) {
            join_steps.push(step_i16(i));
            join_remaining.push(i32::try_from(left).unwrap_or(i32::MAX));
        }
        if left == 0 {
            frontier.ready.push(i);
        }
    }
    steps::set_joins(&mut *conn, run_id, &join_steps, &join_remaining).await?;
    let rows = step_rows(def);
    let mut new = NewTasks::default();
    let mut resumed_any = false;
    for &i in &frontier.ready {
        let row = &rows[i];
        if let (true, Some(map_from)) = (keep[i], row.map_from) {
            let m = steps::ResumeMap {
                run_id,
                step: step_i16(i),
                workflow: &def.name,
                version,
                queue: &def.queue,
                priority: row.priority,
                max_attempts: row.max_attempts,
                map_from,
            };
            let rerun = steps::resume_map(&mut *conn, &m).await?;
            if rerun > 0 {
                frontier.resumed.push((i, rerun));
                resumed_any = true;
                continue;
            }
            // Every element has an output, yet the step did not complete: run it
            // again in full.
            steps::clear(&mut *conn, run_id, &[step_i16(i)]).await?;
            frontier.restarted.push(i);
        }
        new.push_row(run_id, i, (&def.name, version, &def.queue), row);
    }
    let mut due = tasks::enqueue(&mut *conn, &new).await?;
    if resumed_any && !due.contains(&def.queue) {
        due.push(def.queue.clone());
    }
    notify::queues(conn, &due.iter().map(String::as_str).collect::<Vec<_>>()).await?;
    Ok(frontier)
}

/// How to [`fork`] a run.
#[derive(Debug, Clone, Default)]
pub struct ForkOptions {
    /// The new run's input; `None` takes the original's. Steps upstream of the fork
    /// step keep the outputs they computed from the original input. It is not
    /// checked against the workflow's input type here (this works from the stored
    /// definition): a step that cannot read it fails with the mismatch, stored like
    /// any step error. [`Runtime::fork`](crate::Runtime::fork) checks it first.
    pub input: Option<serde_json::Value>,
    /// The workflow version of the new run (it must be stored, i.e. some instance
    /// registered it); `None` keeps the original's.
    pub version: Option<u32>,
}

/// What [`fork`] did.
#[derive(Debug, Clone, Serialize)]
pub struct ForkReport {
    /// The new run.
    pub id: i64,
    /// The run it was forked from.
    pub forked_from: i64,
    /// The workflow.
    pub workflow: String,
    /// The new run's version.
    pub version: i32,
    /// The step it runs again from.
    pub from: String,
    /// Steps whose stored outputs (or skips) were copied from the original.
    pub reused: Vec<String>,
    /// Steps that run: the fork step, its descendants and any step upstream of it
    /// that had no stored output to copy.
    pub rerun: Vec<String>,
    /// Steps enqueued now.
    pub enqueued: Vec<String>,
}

/// Starts a new run from run `id`, reusing the stored output (or skip) of every step
/// that is not `from` or downstream of it, and running `from` and everything
/// downstream again — after fixing a step's code, or with another input. The new run
/// records `forked_from` and `forked_at`; the original is not touched (it may be in
/// any state: only its completed and skipped steps are copied). Signals the original
/// accepted are not copied: a step that runs again and waits for a signal waits for
/// a new one (send it to the new run).
///
/// With [`ForkOptions::version`], the new run targets another stored version of the
/// workflow. Every step it would reuse must exist there with the same kind and
/// output type (a step new in that version simply runs), and without a new input the
/// input type must match; otherwise the fork is refused with every difference.
///
/// ```no_run
/// use pgflow_runtime::admin::{self, ForkOptions};
/// # async fn demo(pool: sqlx::PgPool) -> Result<(), pgflow_runtime::Error> {
/// // Run 42's `summarize` had a bug fixed in version 2: redo it and what follows,
/// // keeping the (paid-for) outputs of the steps before it.
/// let opts = ForkOptions { version: Some(2), ..ForkOptions::default() };
/// let fork = admin::fork(&pool, pgflow::RunId(42), "summarize", opts).await?;
/// println!("run {} reuses {:?}", fork.id, fork.reused);
/// # Ok(()) }
/// ```
///
/// # Errors
///
/// [`Error::RunNotFound`]; [`Error::MissingDefinition`] for a version never
/// registered; [`Error::UnknownStep`]; [`Error::Incompatible`]; database errors.
pub async fn fork(
    pool: &PgPool,
    id: RunId,
    from: &str,
    options: ForkOptions,
) -> Result<ForkReport, Error> {
    let input = options.input.as_ref().map(ToString::to_string);
    let mut conn = pool.acquire().await?;
    fork_on(&mut conn, id, from, input.as_deref(), options.version, None).await
}

/// [`fork`] on `conn` (in one transaction of its own), with the input as JSON text;
/// `workflow`, when given, is the workflow the caller expects the run to be of.
pub(crate) async fn fork_on(
    conn: &mut PgConnection,
    id: RunId,
    from: &str,
    input: Option<&str>,
    version: Option<u32>,
    workflow: Option<&str>,
) -> Result<ForkReport, Error> {
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let source = runs::detail(&mut tx, id.0, false)
        .await?
        .ok_or(Error::RunNotFound(id))?
        .run;
    if let Some(expected) = workflow.filter(|w| *w != source.workflow) {
        return Err(Error::WrongWorkflow {
            id,
            expected: expected.to_owned(),
            actual: source.workflow,
        });
    }
    let (sdef, splan) = load_definition(&mut tx, &source.workflow, source.version).await?;
    let to = version.map_or(source.version, version_i32);
    let (tdef, tplan) = if to == source.version {
        (sdef.clone(), splan)
    } else {
        load_definition(&mut tx, &source.workflow, to).await?
    };
    let start = tdef.step_index(from).ok_or_else(|| Error::UnknownStep {
        workflow: tdef.name.clone(),
        version: to,
        step: from.to_owned(),
        known: tdef
            .steps
            .iter()
            .map(|s| s.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
    })?;

    // The fork step and everything downstream of it run again.
    let mut downstream = HashSet::from([start]);
    let mut stack = vec![start];
    while let Some(i) = stack.pop() {
        for &c in tplan.children(i) {
            if downstream.insert(c) {
                stack.push(c);
            }
        }
    }
    let mut differences = Vec::new();
    if input.is_none() && tdef.input != sdef.input {
        differences.push(format!(
            "the input type is `{}` in version {} and `{}` in version {to}; give an input",
            sdef.input, source.version, tdef.input
        ));
    }
    let (mut from_steps, mut to_steps) = (Vec::new(), Vec::new());
    for (i, step) in tdef.steps.iter().enumerate() {
        if downstream.contains(&i) {
            continue;
        }
        let Some(j) = sdef.step_index(&step.name) else {
            continue; // new in this version: it runs
        };
        let old = &sdef.steps[j];
        if old.kind != step.kind || old.output != step.output {
            differences.push(format!(
                "step `{}` is a {} step returning `{}` in version {} but a {} step returning \
                 `{}` in version {to}",
                step.name,
                old.kind.as_str(),
                old.output,
                source.version,
                step.kind.as_str(),
                step.output
            ));
            continue;
        }
        from_steps.push(step_i16(j));
        to_steps.push(step_i16(i));
    }
    if !differences.is_empty() {
        return Err(Error::Incompatible {
            id,
            workflow: source.workflow,
            from: source.version,
            to,
            differences,
        });
    }

    let fork = runs::NewFork {
        source: id.0,
        workflow: &tdef.name,
        version: to,
        input,
        from,
    };
    let new_id = runs::insert_fork(&mut tx, &fork)
        .await?
        .ok_or(Error::RunNotFound(id))?;
    let mut done = vec![false; tdef.steps.len()];
    for s in steps::copy_done(&mut tx, id.0, new_id, &from_steps, &to_steps).await? {
        if let Some(d) = step_index(s).and_then(|i| done.get_mut(i)) {
            *d = true;
        }
    }
    let keep = vec![false; tdef.steps.len()];
    let frontier = enqueue_frontier(&mut tx, new_id, to, &tdef, &tplan, &done, &keep).await?;
    tx.commit().await?;

    let name = |i: usize| tdef.steps[i].name.clone();
    Ok(ForkReport {
        id: new_id,
        forked_from: id.0,
        workflow: tdef.name.clone(),
        version: to,
        from: from.to_owned(),
        reused: tplan
            .order()
            .iter()
            .filter(|&&i| done[i])
            .map(|&i| name(i))
            .collect(),
        rerun: tplan
            .order()
            .iter()
            .filter(|&&i| !done[i])
            .map(|&i| name(i))
            .collect(),
        enqueued: frontier.ready.into_iter().map(name).collect(),
    })
}

/// [`runs::cancel`], again when it lost a deadlock or serialization conflict (with
/// a flush that parks a task of the tree it cancels, which locks in another order):
/// the flush is retried by its flusher, the cancel here.
pub(crate) async fn cancel_retrying(
    pool: &PgPool,
    id: RunId,
) -> Result<Option<runs::Cancelled>, Error> {
    let mut tries = 0;
    loop {
        match runs::cancel(pool, id.0).await {
            Err(e) if crate::store::is_conflict(&e) && tries < 5 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(10 << tries)).await;
            }
            other => return Ok(other?),
        }
    }
}

/// What [`cancel`] did.
#[derive(Debug, Clone, Serialize)]
pub struct CancelReport {
    /// The run.
    pub id: i64,
    /// False when the run was already cancelled.
    pub cancelled: bool,
    /// Its child runs (subflows, and theirs) cancelled with it.
    pub children: Vec<i64>,
}

/// Cancels a running run: it is marked `cancelled` and its queued tasks are
/// deleted, so no further step starts; its child runs (subflows) are cancelled
/// with it. Steps executing right now finish (a runtime
/// in another process is not interrupted) and their results are discarded.
/// Cancelling a cancelled run changes nothing.
///
/// # Errors
///
/// [`Error::RunNotFound`]; [`Error::NotRunning`] for a run that succeeded or
/// failed; database errors.
pub async fn cancel(pool: &PgPool, id: RunId) -> Result<CancelReport, Error> {
    let row = cancel_retrying(pool, id)
        .await?
        .ok_or(Error::RunNotFound(id))?;
    match row.status.parse::<RunStatus>() {
        Ok(RunStatus::Running | RunStatus::Cancelled) => Ok(CancelReport {
            id: id.0,
            cancelled: row.cancelled,
            children: row.ids.into_iter().filter(|&r| r != id.0).collect(),
        }),
        _ => Err(Error::NotRunning {
            id,
            status: row.status,
        }),
    }
}
