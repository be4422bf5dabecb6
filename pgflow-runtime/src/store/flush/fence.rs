//! Phase 1 of the flush: the fence. A completion applies only where its task row
//! still carries the claim token it was claimed with (see `store::tasks` on why
//! tokens are random and per batch): final completions delete their row, retries,
//! snoozes and releases put it back (parked when due more than a second ahead), as
//! do subflow starts (their task is then linked to its child, see `subflows`);
//! anything else is rejected and changes nothing.

use std::collections::HashMap;

use foldhash::HashMapExt as _;

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::{Completion, Flushed, Outcome};
use crate::store::limits;
use crate::store::millis;

/// Phase 1: deletes the rows of final completions and puts back those of retries
/// and releases, each only where the row still carries the completion's token.
/// Returns the completions that passed, each (task, token) once.
pub(super) async fn fence<'b>(
    conn: &mut PgConnection,
    batch: &'b [Completion],
    out: &mut Flushed,
) -> Result<Vec<Applied<'b>>, sqlx::Error> {
    let (requeued, finals): (Vec<&Completion>, Vec<&Completion>) =
        batch.iter().partition(|c| c.outcome.requeues());
    // The claims that passed, keyed by (task, claim token): two completions of one
    // task from two claims (a stale one and a fresh one) must not both pass. The
    // value is when the attempt started (its claim), for a completion that ends its
    // task.
    let mut accepted: foldhash::HashMap<(i64, i64), Passed> =
        foldhash::HashMap::with_capacity(batch.len());
    // Concurrency slots the ended claims held (queues with a key limit), and the
    // limits' reservations (task, token, hold).
    let mut slots: Vec<(String, String)> = Vec::new();
    let mut held: Vec<(i64, i64, limits::Hold)> = Vec::new();
    if !finals.is_empty() {
        let ids: Vec<i64> = finals.iter().map(|c| c.task_id).collect();
        let tokens: Vec<i64> = finals.iter().map(|c| c.token).collect();
        // By primary key. A step completed from its child run (a subflow) started
        // when the child did.
        let query = sqlx::query(
            "DELETE FROM pgflow.tasks t
             USING unnest($1::bigint[], $2::bigint[]) AS c(id, token)
             WHERE t.id = c.id AND t.claim_token = c.token
             RETURNING t.id, c.token,
                       CASE WHEN t.child_run_id IS NULL THEN t.claimed_at
                            ELSE (SELECT r.created_at FROM pgflow.runs r
                                  WHERE r.id = t.child_run_id) END AS started_at,
                       t.reserved_cents, t.reserved_tokens,
                       CASE WHEN t.holds_slot THEN t.queue END AS slot_queue,
                       CASE WHEN t.holds_slot THEN t.key END AS slot_key,
                       t.limit_holds::text AS limit_holds",
        )
        .bind(&ids)
        .bind(&tokens);
        let rows: Vec<Deleted> = crate::store::fetch_by_position(query, &mut *conn).await?;
        slots.extend(
            rows.iter()
                .filter_map(|d| Some((d.slot_queue.clone()?, d.slot_key.clone()?))),
        );
        for d in &rows {
            let hs = limits::holds(d.limit_holds.as_deref());
            held.extend(hs.into_iter().map(|h| (d.id, d.token, h)));
        }
        accepted.extend(rows.into_iter().map(|d| {
            (
                (d.id, d.token),
                (
                    d.started_at,
                    Released::of(d.reserved_cents, d.reserved_tokens),
                ),
            )
        }));
    }
    if !requeued.is_empty() {
        let mut rows = RequeueRows::default();
        for c in &requeued {
            rows.push(c);
        }
        // A task parking for a child run is due only once linked (see `link`).
        let parking: std::collections::HashSet<i64> = requeued
            .iter()
            .filter(|c| c.outcome.parks_for_child())
            .map(|c| c.task_id)
            .collect();
        for r in rows.apply(conn).await? {
            if let (Some(q), Some(k)) = (&r.slot_queue, &r.slot_key) {
                slots.push((q.clone(), k.clone()));
            }
            held.extend(
                limits::holds(r.limit_holds.as_deref())
                    .into_iter()
                    .map(|h| (r.id, r.token, h)),
            );
            let released = Released::of(r.reserved_cents, r.reserved_tokens);
            accepted.insert((r.id, r.token), (None, released));
            if r.due && !parking.contains(&r.id) {
                out.queues.insert(r.queue);
            }
        }
    }
    crate::store::slots::release(conn, &slots).await?;
    if !held.is_empty() {
        // settled to what each attempt reported (the completion that applies for its
        // claim: a real one over a shutdown's release of the same claim)
        let by_claim: HashMap<(i64, i64), &Completion> =
            once_per_claim(batch, |claim| accepted.contains_key(claim))
                .into_iter()
                .map(|c| (c.claim(), c))
                .collect();
        let settled: Vec<(limits::Hold, i64)> = held
            .into_iter()
            .map(|(id, token, h)| {
                let used = by_claim
                    .get(&(id, token))
                    .map_or(0, |c| used_by(c, &h.unit));
                (h, used)
            })
            .collect();
        limits::settle(conn, &settled).await?;
    }
    out.rejected = batch
        .iter()
        .filter(|c| !accepted.contains_key(&c.claim()))
        .map(|c| (c.task_id, c.workflow, c.version, c.step))
        .collect();
    Ok(once_per_claim(batch, |claim| accepted.contains_key(claim))
        .into_iter()
        .map(|c| {
            let (started_at, released) = accepted.get(&c.claim()).copied().unwrap_or_default();
            Applied {
                completion: c,
                started_at,
                released,
            }
        })
        .collect())
}

/// What the fence learned of a claim that passed: when its attempt started (for a
/// completion that ends its task), and the reservation it releases.
type Passed = (Option<DateTime<Utc>>, Released);

/// A task row deleted by a final completion.
struct Deleted {
    id: i64,
    token: i64,
    started_at: Option<DateTime<Utc>>,
    reserved_cents: Option<i64>,
    reserved_tokens: Option<i64>,
    /// The (queue, key) of the concurrency slot its claim held.
    slot_queue: Option<String>,
    slot_key: Option<String>,
    /// What its attempt reserved of the runtime's limits.
    limit_holds: Option<String>,
}

crate::store::by_position!(Deleted {
    id,
    token,
    started_at,
    reserved_cents,
    reserved_tokens,
    slot_queue,
    slot_key,
    limit_holds,
});

/// What an attempt used, in a limit's unit.
fn used_by(c: &Completion, unit: &str) -> i64 {
    match unit {
        "requests" => 1,
        "tokens" => c
            .usage
            .iter()
            .map(|u| u.tokens_in.saturating_add(u.tokens_out))
            .fold(0_u64, u64::saturating_add)
            .try_into()
            .unwrap_or(i64::MAX),
        _ => c.cost_cents,
    }
}

/// A completion that passed the fence.
pub(super) struct Applied<'b> {
    pub(super) completion: &'b Completion,
    /// When its attempt started (its claim), for a completion that ends its task.
    pub(super) started_at: Option<DateTime<Utc>>,
    /// What its attempt had reserved of its run's budget, released now.
    pub(super) released: Released,
}

/// A reservation released by the fence: (cents, tokens).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Released {
    pub(super) cents: i64,
    pub(super) tokens: i64,
}

impl Released {
    fn of(cents: Option<i64>, tokens: Option<i64>) -> Self {
        Self {
            cents: cents.unwrap_or(0),
            tokens: tokens.unwrap_or(0),
        }
    }
}

/// The completions to apply: each accepted claim once, even if the batch held it
/// twice; a final completion wins over a release or retry of the same claim (a
/// shutdown gives back a claim whose real completion may sit in the same batch, in
/// either order: its row was deleted by the final one, which must apply).
fn once_per_claim(
    batch: &[Completion],
    accepted: impl Fn(&(i64, i64)) -> bool,
) -> Vec<&Completion> {
    let mut chosen: foldhash::HashMap<(i64, i64), usize> =
        foldhash::HashMap::with_capacity(batch.len());
    for (i, c) in batch.iter().enumerate() {
        if !accepted(&c.claim()) {
            continue;
        }
        chosen
            .entry(c.claim())
            .and_modify(|k| {
                if batch[*k].outcome.requeues() && !c.outcome.requeues() {
                    *k = i;
                }
            })
            .or_insert(i);
    }
    let mut picked: Vec<usize> = chosen.into_values().collect();
    picked.sort_unstable();
    picked.into_iter().map(|i| &batch[i]).collect()
}

/// A task put back in the queue.
#[derive(sqlx::FromRow)]
struct Requeued {
    id: i64,
    token: i64,
    queue: String,
    /// Due now (a release, or a retry without backoff).
    due: bool,
    /// What the attempt had reserved of its run's budget (released).
    reserved_cents: Option<i64>,
    reserved_tokens: Option<i64>,
    /// The (queue, key) of the concurrency slot its claim held (released).
    slot_queue: Option<String>,
    slot_key: Option<String>,
    /// What its attempt reserved of the runtime's limits (settled).
    limit_holds: Option<String>,
}

/// Tasks going back to the queue, as bind arrays.
#[derive(Default)]
struct RequeueRows {
    ids: Vec<i64>,
    tokens: Vec<i64>,
    delays_ms: Vec<i64>,
    errors: Vec<Option<String>>,
    /// Whether the attempt counts (a retry) or not (a snooze, a release).
    counted: Vec<bool>,
    /// Whether it snoozed.
    snoozed: Vec<bool>,
    /// Whether it waits `delay_ms` (a retry, a snooze, a throttle) rather than
    /// keeping its due time (a release).
    delayed: Vec<bool>,
}

impl RequeueRows {
    fn push(&mut self, c: &Completion) {
        self.ids.push(c.task_id);
        self.tokens.push(c.token);
        match &c.outcome {
            Outcome::Retry { delay, failure } => {
                self.delays_ms.push(millis(*delay));
                self.errors.push(Some(
                    serde_json::to_string(&[failure]).unwrap_or_else(|_| "[]".to_owned()),
                ));
                self.counted.push(true);
                self.snoozed.push(false);
                self.delayed.push(true);
            }
            Outcome::Snooze { delay } => {
                self.delays_ms.push(millis(*delay));
                self.errors.push(None);
                self.counted.push(false);
                self.snoozed.push(true);
                self.delayed.push(true);
            }
            Outcome::Throttled { delay } => {
                self.delays_ms.push(millis(*delay));
                self.errors.push(None);
                self.counted.push(false);
                self.snoozed.push(false);
                self.delayed.push(true);
            }
            _ => {
                self.delays_ms.push(0);
                self.errors.push(None);
                self.counted.push(false);
                self.snoozed.push(false);
                self.delayed.push(false);
            }
        }
    }

    /// Puts the rows back (fenced on the token, by primary key); returns each row
    /// put back.
    async fn apply(&self, conn: &mut PgConnection) -> Result<Vec<Requeued>, sqlx::Error> {
        sqlx::query_as(
            "UPDATE pgflow.tasks t
             SET claimed_by = NULL, claim_token = NULL, claimed_at = NULL, lease_until = NULL,
                 reserved_cents = NULL, reserved_tokens = NULL, holds_slot = NULL,
                 limit_holds = NULL,
                 attempt = t.attempt + CASE WHEN c.counted THEN 1 ELSE 0 END,
                 snoozes = t.snoozes + CASE WHEN c.snoozed THEN 1 ELSE 0 END,
                 run_at = CASE WHEN c.delayed
                               THEN now() + interval '1 millisecond' * c.delay_ms
                               ELSE t.run_at END,
                 -- a put back due more than a second ahead leaves `tasks_available`
                 parked = c.delayed AND c.delay_ms > 1000,
                 errors = CASE WHEN c.err IS NULL THEN t.errors
                               ELSE COALESCE(t.errors, '[]'::jsonb) || c.err::jsonb END
             FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::text[], $5::bool[],
                         $6::bool[], $7::bool[])
                  AS c(id, token, delay_ms, err, counted, snoozed, delayed),
                  -- the row as it was (this statement's snapshot): what it had reserved
                  pgflow.tasks o
             WHERE t.id = c.id AND t.claim_token = c.token AND o.id = t.id
             RETURNING t.id, c.token, t.queue, t.run_at <= now() AS due,
                       o.reserved_cents, o.reserved_tokens,
                       CASE WHEN o.holds_slot THEN t.queue END AS slot_queue,
                       CASE WHEN o.holds_slot THEN t.key END AS slot_key,
                       o.limit_holds::text AS limit_holds",
        )
        .bind(&self.ids)
        .bind(&self.tokens)
        .bind(&self.delays_ms)
        .bind(&self.errors)
        .bind(&self.counted)
        .bind(&self.snoozed)
        .bind(&self.delayed)
        .fetch_all(conn)
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    fn completion(task_id: i64, outcome: Outcome) -> Completion {
        Completion {
            task_id,
            token: 7,
            run_id: 1,
            step: 0,
            element: None,
            workflow: "w",
            version: 1,
            attempt: 1,
            outcome,
            cost_cents: 0,
            usage: Vec::new(),
        }
    }

    #[test]
    fn a_final_completion_wins_over_a_release_of_the_same_claim_in_either_order() {
        let accepted = HashSet::from([(1, 7), (2, 7)]);
        for batch in [
            vec![
                completion(1, Outcome::Release),
                completion(1, Outcome::Succeeded("1".into())),
            ],
            vec![
                completion(1, Outcome::Succeeded("1".into())),
                completion(1, Outcome::Release),
            ],
        ] {
            let picked = once_per_claim(&batch, |k| accepted.contains(k));
            assert_eq!(picked.len(), 1);
            assert!(matches!(picked[0].outcome, Outcome::Succeeded(_)));
        }
        // a claim that was not accepted applies nothing; duplicates apply once
        let batch = vec![
            completion(3, Outcome::Succeeded("3".into())),
            completion(2, Outcome::Discard),
            completion(2, Outcome::Discard),
        ];
        let picked = once_per_claim(&batch, |k| accepted.contains(k));
        assert_eq!(picked.len(), 1);
        assert_eq!(picked[0].task_id, 2);
    }
}
