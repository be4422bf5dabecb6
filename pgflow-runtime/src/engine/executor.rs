//! Executing one claimed task: build the step's inputs from the stored JSON (passed
//! through as raw JSON, deserialized once, by the step's typed entry), run one
//! attempt under `pgflow`'s policy (timeout, panics, backoff), classify the result
//! and hand the completion to the flusher.

use std::sync::Arc;

use pgflow::engine::{StepInputs, StepOutput, StepValue, policy};
use pgflow::{AttemptFailure, CostMeter, ParamSource, RunId, StepContext, StepDef, StepError};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{Instrument, info, info_span, warn};

use crate::RunStatus;
use crate::catalog::Entry;
use crate::engine::{Engine, FlushMsg, InFlight};
use crate::store::flush::{ChildRun, Completion, Outcome};
use crate::store::tasks::Claimed;
use crate::store::{step_i16, stored_attempts};

/// Runs one claimed task and hands its completion to the flusher; the slot
/// (`permit`) is free again once the completion has a place among those awaiting
/// their flush (see `Engine::unflushed`).
pub(crate) async fn run(
    engine: Arc<Engine>,
    task: Claimed,
    token: i64,
    permit: OwnedSemaphorePermit,
) {
    let span = info_span!("pgflow.step", workflow = %task.workflow, run_id = task.run_id, step = task.step, element = task.element, attempt = task.attempt);
    // a child of the span that started the run (feature `otel`)
    crate::otel::set_parent(&span, task.trace_context.as_deref());
    let key = (task.task_id, token);
    let cost = CostMeter::new();
    let flow = engine.catalog.get(&task.workflow, task.version);
    let workflow = flow.map_or("", |f| f.def.name());
    let step_name = flow.map_or("?", |f| f.step_name(task.step));
    engine.metrics.claimed(workflow, step_name, task.wait_secs);
    let version = task.version;
    // Executing now: the load the heartbeat reports.
    if let Ok(mut m) = engine.in_flight.lock() {
        m.insert(
            key,
            InFlight {
                run_id: task.run_id,
                step: task.step,
                element: task.element,
                workflow,
                version,
            },
        );
    }
    let began = std::time::Instant::now();
    let (outcome, lent) = attempt(&engine, flow, &task, token, cost.clone())
        .instrument(span)
        .await;
    engine.metrics.attempt(
        workflow,
        step_name,
        crate::metrics::outcome_label(&outcome),
        began.elapsed().as_secs_f64(),
    );
    let completion = Completion {
        task_id: task.task_id,
        token,
        run_id: task.run_id,
        step: task.step,
        element: task.element,
        workflow,
        version,
        attempt: task.attempt,
        outcome,
        cost_cents: cost.total(),
        usage: cost.usage(),
    };
    // A transactional step's completion is applied in the attempt's own transaction,
    // with the step's writes; what else it comes to goes to the flusher as usual.
    let completion = match lent {
        // (the futures of paths most tasks never take are boxed where they are
        // awaited: a task's future is moved into its task when spawned, and its size
        // is that of the largest await in it)
        Some(lent) => match Box::pin(commit_with_writes(&engine, lent, completion)).await {
            None => {
                if let Ok(mut m) = engine.in_flight.lock() {
                    m.remove(&key);
                }
                drop(permit);
                return;
            }
            Some(c) => c,
        },
        None => completion,
    };
    if let Ok(mut m) = engine.in_flight.lock() {
        m.remove(&key);
    }
    // A place among the completions not durable yet (see `Engine::unflushed`): while
    // the flusher is behind, this waits, holding the slot, so claims stop.
    let place = Arc::clone(&engine.unflushed).acquire_owned().await.ok();
    if engine
        .completions
        .send(FlushMsg::Completion(completion, place))
        .is_err()
    {
        warn!("pgflow: completion dropped: the flusher stopped (its lease will expire)");
    }
    drop(permit);
}

/// Applies a transactional step's completion in the transaction its attempt wrote in,
/// and commits both; `None` once done. A completion that does not end well (a
/// failure, a retry, a claim lost to the fence) rolls the writes back and is handed
/// back for the flusher (`Some`), as is a success the database refuses: it becomes
/// the step's failure, without its writes. A transient error (a lost connection, a
/// deadlock) gives the task back, attempt not counted: it runs again, writes and all.
async fn commit_with_writes(
    engine: &Engine,
    (lent, _permit): Lent,
    mut completion: Completion,
) -> Option<Completion> {
    let ends_well = matches!(
        completion.outcome,
        Outcome::Succeeded(_) | Outcome::Skipped { .. } | Outcome::StartChild(_) | Outcome::FanOut
    );
    let Some(pg) = lent.into_inner::<crate::PgTransaction>() else {
        // still borrowed (cannot be: the attempt ended) or not ours: nothing to commit
        warn!("pgflow: a step's transaction was not given back; its writes are rolled back");
        completion.outcome = Outcome::Release;
        return Some(completion);
    };
    let mut tx = pg.into_inner();
    if !ends_well {
        drop(tx); // rolled back
        return Some(completion);
    }
    let notify_all = &mut |_: &str| true;
    let applied = crate::store::flush::apply(
        &mut tx,
        &engine.catalog,
        &engine.instance_id,
        std::slice::from_ref(&completion),
        notify_all,
    )
    .await;
    match applied {
        Ok(flushed) if flushed.rejected.is_empty() => match tx.commit().await {
            Ok(()) => {
                crate::engine::flusher::after_flush(engine, &flushed, 1);
                None
            }
            // The server or the connection went away mid-commit: whether it
            // committed is unknown. Give the task back: if it did commit, the task
            // row is gone and the fence rejects the rerun's completion; if not, the
            // step runs again from a clean slate.
            Err(e) if crate::store::is_transient(&e) => {
                warn!(error = %e, "pgflow: committing a transactional step failed; it runs again");
                completion.outcome = Outcome::Release;
                Some(completion)
            }
            // Refused at commit (a deferred constraint of the step's writes): the
            // step fails, without its writes.
            Err(e) => Some(completion.refused(&e, "the step's result or writes")),
        },
        // The claim was lost: neither the writes nor the completion apply. The
        // flusher records what the attempt reported (it was paid for) and rejects it.
        Ok(_) => {
            drop(tx);
            Some(completion)
        }
        Err(e) => {
            drop(tx);
            if !crate::store::is_transient(&e) && !crate::store::is_conflict(&e) {
                // what the step left its transaction in (an error it swallowed, a
                // value refused): it fails, without its writes
                return Some(completion.refused(&e, "the step's result or writes"));
            }
            // the database away, or a deadlock with another flush: the whole
            // transaction is gone; the step runs again, writes and all
            warn!(error = %e, "pgflow: applying a transactional step failed; it runs again");
            completion.outcome = Outcome::Release;
            Some(completion)
        }
    }
}

/// One attempt of the task's step, classified, with the transaction it wrote in
/// for a transactional step.
async fn attempt(
    engine: &Engine,
    flow: Option<&Entry>,
    task: &Claimed,
    token: i64,
    cost: CostMeter,
) -> (Outcome, Option<Lent>) {
    let mut lent = None;
    let outcome = attempt_in(engine, flow, task, token, cost, &mut lent).await;
    (outcome, lent)
}

/// A transactional step's transaction, and its place in the pool's transactional
/// share.
type Lent = (pgflow::Transaction, OwnedSemaphorePermit);

/// [`attempt`]; a transactional step's transaction is left in `lent`.
async fn attempt_in(
    engine: &Engine,
    flow: Option<&Entry>,
    task: &Claimed,
    token: i64,
    cost: CostMeter,
    lent: &mut Option<Lent>,
) -> Outcome {
    if !matches!(task.run_status.parse::<RunStatus>(), Ok(RunStatus::Running)) {
        return Outcome::Discard;
    }
    let attempt = u32::try_from(task.attempt).unwrap_or(1).max(1);
    let element = task.element.and_then(|e| usize::try_from(e).ok());
    let fail_now = |e: StepError| {
        let mut history = stored_attempts(task.errors.as_deref());
        history.push(AttemptFailure::new(attempt, &e));
        Outcome::Failed { history, element }
    };
    let Some(flow) = flow else {
        return fail_now(StepError::permanent(format!(
            "workflow `{}` version {} is not registered in this instance",
            task.workflow, task.version
        )));
    };
    let Some(step) = usize::try_from(task.step).ok().and_then(|s| flow.step(s)) else {
        return fail_now(StepError::permanent(format!(
            "step {} does not exist",
            task.step
        )));
    };
    if let Some(child) = task.child_run_id {
        return Box::pin(child_outcome(engine, child))
            .await
            .unwrap_or_else(fail_now);
    }
    if step.map().is_some() && element.is_none() {
        return unfanned_map(step, task).unwrap_or_else(fail_now);
    }
    let inputs = match build_inputs(flow.def.name(), step, task) {
        Ok(i) => i,
        Err(e) => return fail_now(e),
    };
    if task.budgeted {
        if let Some(refused) = Box::pin(reserve(engine, flow, step, task, token)).await {
            return refused;
        }
    }
    if !step.limits().is_empty() {
        if let Some(waits) = Box::pin(reserve_limits(engine, flow, step, task, token)).await {
            return waits;
        }
    }
    let cancel = engine.cancel_token(task.run_id);
    let mut ctx = StepContext::builder(flow.def.name(), step.name())
        .run_id(RunId(task.run_id))
        .attempt(attempt)
        .element(element)
        .data(Arc::clone(&engine.data))
        .cost(cost)
        .cancel(cancel);
    if step.transactional() {
        // a connection for the attempt's transaction, within the transactional share
        // of the pool (see `Engine::transactional`), held until its commit
        let Ok(permit) = Arc::clone(&engine.transactional).acquire_owned().await else {
            engine.release_cancel_token(task.run_id);
            return Outcome::Release;
        };
        match Box::pin(engine.pool.begin()).await {
            Ok(tx) => {
                let tx = pgflow::Transaction::new(crate::PgTransaction::new(tx));
                ctx = ctx.transaction(tx.clone());
                *lent = Some((tx, permit));
            }
            Err(e) => {
                engine.release_cancel_token(task.run_id);
                warn!(error = %e, "pgflow: could not begin a step's transaction; the task is given back");
                return Outcome::Release;
            }
        }
    }
    let result = policy::run_attempt(step, inputs, ctx.build()).await;
    engine.release_cancel_token(task.run_id);
    let result = match result {
        Ok(StepOutput::Subflow(start)) => match child_run(engine, start) {
            Ok(child) => return Outcome::StartChild(child),
            Err(e) => Err(e),
        },
        other => other,
    };
    let result = result.and_then(|out| match out {
        StepOutput::Completed(v) => {
            let json = v.to_json()?;
            // NaN and infinity serialize as `null`: only then is the output walked
            // for them (see `policy::storable`).
            if json.get().contains("null") {
                v.check_storable()?;
            }
            Ok(Some(json))
        }
        StepOutput::Skipped => Ok(None),
        StepOutput::Subflow(_) => unreachable!("a subflow is started above"),
    });
    let max = engine.config.max_output_bytes;
    let result = result.and_then(|json| match json {
        Some(j) if j.get().len() > max => Err(too_big("output", j.get().len(), max)),
        other => Ok(other),
    });
    match result {
        Ok(Some(json)) => Outcome::Succeeded(String::from(Box::<str>::from(json))),
        Ok(None) => Outcome::Skipped {
            reason: format!(
                "`when = {}` was false",
                step.predicate().unwrap_or("(no predicate)")
            ),
        },
        Err(e) => {
            let options = step.options();
            let next = match e.snoozed_for() {
                // A snooze is not an attempt; past `max_snoozes` it fails the step.
                Some(delay) => {
                    let snoozes = u32::try_from(task.snoozes).unwrap_or(u32::MAX);
                    policy::snooze(options, snoozes).map(|()| Outcome::Snooze { delay })
                }
                None if e.is_retryable() && attempt < options.max_attempts.max(1) => {
                    let delay = policy::retry_delay(options, attempt, &e);
                    info!(error = %e, retry_in_ms = delay.as_millis() as u64, "pgflow: step attempt failed; it will be retried");
                    Ok(Outcome::Retry {
                        delay,
                        failure: AttemptFailure::new(attempt, &e),
                    })
                }
                None => Err(e),
            };
            next.unwrap_or_else(|e| {
                warn!(error = %e, "pgflow: step failed for good; its run fails");
                fail_now(e)
            })
        }
    }
}

/// The step's estimates of one attempt, (cents, tokens), as stored (`bigint`).
fn estimates(step: &StepDef) -> (i64, i64) {
    let o = step.options();
    let est = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    (est(o.estimate_cents), est(o.estimate_tokens))
}

/// Reserves the step's estimates against its run's budget (see `store::budgets`).
/// `None` when the attempt may start; else what the task comes to: the run fails
/// with `BudgetExceeded`, or (the database being away) the task is given back.
async fn reserve(
    engine: &Engine,
    flow: &Entry,
    step: &StepDef,
    task: &Claimed,
    token: i64,
) -> Option<Outcome> {
    let (cents, tokens) = estimates(step);
    let result = async {
        let mut conn = engine.pool.acquire().await?;
        crate::store::budgets::reserve(&mut conn, task.run_id, (task.task_id, token), cents, tokens)
            .await
    }
    .await;
    let refusal = match result {
        Ok(None) => return None,
        Ok(Some(r)) => r,
        Err(e) => {
            warn!(error = %e, "pgflow: could not reserve a step's budget; the task is given back");
            return Some(Outcome::Release);
        }
    };
    let (unit, estimate) = if refusal.unit == "tokens" {
        (pgflow::BudgetUnit::Tokens, tokens)
    } else {
        (pgflow::BudgetUnit::Cents, cents)
    };
    Some(over_budget(
        flow,
        step,
        (pgflow::BudgetScope::Run, unit),
        [refusal.spent, refusal.reserved, estimate, refusal.budget],
    ))
}

/// A step not started for lack of budget: its run fails with `BudgetExceeded`
/// (`[spent, reserved, estimate, budget]`).
fn over_budget(
    flow: &Entry,
    step: &StepDef,
    (scope, unit): (pgflow::BudgetScope, pgflow::BudgetUnit),
    [spent, reserved, estimate, budget]: [i64; 4],
) -> Outcome {
    let error = pgflow::RunError::BudgetExceeded {
        workflow: flow.def.name().to_owned(),
        step: step.name().to_owned(),
        scope,
        unit,
        spent,
        reserved,
        estimate,
        budget,
    };
    warn!(error = %error, "pgflow: step not started: over budget; its run fails");
    Outcome::OverBudget {
        error: Box::new(error),
    }
}

/// Reserves the attempt's weight in the current window of each limit its step counts
/// against (see `crate::limits`). `None` when it may start; else the task waits for
/// the window's end (a rate limit) or its run fails (a budget per period); the
/// database being away gives the task back.
async fn reserve_limits(
    engine: &Engine,
    flow: &Entry,
    step: &StepDef,
    task: &Claimed,
    token: i64,
) -> Option<Outcome> {
    let (est_cents, est_tokens) = estimates(step);
    let key = task.key.as_deref().unwrap_or("");
    let mut wants = Vec::with_capacity(step.limits().len());
    for name in step.limits() {
        // `start` refused a served step naming an undefined limit
        let Some(l) = engine.config.limits.iter().find(|l| l.name() == *name) else {
            continue;
        };
        if wants
            .iter()
            .any(|w: &crate::store::limits::Want<'_>| w.name == *name)
        {
            continue; // named twice: counted once
        }
        wants.push(crate::store::limits::Want {
            name,
            key: if l.per_key { key } else { "" },
            period_secs: l.period_secs(),
            amount: match l.unit {
                crate::LimitUnit::Requests => 1,
                crate::LimitUnit::Tokens => est_tokens,
                crate::LimitUnit::Cents => est_cents,
            },
            max: l.max_i64(),
            unit: l.unit.as_str(),
        });
    }
    let result = async {
        let mut conn = engine.pool.acquire().await?;
        crate::store::limits::reserve(&mut conn, (task.task_id, token), &wants).await
    }
    .await;
    let full = match result {
        Ok(None) => return None,
        Ok(Some(full)) => full,
        Err(e) => {
            warn!(error = %e, "pgflow: could not reserve a step's limits; the task is given back");
            return Some(Outcome::Release);
        }
    };
    let limit = engine
        .config
        .limits
        .iter()
        .find(|l| l.name() == full.name)?;
    if !limit.fail {
        // wait for the window's end (and a little: instances waking together spread)
        let now = chrono::Utc::now();
        let wait = (full.window_end - now).to_std().unwrap_or_default();
        let delay = wait + std::time::Duration::from_millis(fastrand::u64(0..=250));
        info!(limit = %full.name, key = %full.key, wait_ms = delay.as_millis() as u64, "pgflow: step waits for its rate limit's next window");
        return Some(Outcome::Throttled { delay });
    }
    let unit = match limit.unit {
        crate::LimitUnit::Tokens => pgflow::BudgetUnit::Tokens,
        crate::LimitUnit::Cents => pgflow::BudgetUnit::Cents,
        crate::LimitUnit::Requests => pgflow::BudgetUnit::Requests,
    };
    let scope = pgflow::BudgetScope::Limit(Box::new(pgflow::LimitScope {
        name: full.name,
        key: full.key,
        period_secs: limit.period.as_secs(),
    }));
    Some(over_budget(
        flow,
        step,
        (scope, unit),
        [full.used, full.reserved, full.amount, full.max],
    ))
}

/// A stored value over `max` bytes of JSON, as a permanent error.
fn too_big(what: &str, len: usize, max: usize) -> StepError {
    StepError::permanent(format!(
        "the {what} is {len} bytes of JSON, over the {max} bytes a stored value may take \
         (PostgreSQL's `jsonb` holds about 255 MiB): pass a reference to the data \
         (a key, a URL) instead"
    ))
}

/// The child run a step asked for (`Subflow<W>`), checked: `W` is served by this
/// runtime's catalog (every linked workflow is) and its input is storable JSON.
fn child_run(engine: &Engine, start: pgflow::SubflowStart) -> Result<ChildRun, StepError> {
    let (def, input) = start.into_parts();
    if engine.catalog.flow_of(def).is_none() {
        return Err(StepError::permanent(format!(
            "subflow `{}` version {} is not registered in this runtime",
            def.name(),
            def.version()
        )));
    }
    let json = input
        .to_json()
        .map_err(|e| e.context(format_args!("the input of subflow `{}`", def.name())))?;
    if json.get().contains("null") {
        input
            .check_storable()
            .map_err(|e| e.context(format_args!("the input of subflow `{}`", def.name())))?;
    }
    let max = engine.config.max_output_bytes;
    if json.get().len() > max {
        return Err(too_big(
            &format!("input of subflow `{}`", def.name()),
            json.get().len(),
            max,
        ));
    }
    Ok(ChildRun {
        workflow: def.name(),
        version: crate::store::version_i32(def.version()),
        input: String::from(Box::<str>::from(json)),
    })
}

/// How the task of a step that started child run `child` goes on, now that it was
/// woken: with the child's output when it succeeded, failing with its error (wrapped
/// with its workflow and id) when it failed or was cancelled, parked again while it
/// still runs. A database error gives the task back (it is claimed again).
async fn child_outcome(engine: &Engine, child: i64) -> Result<Outcome, StepError> {
    let row = match crate::store::runs::outcome(&engine.pool, child).await {
        Ok(row) => row,
        Err(e) => {
            warn!(error = %e, child_run_id = child, "pgflow: could not read a child run; the task is given back");
            return Ok(Outcome::Release);
        }
    };
    let Some(row) = row else {
        return Err(StepError::permanent(format!(
            "child run {child} no longer exists (pruned or deleted)"
        )));
    };
    let error = match row.status.parse::<RunStatus>() {
        Ok(RunStatus::Running) => {
            return Ok(Outcome::AwaitChild {
                child_run_id: child,
            });
        }
        Ok(RunStatus::Succeeded) => {
            return Ok(Outcome::Succeeded(
                row.output.unwrap_or_else(|| "null".to_owned()),
            ));
        }
        Ok(RunStatus::Cancelled) => pgflow::RunError::Cancelled {
            workflow: row.workflow.clone(),
        },
        Ok(RunStatus::Failed) | Err(_) => row
            .error
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok())
            .unwrap_or_else(|| pgflow::RunError::Internal {
                workflow: row.workflow.clone(),
                message: format!("unreadable stored error: {}", row.error.unwrap_or_default()),
            }),
    };
    Err(pgflow::engine::child_failed(
        &row.workflow,
        Some(child),
        &error,
    ))
}

/// A map step's task without an element: the enqueue found nothing to fan out (an
/// empty array, which completes the step with `[]`, or something that is not an
/// array, which fails it); a non-empty array (from a task enqueued before the
/// fan-out moved into SQL) is fanned out by the flush.
fn unfanned_map(step: &StepDef, task: &Claimed) -> Result<Outcome, StepError> {
    let map = step
        .map()
        .ok_or_else(|| StepError::permanent(format!("`{}` is not a map step", step.name())))?;
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
        Outcome::FanOut
    })
}

/// The stored JSON that feeds a parameter: the run input, a parent's output (`None`
/// when that parent was skipped) or the payload of the signal the step waited for.
fn source_json<'t>(
    source: ParamSource,
    name: &str,
    task: &'t Claimed,
) -> Result<Option<&'t str>, StepError> {
    match source {
        ParamSource::Input => task.input.as_deref().map(Some).ok_or_else(|| {
            StepError::permanent(format!("the run input for `{name}` was not loaded"))
        }),
        // `null` when the step's timeout passed first (the parameter is an `Option`)
        ParamSource::Signal => Ok(Some(task.signal.as_deref().unwrap_or("null"))),
        ParamSource::Step(i) => {
            let want = step_i16(i);
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

/// The step's inputs as raw JSON, each deserialized once by the step's entry.
fn build_inputs(
    workflow: &'static str,
    step: &'static StepDef,
    task: &Claimed,
) -> Result<StepInputs, StepError> {
    // Postgres wrote this text from a `jsonb`: no validation pass before the typed
    // entry parses it.
    let raw = |json: &str| StepValue::Stored(json.into());
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
        values.push(json.map(raw));
    }
    Ok(StepInputs::with_skipped(workflow, step.name(), values))
}
