//! The promoter: moves parked tasks (due more than a second ahead when they were
//! enqueued or put back: step delays, delayed starts, long backoffs, snoozes) back
//! into the claim's index shortly before they are due, so that claims never walk
//! past tasks that are not due. Every instance serving queues runs it; rows are
//! taken with `SKIP LOCKED`, so several instances share the work without waiting.

use std::sync::Arc;

use tracing::debug;

use crate::engine::{Backoff, Engine, sleep_or_shutdown};
use crate::store::{notify, tasks};

/// Tasks promoted per statement; a backlog is worked through without sleeping.
const BATCH: i64 = 5_000;

pub(crate) async fn run(engine: Arc<Engine>) {
    let mut shutdown = engine.shutdown_rx();
    // Half the lead a parked task has: it is promoted at least this long before due.
    let every = tasks::PARK_AHEAD / 2;
    let mut backoff = Backoff::new();
    loop {
        if *shutdown.borrow() {
            return;
        }
        match promote(&engine).await {
            Ok(n) => {
                backoff.reset();
                if n >= BATCH {
                    continue;
                }
                sleep_or_shutdown(every, &mut shutdown).await;
            }
            Err(e) => {
                debug!(error = %e, "pgflow: promoting parked tasks failed; retrying");
                sleep_or_shutdown(backoff.next(), &mut shutdown).await;
            }
        }
    }
}

/// One pass: promotes what is about to be due (one autocommitted statement; an idle
/// pass costs one round trip) and wakes the queues (here and, by NOTIFY, everywhere)
/// of what is due already.
async fn promote(engine: &Engine) -> Result<i64, sqlx::Error> {
    let mut conn = engine.pool.acquire().await?;
    let (due, n) = tasks::promote(&mut conn, BATCH).await?;
    notify::queues(
        &mut conn,
        &due.iter().map(String::as_str).collect::<Vec<_>>(),
    )
    .await?;
    for q in &due {
        engine.wake_queue(q);
    }
    Ok(n)
}
