//! The claimer of one queue: claims due tasks while it has free slots (a semaphore
//! of the queue's concurrency) and spawns one execution per task.
//!
//! Claims run on a connection of their own (`store::tasks::claim_connection`), one
//! statement per batch, woken by notifications, local wake-ups or the poll interval.

use std::sync::Arc;

use tokio::sync::Semaphore;
use tracing::warn;

use crate::engine::{Backoff, Engine, executor, sleep_or_shutdown};
use crate::store::tasks::{self, ClaimRequest};

/// The most tasks one claim of a fair queue takes (less when `claim_batch` is
/// less): the fair pick's cost grows faster than its batch (per-key picks of two
/// shares each, ranked and sorted), so two claims of 128 beat one of 256. Measured
/// with 256 slots, tenant A's 100,000 runs and B's trickle: at most 500 a claim, A
/// ran at 0.68 of the plain queue and B's p99 was 4x its own alone; at most 128, A at
/// 0.86-1.04 and B at 2.0-2.9x.
const FAIR_CLAIM_BATCH: usize = 128;

/// The most keys one claim of a fair queue serves: a claim walks one index probe per
/// key; the next claim goes on after the last key it served.
const FAIR_KEYS_PER_CLAIM: i64 = 64;

/// Where a fair queue's next claim starts its rotation: at the last key this claim
/// served in its own rotation (the keys below `cursor`, downwards, then wrapping
/// around from the last key down to `cursor`), so the keys below it come first next
/// time; unchanged when it served no key.
fn next_cursor(cursor: &str, claimed: &[tasks::Claimed]) -> String {
    let keys = claimed.iter().filter_map(|t| t.key.as_deref());
    // the wrapped part (keys from the cursor up) comes last in the rotation
    let wrapped = keys.clone().filter(|k| *k >= cursor).min();
    wrapped
        .or_else(|| keys.filter(|k| *k < cursor).min())
        .map_or_else(|| cursor.to_owned(), str::to_owned)
}

/// Claims tasks of `queue` while there are free slots, and spawns their executions;
/// at shutdown, waits (up to the grace) until every execution gave its slot back.
pub(crate) async fn run(engine: Arc<Engine>, queue: String, concurrency: usize) {
    let slots = Arc::new(Semaphore::new(concurrency));
    let waker = engine.waker(&queue);
    let mut shutdown = engine.shutdown_rx();
    let mut conn = None;
    let mut backoff = Backoff::new();
    // A fair queue serves keys after this one next (round robin across claims).
    let key_limit = engine
        .config
        .key_limits
        .iter()
        .find(|(q, _)| *q == queue)
        .map(|(_, n)| i32::try_from(*n).unwrap_or(i32::MAX));
    let fair = key_limit.is_some() || engine.config.fair_queues.contains(&queue);
    let mut cursor = String::new();
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
        let batch = if fair {
            engine.config.claim_batch.min(FAIR_CLAIM_BATCH)
        } else {
            engine.config.claim_batch
        };
        let limit = free.min(batch);
        let c = match &mut conn {
            Some(c) => c,
            None => match tasks::claim_connection(&engine.pool).await {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    warn!(queue = %queue, error = %e, "pgflow: cannot open a claim connection; retrying");
                    sleep_or_shutdown(backoff.next(), &mut shutdown).await;
                    continue;
                }
            },
        };
        // One random token per batch: see `store::tasks` on fencing.
        let token = fastrand::i64(1..);
        let req = ClaimRequest {
            instance: &engine.instance_id,
            token,
            queue: &queue,
            limit,
            fair: fair.then_some((cursor.as_str(), FAIR_KEYS_PER_CLAIM)),
            key_limit,
        };
        match tasks::claim(c, &engine.catalog, req).await {
            Ok(claimed) => {
                backoff.reset();
                if fair {
                    cursor = next_cursor(&cursor, &claimed);
                }
                let got = claimed.len();
                if got > 0 {
                    Engine::count(&engine.counters.claims, 1);
                    Engine::count(&engine.counters.tasks_claimed, got as u64);
                }
                for task in claimed {
                    // Cannot fail: the claim took at most `free` tasks and only this
                    // loop takes permits. Should it ever, the task's lease returns it.
                    let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                        break;
                    };
                    tokio::spawn(executor::run(Arc::clone(&engine), task, token, permit));
                }
                // There may be more; a fair claim may also take less than its limit
                // while more is due (a key with fewer tasks than its share).
                if got == limit || (fair && got > 0 && slots.available_permits() > 0) {
                    continue;
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
            _ = tokio::time::sleep(engine.config.poll_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(engine.config.shutdown_grace, slots.acquire_many(all)).await;
}
