//! Concurrency slots per run key, `pgflow.key_slots`: how many tasks of each (queue,
//! key) hold a slot — run now — in a queue with a key limit
//! (`RuntimeBuilder::key_concurrency`).
//!
//! **Taking** happens in the claim's transaction ([`take`]): the counters of the
//! claimed keys are locked (in key order: two claimers cannot deadlock), raised by
//! what fits under the limit, and the tasks that did not fit are given back at once —
//! in the same transaction, so nobody ever sees them claimed. Instances claiming the
//! same key queue up on its counter; the limit holds across all of them.
//!
//! **Releasing** is tied to the task row's `holds_slot`, set by the claim that took
//! the slot: the fence that ends that claim (a completion, a retry, a release, the
//! rescue of a lost claim) returns it and [`release`] lowers the counter, once.

use sqlx::PgConnection;

/// Takes slots for the tasks just claimed (`(task id, key)`, in `queue`, claimed
/// with `token`), at most `limit` running per key. Returns the ids of the tasks that
/// got one (marked `holds_slot`); the others are given back to the queue, unclaimed.
pub(crate) async fn take(
    conn: &mut PgConnection,
    queue: &str,
    limit: i32,
    token: i64,
    claimed: &[(i64, String)],
) -> Result<Vec<i64>, sqlx::Error> {
    if claimed.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = claimed.iter().map(|c| c.0).collect();
    let keys: Vec<&str> = claimed.iter().map(|c| c.1.as_str()).collect();
    // A counter for every key (a statement of its own: the next one locks them).
    sqlx::query(
        "INSERT INTO pgflow.key_slots (queue, key)
         SELECT DISTINCT $1, key FROM unnest($2::text[]) AS k(key)
         ORDER BY 2
         ON CONFLICT (queue, key) DO NOTHING",
    )
    .bind(queue)
    .bind(&keys)
    .execute(&mut *conn)
    .await?;
    sqlx::query_scalar(
        "WITH c AS (
             SELECT * FROM unnest($1::bigint[], $2::text[]) WITH ORDINALITY AS c(id, key, ord)
         ), held AS MATERIALIZED (
             -- the counters, locked in key order
             SELECT s.key, s.running FROM pgflow.key_slots s
             WHERE s.queue = $3 AND s.key IN (SELECT key FROM c)
             ORDER BY s.key
             FOR UPDATE
         ), ranked AS (
             SELECT c.id, c.key, row_number() OVER (PARTITION BY c.key ORDER BY c.ord) AS n
             FROM c
         ), granted AS (
             SELECT r.id, r.key FROM ranked r JOIN held h USING (key)
             WHERE h.running + r.n <= $4
         ), bumped AS (
             UPDATE pgflow.key_slots s SET running = s.running + g.n
             FROM (SELECT key, count(*)::int AS n FROM granted GROUP BY key) g
             WHERE s.queue = $3 AND s.key = g.key
         ), marked AS (
             UPDATE pgflow.tasks t SET holds_slot = true
             WHERE t.id IN (SELECT id FROM granted) AND t.claim_token = $5
         ), returned AS (
             UPDATE pgflow.tasks t
             SET claimed_by = NULL, claim_token = NULL, claimed_at = NULL, lease_until = NULL
             WHERE t.id IN (SELECT id FROM c) AND t.id NOT IN (SELECT id FROM granted)
               AND t.claim_token = $5
         )
         SELECT id FROM granted",
    )
    .bind(&ids)
    .bind(&keys)
    .bind(queue)
    .bind(limit)
    .bind(token)
    .fetch_all(conn)
    .await
}

/// Lowers the counters of the slots released (one `(queue, key)` per task).
pub(crate) async fn release(
    conn: &mut PgConnection,
    released: &[(String, String)],
) -> Result<(), sqlx::Error> {
    if released.is_empty() {
        return Ok(());
    }
    let (queues, keys): (Vec<&str>, Vec<&str>) = released
        .iter()
        .map(|(q, k)| (q.as_str(), k.as_str()))
        .unzip();
    sqlx::query(
        "WITH r AS (
             SELECT queue, key, count(*)::int AS n
             FROM unnest($1::text[], $2::text[]) AS r(queue, key)
             GROUP BY queue, key
         ), locked AS (
             -- in key order, as `take` locks them
             SELECT s.queue, s.key FROM pgflow.key_slots s JOIN r USING (queue, key)
             ORDER BY s.queue, s.key
             FOR UPDATE OF s
         )
         UPDATE pgflow.key_slots s SET running = GREATEST(s.running - r.n, 0)
         FROM r JOIN locked USING (queue, key)
         WHERE s.queue = r.queue AND s.key = r.key",
    )
    .bind(&queues)
    .bind(&keys)
    .execute(conn)
    .await?;
    Ok(())
}
