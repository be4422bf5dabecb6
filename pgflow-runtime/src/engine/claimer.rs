//! The claimer of one queue: claims due tasks while it has free slots (a semaphore
//! of the queue's concurrency) and spawns one execution per task.
//!
//! Claims run on a connection of their own (`store::tasks::claim_connection`), one
//! statement per batch, woken by notifications, local wake-ups or the poll interval.
//! A fair queue also has an express claimer (see [`express`]): a few tasks at once
//! when they become due while the claimer is busy with a full batch. Both take
//! their slots before they claim, so together they never run more than the queue's
//! concurrency.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Semaphore;
use tracing::warn;

use crate::engine::{Backoff, Engine, executor, sleep_or_shutdown};
use crate::store::tasks::{self, ClaimRequest};

/// The most tasks one claim of a fair queue takes (less when `claim_batch` is
/// less): the fair pick's cost grows faster than its batch (per-key picks of two
/// shares each, ranked and sorted). Measured with 256 slots, tenant A's 100,000
/// runs and B's trickle: at most 500 a claim, A ran at 0.68 of the plain queue and
/// B's p99 was 4x its own alone, against 0.86-1.04 and 2.0-2.9x at most 128 (an
/// earlier build); with express claims, 256 and 128 did not differ.
const FAIR_CLAIM_BATCH: usize = 128;

/// The most keys one claim of a fair queue serves: a claim walks one index probe per
/// key; the next claim goes on after the last key it served.
const FAIR_KEYS_PER_CLAIM: i64 = 64;

/// The most tasks one express claim takes (see [`express`]).
const EXPRESS_BATCH: usize = 8;

/// What a queue's claimers share.
struct Queue {
    engine: Arc<Engine>,
    name: String,
    /// The queue's slots: a claim takes at most the free ones.
    slots: Arc<Semaphore>,
    /// A fair queue: at most this many running tasks per key.
    key_limit: Option<i32>,
    /// Counts the claimer's claims, twice each: odd while it is in one (see
    /// [`express`]).
    claims: AtomicU64,
}

impl Queue {
    /// Claims up to `limit` tasks on `conn` (a fair claim from `cursor` when given,
    /// which then moves on), at most as many as it could take slots for first, and
    /// spawns their executions; how many it claimed.
    async fn claim(
        &self,
        conn: &mut sqlx::PgConnection,
        limit: usize,
        cursor: Option<&mut String>,
    ) -> Result<usize, sqlx::Error> {
        let engine = &self.engine;
        // The slots first: the other claimer of the queue may take some meanwhile.
        let permits: Vec<_> = (0..limit)
            .map_while(|_| Arc::clone(&self.slots).try_acquire_owned().ok())
            .collect();
        if permits.is_empty() {
            return Ok(0);
        }
        // One random token per batch: see `store::tasks` on fencing.
        let token = fastrand::i64(1..);
        let req = ClaimRequest {
            instance: &engine.instance_id,
            token,
            queue: &self.name,
            limit: permits.len(),
            fair: cursor.as_deref().map(|c| (c.as_str(), FAIR_KEYS_PER_CLAIM)),
            key_limit: self.key_limit,
        };
        let claimed = tasks::claim(conn, &engine.catalog, req).await?;
        if !claimed.is_empty() {
            Engine::count(&engine.counters.claims, 1);
            Engine::count(&engine.counters.tasks_claimed, claimed.len() as u64);
        }
        if let Some(c) = cursor {
            advance(c, &claimed);
        }
        let got = claimed.len();
        // the claim took at most one task per slot; the slots left over are freed
        for (task, permit) in claimed.into_iter().zip(permits) {
            tokio::spawn(executor::run(Arc::clone(engine), task, token, permit));
        }
        Ok(got)
    }
}

/// Where a fair queue's next claim starts its rotation: at the last key this claim
/// served in its own rotation (the keys below `cursor`, downwards, then wrapping
/// around from the last key down to `cursor`), so the keys below it come first next
/// time; unchanged when it served no key.
fn advance(cursor: &mut String, claimed: &[tasks::Claimed]) {
    let keys = claimed.iter().filter_map(|t| t.key.as_deref());
    // the wrapped part (keys from the cursor up) comes last in the rotation
    let wrapped = keys.clone().filter(|k| *k >= cursor.as_str()).min();
    if let Some(k) = wrapped.or_else(|| keys.filter(|k| *k < cursor.as_str()).min()) {
        *cursor = k.to_owned();
    }
}

/// Claims tasks of `queue` while there are free slots, and spawns their executions;
/// at shutdown, waits (up to the grace) until every execution gave its slot back.
/// A fair queue also runs an [`express`] claimer beside it.
pub(crate) async fn run(engine: Arc<Engine>, queue: String, concurrency: usize) {
    let key_limit = engine
        .config
        .key_limits
        .iter()
        .find(|(q, _)| *q == queue)
        .map(|(_, n)| i32::try_from(*n).unwrap_or(i32::MAX));
    let fair = key_limit.is_some() || engine.config.fair_queues.contains(&queue);
    let q = Arc::new(Queue {
        slots: Arc::new(Semaphore::new(concurrency)),
        name: queue,
        key_limit,
        claims: AtomicU64::new(0),
        engine,
    });
    let express_claimer = fair.then(|| tokio::spawn(express(Arc::clone(&q))));
    let engine = &q.engine;
    let waker = engine.waker(&q.name);
    let mut shutdown = engine.shutdown_rx();
    let mut conn = None;
    let mut backoff = Backoff::new();
    // A fair queue serves keys after this one next (round robin across claims).
    let mut cursor = String::new();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let free = q.slots.available_permits();
        if free == 0 {
            tokio::select! {
                permit = Arc::clone(&q.slots).acquire_owned() => drop(permit),
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
                    warn!(queue = %q.name, error = %e, "pgflow: cannot open a claim connection; retrying");
                    sleep_or_shutdown(backoff.next(), &mut shutdown).await;
                    continue;
                }
            },
        };
        q.claims.fetch_add(1, Ordering::Release);
        let claimed = q.claim(c, limit, fair.then_some(&mut cursor)).await;
        q.claims.fetch_add(1, Ordering::Release);
        match claimed {
            Ok(got) => {
                backoff.reset();
                // There may be more; a fair claim may also take less than its limit
                // while more is due (a key with fewer tasks than its share).
                if got == limit || (fair && got > 0 && q.slots.available_permits() > 0) {
                    continue;
                }
            }
            Err(e) => {
                warn!(queue = %q.name, error = %e, "pgflow: claim failed; retrying");
                conn = None;
                sleep_or_shutdown(backoff.next(), &mut shutdown).await;
                continue;
            }
        }
        tokio::select! {
            _ = waker.claim.notified() => {}
            _ = tokio::time::sleep(engine.config.poll_interval) => {}
            _ = shutdown.changed() => {}
        }
    }
    if let Some(x) = express_claimer {
        let _ = x.await;
    }
    let all = u32::try_from(concurrency).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(engine.config.shutdown_grace, q.slots.acquire_many(all)).await;
}

/// A fair queue's express claimer: when tasks become due while the claimer is in a
/// claim (under load, a claim of a full batch takes milliseconds), it claims a few
/// at once (at most [`EXPRESS_BATCH`], round robin across keys from a rotation of its
/// own) instead of leaving them to the claim after the one under way. So a key's
/// first task, started while another key's backlog keeps the claimer busy, waits for
/// one small claim, not for one and a half full ones. At most one express claim per
/// claim of the claimer (more would pay a claim's fixed cost for little: a start
/// every millisecond would make them a second claimer), none while the claimer is
/// idle (the wake-up reaches it too).
async fn express(q: Arc<Queue>) {
    let waker = q.engine.waker(&q.name);
    let mut shutdown = q.engine.shutdown_rx();
    let mut conn = None;
    let mut cursor = String::new();
    // the claimer's claim during which this one last claimed
    let mut served = 0;
    loop {
        tokio::select! {
            _ = waker.express.notified() => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            break;
        }
        let limit = q.slots.available_permits().min(EXPRESS_BATCH);
        let claim = q.claims.load(Ordering::Acquire);
        // not while the claimer is idle, nor twice during one claim of it
        if limit == 0 || claim % 2 == 0 || claim == served {
            continue;
        }
        served = claim;
        let c = match &mut conn {
            Some(c) => c,
            None => match tasks::claim_connection(&q.engine.pool).await {
                Ok(c) => conn.insert(c),
                // the claimer claims it anyway
                Err(_) => continue,
            },
        };
        if let Err(e) = q.claim(c, limit, Some(&mut cursor)).await {
            warn!(queue = %q.name, error = %e, "pgflow: express claim failed");
            conn = None;
        }
    }
}
