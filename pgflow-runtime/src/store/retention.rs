//! Retention: pruning finished runs older than a cutoff, in small batches, by one
//! instance at a time, without an index of its own.
//!
//! Run ids grow with creation time, and a run that finished before the cutoff was
//! created before it. So the runs to prune lie below the first id created at or
//! after the cutoff — found by a binary search of primary-key probes
//! ([`id_bound`]) — and a batch is a primary-key range scan from the lowest id
//! ([`prune_batch`]): no index on `created_at` or `completed_at` (which would cost
//! every start and every finish) and no scan of recent runs.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

/// The advisory lock that makes one pruner run at a time (any value unlikely to
/// clash with an application's: "pgflow prune" in ASCII, folded).
const PRUNE_LOCK: i64 = 0x7067_666C_6F77_7072;

/// Takes the pruning lock for the current transaction; false when another
/// instance holds it.
pub(crate) async fn try_lock(conn: &mut PgConnection) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(PRUNE_LOCK)
        .fetch_one(conn)
        .await
}

/// The smallest run id created at or after `cutoff` (or one past the largest id):
/// every run that finished before `cutoff` has a smaller id. A binary search over
/// the id range, each probe one primary-key lookup (the id→created_at order may
/// wobble by concurrent transactions' milliseconds: irrelevant at a retention
/// cutoff).
pub(crate) async fn id_bound(
    conn: &mut PgConnection,
    cutoff: DateTime<Utc>,
) -> Result<i64, sqlx::Error> {
    let (lo, hi): (Option<i64>, Option<i64>) =
        sqlx::query_as("SELECT min(id), max(id) FROM pgflow.runs")
            .fetch_one(&mut *conn)
            .await?;
    let (Some(mut lo), Some(hi)) = (lo, hi) else {
        return Ok(0);
    };
    let mut hi = hi + 1;
    // Invariant: every id < lo was created before the cutoff; ids >= hi after it.
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let first: Option<(i64, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, created_at FROM pgflow.runs WHERE id >= $1 ORDER BY id LIMIT 1",
        )
        .bind(mid)
        .fetch_optional(&mut *conn)
        .await?;
        match first {
            Some((id, created)) if created < cutoff => lo = id + 1,
            _ => hi = mid,
        }
    }
    Ok(lo)
}

/// What one batch pruned.
#[derive(Debug, Default, Clone, Copy, sqlx::FromRow)]
pub(crate) struct Pruned {
    pub(crate) runs: i64,
    pub(crate) steps: i64,
    pub(crate) elements: i64,
}

/// Prunes (or, with `archive`, moves to `pgflow.archived_runs`) up to `limit` runs
/// with an id below `bound` that finished before `cutoff` and have no task left
/// (an attempt of a cancelled run may still be landing) and whose parent's step (a
/// subflow) has read them, with their step states, elements, usage rows and signals
/// (signals are not archived). Rows another transaction holds are skipped. With `dry_run`, counts
/// what would go and changes nothing.
pub(crate) async fn prune_batch(
    conn: &mut PgConnection,
    bound: i64,
    cutoff: DateTime<Utc>,
    limit: i64,
    archive: bool,
    dry_run: bool,
) -> Result<Pruned, sqlx::Error> {
    // One text per mode (prepared statements are cached by text).
    macro_rules! doomed {
        ($lock:literal) => {
            concat!(
                "doomed AS MATERIALIZED (
                     SELECT r.id FROM pgflow.runs r
                     WHERE r.id < $1 AND r.status <> 'running' AND r.completed_at < $2
                       AND NOT EXISTS (SELECT 1 FROM pgflow.tasks t WHERE t.run_id = r.id)
                       -- a child run whose parent's step has not read it yet
                       AND NOT EXISTS (SELECT 1 FROM pgflow.tasks t WHERE t.child_run_id = r.id)
                     ORDER BY r.id
                     LIMIT $3",
                $lock,
                ")"
            )
        };
    }
    if dry_run {
        return sqlx::query_as(concat!(
            "WITH ",
            doomed!(""),
            "SELECT (SELECT count(*) FROM doomed) AS runs,
                    (SELECT count(*) FROM pgflow.step_states s JOIN doomed d ON s.run_id = d.id)
                        AS steps,
                    (SELECT count(*) FROM pgflow.step_elements e JOIN doomed d ON e.run_id = d.id)
                        AS elements"
        ))
        .bind(bound)
        .bind(cutoff)
        .bind(limit)
        .fetch_one(conn)
        .await;
    }
    sqlx::query_as(concat!(
        "WITH ",
        doomed!(" FOR UPDATE SKIP LOCKED"),
        ", archived AS (
             INSERT INTO pgflow.archived_runs
                 (id, workflow, version, status, input, output, error, idempotency_key,
                  cost_cents, instance_id, forked_from, parent_run_id, key, tokens_in,
                  tokens_out, created_at, completed_at, usage, steps)
             SELECT r.id, r.workflow, r.version, r.status, r.input, r.output, r.error,
                    r.idempotency_key, r.cost_cents, r.instance_id, r.forked_from,
                    r.parent_run_id, r.key, r.tokens_in, r.tokens_out,
                    r.created_at, r.completed_at,
                    (SELECT jsonb_agg(jsonb_build_object(
                                'step', u.step, 'element', u.element, 'attempt', u.attempt,
                                'model', u.model, 'tokens_in', u.tokens_in,
                                'tokens_out', u.tokens_out, 'cost_cents', u.cost_cents,
                                'recorded_at', u.recorded_at) ORDER BY u.id)
                     FROM pgflow.step_usage u WHERE u.run_id = r.id),
                    COALESCE((
                        SELECT jsonb_agg(jsonb_build_object(
                                   'step', s.step, 'status', s.status, 'attempts', s.attempts,
                                   'output', s.output, 'errors', s.errors, 'reason', s.reason,
                                   'started_at', s.started_at, 'completed_at', s.completed_at,
                                   'elements', (
                                       SELECT jsonb_agg(jsonb_build_object(
                                                  'element', e.element, 'output', e.output,
                                                  'attempts', e.attempts,
                                                  'started_at', e.started_at,
                                                  'completed_at', e.completed_at)
                                              ORDER BY e.element)
                                       FROM pgflow.step_elements e
                                       WHERE e.run_id = s.run_id AND e.step = s.step))
                               ORDER BY s.step)
                        FROM pgflow.step_states s WHERE s.run_id = r.id), '[]'::jsonb)
             FROM pgflow.runs r JOIN doomed d ON r.id = d.id
             WHERE $4
             ON CONFLICT (id) DO NOTHING
         ), elements AS (
             DELETE FROM pgflow.step_elements e USING doomed d WHERE e.run_id = d.id
             RETURNING 1
         ), signals AS (
             DELETE FROM pgflow.signals g USING doomed d WHERE g.run_id = d.id
         ), usage AS (
             DELETE FROM pgflow.step_usage u USING doomed d WHERE u.run_id = d.id
         ), steps AS (
             DELETE FROM pgflow.step_states s USING doomed d WHERE s.run_id = d.id
             RETURNING 1
         ), runs AS (
             DELETE FROM pgflow.runs r USING doomed d WHERE r.id = d.id
             RETURNING 1
         )
         SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM steps) AS steps,
                (SELECT count(*) FROM elements) AS elements"
    ))
    .bind(bound)
    .bind(cutoff)
    .bind(limit)
    .bind(archive)
    .fetch_one(conn)
    .await
}
