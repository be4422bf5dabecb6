//! The scheduler: fires the cron schedules this instance registers in code.
//!
//! It sleeps until the earliest `next_tick` of its schedules (by the database's
//! clock; at most [`MAX_SLEEP`], so a schedule another instance changed is seen
//! soon), then fires each due one in its own transaction: lock the row (`FOR UPDATE
//! SKIP LOCKED`: a row another instance is firing is skipped), compute the ticks to
//! fire by the missed-tick policy *stored in the row* (the row is the truth every
//! instance follows; the code only gives each tick's input), start one run per
//! tick through the one start statement (`store::runs::start`) with the tick's
//! idempotency key, and advance the row — all committed together. So every tick
//! starts exactly one run across any number of instances, and since `next_tick` is
//! stored, a restart of every instance loses no tick beyond what the policy says.
//! Nothing here holds a worker slot.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{error, info, warn};

use crate::engine::{Backoff, Engine, Every, sleep_or_shutdown};
use crate::schedule::{Rule, Schedule, tick_key};
use crate::store::schedules::{self, DueRow};
use crate::store::{is_transient, runs};

/// The longest sleep between two looks at the schedules.
const MAX_SLEEP: Duration = Duration::from_secs(5);
/// The most ticks of one schedule one transaction starts ([`Missed::RunEach`]
/// catching up); the rest follow in the next transactions.
///
/// [`Missed::RunEach`]: crate::Missed::RunEach
const MAX_TICKS_PER_PASS: usize = 100;
/// The most schedule transactions of one pass before the sleep is recomputed.
const MAX_FIRES_PER_PASS: usize = 1_000;

pub(crate) async fn run(engine: Arc<Engine>, schedules: Arc<[Schedule]>) {
    if schedules.is_empty() {
        return;
    }
    let mut shutdown = engine.shutdown_rx();
    let mut backoff = Backoff::new();
    let mut warned = Every::default();
    loop {
        if *shutdown.borrow() {
            return;
        }
        let wait = match pass(&engine, &schedules, &mut warned).await {
            Ok(wait) => {
                backoff.reset();
                wait
            }
            Err(e) => {
                warn!(error = %e, "pgflow: firing schedules failed; retrying");
                backoff.next()
            }
        };
        sleep_or_shutdown(wait, &mut shutdown).await;
    }
}

/// Fires every due schedule of `schedules`, then returns how long to sleep.
async fn pass(
    engine: &Engine,
    schedules: &[Schedule],
    warned: &mut Every<String>,
) -> Result<Duration, sqlx::Error> {
    let names: Vec<&str> = schedules.iter().map(Schedule::name).collect();
    let workflows: Vec<&str> = schedules.iter().map(|s| s.workflow().name()).collect();
    // Schedules whose firing failed for what they contain: not retried in this pass.
    let mut excluded: Vec<String> = Vec::new();
    for _ in 0..MAX_FIRES_PER_PASS {
        let mut tx = engine.pool.begin().await?;
        let Some(row) = schedules::lock_due(&mut tx, &names, &workflows, &excluded).await? else {
            break;
        };
        let Some(schedule) = schedules.iter().find(|s| s.name() == row.name) else {
            excluded.push(row.name);
            continue;
        };
        match fire(engine, &mut tx, schedule, &row).await {
            Ok(()) => tx.commit().await?,
            Err(e) if is_transient(&e) => return Err(e),
            Err(e) => {
                drop(tx);
                if warned.due(row.name.clone(), Duration::from_secs(60)) {
                    error!(schedule = %row.name, error = %e, "pgflow: firing a schedule failed");
                }
                excluded.push(row.name);
                continue;
            }
        }
        engine.wake_queue(schedule.workflow().queue());
    }
    let (next, now) = schedules::earliest(&engine.pool, &names, &workflows).await?;
    Ok(sleep_until(next, now, engine.config.poll_interval))
}

/// How long to sleep when the earliest next tick is `next` and the database's clock
/// says `now`: until the tick (a few ms past it, the clocks being apart by the time
/// the answer took), at most [`MAX_SLEEP`]; a tick already due is being fired by
/// another instance (or failed here): look again after `poll`.
fn sleep_until(next: Option<DateTime<Utc>>, now: DateTime<Utc>, poll: Duration) -> Duration {
    match next {
        None => MAX_SLEEP,
        Some(t) if t <= now => poll.max(Duration::from_millis(50)).min(MAX_SLEEP),
        Some(t) => (t - now)
            .to_std()
            .map_or(MAX_SLEEP, |d| d + Duration::from_millis(5))
            .min(MAX_SLEEP),
    }
}

/// Fires one due schedule, locked by the caller's transaction: starts the runs of
/// its due ticks and advances its row.
async fn fire(
    engine: &Engine,
    tx: &mut sqlx::PgConnection,
    schedule: &Schedule,
    row: &DueRow,
) -> Result<(), sqlx::Error> {
    let stored = Rule::parse(&row.cron, &row.time_zone, &row.missed, row.grace_ms);
    let rule = match &stored {
        Ok(r) => r,
        Err(e) => {
            warn!(schedule = %row.name, error = %e, "pgflow: the stored schedule does not parse; firing it by the definition in this binary");
            schedule.rule()
        }
    };
    let due = rule.due(row.next_tick, row.now, MAX_TICKS_PER_PASS);
    let def = schedule.workflow();
    let mut new = runs::NewRuns::default();
    let mut previous = row.last_tick;
    let mut last_key = None;
    for &at in &due.ticks {
        let tick = rule.tick(&row.name, at, previous);
        match schedule.input(&tick) {
            Ok(input) => {
                let key = tick_key(&row.name, at);
                // a workflow's key fn sees the tick's input (one that does not
                // deserialize has no key: the run still starts, and its first step
                // reports the input)
                let run_key = def.key_of(&input).ok().flatten();
                new.push(
                    input,
                    runs::RunOptions {
                        idempotency_key: Some(key.clone()),
                        key: run_key,
                        ..runs::RunOptions::default()
                    },
                );
                last_key = Some((at, key));
                previous = Some(at);
            }
            // The function fails the same way on every instance: the tick is lost.
            Err(e) => error!(
                schedule = %row.name,
                tick = %at.to_rfc3339(),
                error = %e,
                "pgflow: no input for a schedule's tick; the tick starts no run"
            ),
        }
    }
    let (mut last_tick, mut last_run_id) = (row.last_tick, row.last_run_id);
    if let Some((at, key)) = last_key {
        let Some(flow) = engine.catalog.flow_of(def) else {
            // Not retried: `start` checked that every schedule's workflow is linked.
            return Err(sqlx::Error::Configuration(
                format!(
                    "schedule `{}`: workflow `{}` is not in this runtime's catalog",
                    row.name,
                    def.name()
                )
                .into(),
            ));
        };
        let started = runs::start(tx, &runs::Shape::of_entry(flow), &new).await?;
        last_run_id = runs::by_idempotency_key(tx, def.name(), &key).await?;
        last_tick = Some(at);
        info!(
            schedule = %row.name,
            workflow = def.name(),
            ticks = due.ticks.len(),
            started = started.len(),
            tick = %at.to_rfc3339(),
            run_id = last_run_id,
            "pgflow: schedule fired"
        );
    } else if due.ticks.is_empty() {
        info!(
            schedule = %row.name,
            missed = %row.next_tick.to_rfc3339(),
            "pgflow: schedule skipped missed ticks"
        );
    }
    if due.next.is_none() {
        info!(schedule = %row.name, "pgflow: schedule has no tick left");
    }
    schedules::advance(tx, &row.name, due.next, last_tick, last_run_id).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn sleeps_until_the_next_tick_within_bounds() {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let poll = Duration::from_millis(250);
        let in_2s = now + chrono::Duration::seconds(2);
        assert_eq!(
            sleep_until(Some(in_2s), now, poll),
            Duration::from_millis(2_005)
        );
        let in_1h = now + chrono::Duration::hours(1);
        assert_eq!(sleep_until(Some(in_1h), now, poll), MAX_SLEEP);
        assert_eq!(sleep_until(None, now, poll), MAX_SLEEP);
        assert_eq!(sleep_until(Some(now), now, poll), poll);
    }
}
