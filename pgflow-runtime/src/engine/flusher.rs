//! The flusher: applies completions in batches. Everything that queued up while the
//! previous flush ran goes into the next one (up to `flush_batch`), so a busy
//! instance makes few, large transactions and an idle one flushes at once.
//!
//! What the database refuses is handled here: deadlocks and serialization failures
//! are retried as they are; a batch refused for its content is split down to the
//! completion at fault, which then fails its run with the database's message; any
//! other error (a lost connection, a restart) is retried with backoff.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::engine::{Backoff, Engine, Every, FlushMsg};
use crate::store::flush::{self, Completion, Flushed, Outcome};
use crate::store::{self, is_conflict, is_content_error};

/// Receives completions and barriers until every sender is gone.
pub(crate) async fn run(engine: Arc<Engine>, mut rx: mpsc::UnboundedReceiver<FlushMsg>) {
    // At most one NOTIFY per queue per debounce interval from this flusher: NOTIFY
    // serializes committing transactions on the server, and local claimers are
    // woken directly anyway.
    let mut debounce: Every<String> = Every::default();
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut bytes = 0;
        let mut slots = Vec::new();
        let mut barriers = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                FlushMsg::Completion(c, slot) => {
                    bytes += c.size();
                    batch.push(c);
                    slots.extend(slot);
                }
                FlushMsg::Barrier(ack) => {
                    barriers.push(ack);
                    break;
                }
            }
            // Bounded in count and in bytes (PostgreSQL refuses a message over 1 GiB).
            if batch.len() < engine.config.flush_batch && bytes < engine.config.flush_batch_bytes {
                next = rx.try_recv().ok();
            }
        }
        if !batch.is_empty() {
            let size = batch.len() as u64;
            let began = std::time::Instant::now();
            let flushed = flush_resilient(&engine, batch, &mut |q| {
                debounce.due(q.to_owned(), engine.config.notify_debounce)
            })
            .await;
            engine.metrics.flush(size, began.elapsed().as_secs_f64());
            // Durable now: their places are free again.
            drop(slots);
            after_flush(&engine, &flushed, size);
        }
        for ack in barriers {
            let _ = ack.send(());
        }
    }
}

/// What follows a committed flush of `size` completions: counters, the log of
/// rejected completions and finished runs, local cancels, waiters and claimers
/// woken.
pub(crate) fn after_flush(engine: &Engine, flushed: &Flushed, size: u64) {
    let c = &engine.counters;
    Engine::count(&c.flushes, 1);
    Engine::count(
        &c.completions,
        size.saturating_sub(flushed.rejected.len() as u64),
    );
    Engine::count(&c.rejected, flushed.rejected.len() as u64);
    Engine::count(&c.runs_finished, flushed.finished_runs.len() as u64);
    for &(id, workflow, version, step) in &flushed.rejected {
        let step = engine
            .catalog
            .get(workflow, version)
            .map_or("?", |f| f.step_name(step));
        engine.metrics.rejected(workflow, step);
        warn!(
            task_id = id,
            "pgflow: completion rejected: the claim was lost (lease expired and the task was claimed again)"
        );
    }
    log_finished(flushed);
    engine.wake_waiters(&flushed.finished_runs);
    for &run in &flushed.cancelled_runs {
        engine.cancel_local(run);
    }
    engine.wake_waiters(&flushed.cancelled_runs);
    for q in &flushed.queues {
        engine.wake_queue(q);
    }
}

/// One INFO event per run that finished (and so per failed run: its error is in
/// `pgflow.runs` and in the step failure logged when it happened).
pub(crate) fn log_finished(flushed: &Flushed) {
    for (run_id, workflow) in &flushed.succeeded {
        info!(run_id, workflow, "pgflow: run succeeded");
    }
    for (run_id, workflow) in &flushed.failed {
        info!(run_id, workflow, "pgflow: run failed");
    }
}

/// Flushes `batch` in one transaction, retrying and splitting as the module docs
/// say, until every completion is applied (or rejected by its fence).
pub(crate) async fn flush_resilient(
    engine: &Engine,
    batch: Vec<Completion>,
    should_notify: &mut (dyn FnMut(&str) -> bool + Send),
) -> Flushed {
    let mut backoff = Backoff::new();
    let mut pending = vec![batch];
    let mut total = Flushed::default();
    while let Some(batch) = pending.pop() {
        let mut failures = 0;
        loop {
            match flush_once(engine, &batch, should_notify).await {
                Ok(f) => {
                    total.extend(f);
                    break;
                }
                Err(e) if is_conflict(&e) => {
                    debug!(error = %e, "pgflow: flush conflicted with another; retrying");
                    tokio::time::sleep(backoff.next()).await;
                }
                Err(e) if is_content_error(&e) && batch.len() > 1 => {
                    debug!(error = %e, "pgflow: flush rejected; splitting the batch");
                    let mut batch = batch;
                    let half = batch.split_off(batch.len() / 2);
                    pending.push(half);
                    pending.push(batch);
                    break;
                }
                Err(e) if is_content_error(&e) => {
                    if let Some(c) = batch.into_iter().next().and_then(|c| refused(c, &e)) {
                        pending.push(vec![c]);
                    }
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "pgflow: flush failed; retrying");
                    tokio::time::sleep(backoff.next()).await;
                    // Failing again and again while the database answers other
                    // statements: something in the batch breaks the connection
                    // (e.g. a message over PostgreSQL's 1 GiB limit). Split down to
                    // the completion at fault, which fails its step. Failures while
                    // the database is away do not count.
                    if store::ping(&engine.pool).await {
                        failures += 1;
                    } else {
                        failures = 0;
                    }
                    if failures >= 3 {
                        if batch.len() > 1 {
                            let mut batch = batch;
                            let half = batch.split_off(batch.len() / 2);
                            pending.push(half);
                            pending.push(batch);
                        } else if let Some(c) =
                            batch.into_iter().next().and_then(|c| refused(c, &e))
                        {
                            pending.push(vec![c]);
                        }
                        break;
                    }
                }
            }
        }
    }
    total
}

async fn flush_once(
    engine: &Engine,
    batch: &[Completion],
    should_notify: &mut (dyn FnMut(&str) -> bool + Send),
) -> Result<Flushed, sqlx::Error> {
    let mut tx = store::begin_generic(&engine.pool).await?;
    let out = flush::apply(
        &mut tx,
        &engine.catalog,
        &engine.instance_id,
        batch,
        should_notify,
    )
    .await?;
    tx.commit().await?;
    Ok(out)
}

/// A single completion the database refused for its content: a success becomes the
/// permanent failure of its step (with the database's message); a failure, discard
/// or release that cannot be applied is left to its lease (`None`).
fn refused(c: Completion, e: &sqlx::Error) -> Option<Completion> {
    if matches!(
        c.outcome,
        Outcome::Failed { .. }
            | Outcome::OverBudget { .. }
            | Outcome::Discard
            | Outcome::Release
            | Outcome::AwaitChild { .. }
    ) {
        warn!(error = %e, task_id = c.task_id, "pgflow: a completion could not be applied; its lease will return the task");
        return None;
    }
    Some(c.refused(e, "the step's result"))
}
