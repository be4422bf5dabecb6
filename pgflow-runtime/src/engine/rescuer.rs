//! The rescuer: every `rescue_interval`, gives lost claims back to the queue.
//!
//! One rescue ([`rescue_once`]) runs in one transaction under an advisory lock (one
//! instance at a time): instances silent for longer than `offline_after` are marked
//! offline; tasks they had claimed, and tasks whose lease expired, go back to the
//! queue with the attempt counted (or fail their run when it was the last attempt).
//! Everything goes through the fenced flush: a task completed meanwhile (its claim
//! token gone) is left alone.

use std::sync::Arc;

use pgflow::engine::policy;
use pgflow::{AttemptFailure, ErrorKind, StepError};
use tracing::{debug, warn};

use crate::engine::flusher::flush_resilient;
use crate::engine::{Backoff, Engine, sleep_or_shutdown};
use crate::store::flush::{self, Completion, Outcome};
use crate::store::{instances, is_content_error, step_index, stored_attempts, tasks};

pub(crate) async fn run(engine: Arc<Engine>) {
    let mut shutdown = engine.shutdown_rx();
    let mut backoff = Backoff::new();
    loop {
        sleep_or_shutdown(engine.config.rescue_interval, &mut shutdown).await;
        if *shutdown.borrow() {
            return;
        }
        match rescue_once(&engine, None).await {
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

/// One rescue (see the module docs). With `owner`, only the claims of that instance
/// id are given back, waiting for the lock: a restart taking over a dead id.
/// Returns how many tasks were handled.
pub(crate) async fn rescue_once(
    engine: &Engine,
    owner: Option<&str>,
) -> Result<usize, sqlx::Error> {
    let mut tx = engine.pool.begin().await?;
    if !tasks::lock_rescue(&mut tx, owner.is_some()).await? {
        return Ok(0);
    }
    let gone = instances::mark_silent_offline(&mut tx, engine.config.offline_after).await?;
    for id in &gone {
        warn!(instance = %id, "pgflow: instance missed its heartbeats; marked offline, its tasks return to the queue");
    }
    let rows = tasks::stranded(&mut tx, &engine.catalog, owner).await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let mut batch = Vec::with_capacity(rows.len());
    for r in rows {
        let Some(flow) = engine.catalog.get(&r.workflow, r.version) else {
            continue;
        };
        let Some(def) = step_index(r.step).and_then(|s| flow.step(s)) else {
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
        let outcome = if r.attempt < r.max_attempts {
            Outcome::Retry {
                delay: policy::retry_delay(def.options(), attempt, &e),
                failure,
            }
        } else {
            let mut history = stored_attempts(r.errors.as_deref());
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
            workflow: flow.def.name(),
            version: r.version,
            attempt: r.attempt,
            outcome,
            cost_cents: 0,
            usage: Vec::new(),
        });
    }
    let n = batch.len();
    let notify_all = &mut |_: &str| true;
    let flushed = match flush::apply(
        &mut tx,
        &engine.catalog,
        &engine.instance_id,
        &batch,
        notify_all,
    )
    .await
    {
        Ok(f) => {
            tx.commit().await?;
            f
        }
        Err(e) if is_content_error(&e) => {
            // Something in the batch cannot be applied as a whole: keep the offline
            // marks, then give the tasks back through the flush path that splits a
            // batch down to the completion at fault.
            drop(tx);
            debug!(error = %e, "pgflow: rescue batch refused; applying it piecewise");
            let mut conn = engine.pool.acquire().await?;
            instances::mark_silent_offline(&mut conn, engine.config.offline_after).await?;
            drop(conn);
            flush_resilient(engine, batch, notify_all).await
        }
        Err(e) => return Err(e),
    };
    crate::engine::flusher::log_finished(&flushed);
    engine.wake_waiters(&flushed.finished_runs);
    for q in &flushed.queues {
        engine.wake_queue(q);
    }
    Ok(n)
}
