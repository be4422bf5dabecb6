//! The hot queue, `pgflow.tasks`: one row per step attempt that is ready or running
//! (and per element of a map step). A row leaves the table when its step completes
//! or fails for good; a retry puts it back with a later `run_at`.
//!
//! **Claim** ([`claim`]) is one statement: an `UPDATE .. WHERE id = ANY (ARRAY(SELECT
//! .. FOR UPDATE SKIP LOCKED LIMIT n))` over the partial index `tasks_available`
//! (`queue, priority DESC, run_at, id WHERE claimed_by IS NULL AND NOT parked`: tasks
//! due more than [`PARK_AHEAD`] ahead are parked, out of it), stamping each row
//! with this instance, the batch's claim token and a lease; the same statement
//! returns what the steps need: the run's status and input and the parents' outputs.
//!
//! **Fencing.** The claim token is random and drawn once per claim batch: every
//! completion carries the token its claim stamped, and every write of the flush
//! applies only where the row still carries it. A claim that was lost (lease expired,
//! the task given back and claimed again by someone else, or taken away by a retry or
//! cancel) has a token the row no longer holds, so nothing of it applies. A random
//! token (not a counter) needs no coordination between instances; per batch (not per
//! row) it costs one value per claim.
//!
//! **Enqueue** is written once ([`enqueue_ctes!`]) and used by start (in the start
//! statement), by the flush (ready children), and by retry: a ready step becomes one
//! task, or — for a map step — one task per element of the JSON array it maps over,
//! read in SQL from the run input or the parent's stored output, so the vector never
//! travels to a worker and back. A map step over an empty array (or, from a damaged
//! row, over something that is not an array) becomes one task without an element,
//! which the worker completes with `[]` (or fails with a clear error).

use sqlx::PgConnection;

use crate::catalog::{Catalog, Entry, StepRow};
use crate::store::{millis, step_i16, version_i32};

/// The CTEs that enqueue the rows of a CTE named `ready` (`run_id, step, workflow,
/// version, queue, priority, max_attempts, run_at, delay_ms, map_from, run_priority,
/// run_input, waits_for, wait_ms, run_key`), which holds only steps of runs still `running`.
/// A step waiting for a signal (`waits_for`, never a map step) is due after its delay
/// when its run already has the signal, else `wait_ms` later, or never (`wait_ms`
/// -1: parked until the signal makes it due; see `pgflow.signal_due` in migration
/// 0009, which takes the lock that orders it with `pgflow.signal`). A task's priority
/// is its step's plus its run's, clamped to `smallint`; it is due at `run_at` plus
/// its step's `delay_ms`, and **parked** (out of `tasks_available`, see
/// [`PARK_AHEAD`]) when that is more than a second ahead. `map_from` is NULL for a step
/// that is not a map step, -1 for a map step over the run input (`run_input`, needed
/// only then) and the parent's index for one over a parent's output. Defines
/// `enqueued (queue, due)`.
///
/// Steps that are not map steps take the lean path (`plain`: no sort, no JSON).
/// Element tasks are inserted in element order, so they enter `tasks_available`
/// (and are claimed) in that order. The parent's output is read by the primary key
/// of `step_states`.
macro_rules! enqueue_ctes {
    () => {
        concat!(
            $crate::store::tasks::enqueue_plain_cte!(),
            ", fan AS (
    SELECT q.*, LEAST(GREATEST(q.priority::int + q.run_priority, -32768), 32767)::smallint
               AS prio,
           q.run_at + interval '1 millisecond' * q.delay_ms AS due,
           s.items,
           CASE WHEN jsonb_typeof(s.items) = 'array' THEN jsonb_array_length(s.items) ELSE 0 END
               AS n
    FROM ready q
    CROSS JOIN LATERAL (
        SELECT CASE WHEN q.map_from < 0 THEN q.run_input
                    ELSE (SELECT ss.output FROM pgflow.step_states ss
                          WHERE ss.run_id = q.run_id AND ss.step = q.map_from)
               END AS items
    ) s
    WHERE q.map_from IS NOT NULL
), map_states AS (
    INSERT INTO pgflow.step_states (run_id, step, status, remaining, attempts)
    SELECT run_id, step, 'running', n, 1 FROM fan WHERE n > 0
    ON CONFLICT (run_id, step) DO NOTHING
), fanned AS (
    INSERT INTO pgflow.tasks (run_id, step, element, item, workflow, version, queue,
                              priority, max_attempts, run_at, parked, key)
    SELECT t.run_id, t.step, t.element, t.item, t.workflow, t.version, t.queue,
           t.prio, t.max_attempts, t.due, t.due > now() + interval '1 second', t.run_key
    FROM (
        SELECT f.run_id, f.step, NULL::int AS element, NULL::jsonb AS item, f.workflow,
               f.version, f.queue, f.prio, f.max_attempts, f.due, f.run_key
        FROM fan f WHERE f.n = 0
        UNION ALL
        SELECT f.run_id, f.step, (e.ord - 1)::int, e.item, f.workflow, f.version, f.queue,
               f.prio, f.max_attempts, f.due, f.run_key
        FROM fan f CROSS JOIN LATERAL jsonb_array_elements(f.items) WITH ORDINALITY AS e(item, ord)
        WHERE f.n > 0
    ) t
    ORDER BY t.run_id, t.step, t.element
    RETURNING queue, run_at
), enqueued AS (
    SELECT queue, run_at <= now() AS due FROM plain
    UNION ALL
    SELECT queue, run_at <= now() FROM fanned
)"
        )
    };
}
pub(crate) use enqueue_ctes;

/// The `plain` CTE of [`enqueue_ctes!`] alone (no map step among the ready steps):
/// a statement that cannot fan out plans and starts none of the map CTEs.
macro_rules! enqueue_plain_cte {
    () => {
        "plain AS (
    -- the common case, kept lean: one task per ready step
    INSERT INTO pgflow.tasks (run_id, step, workflow, version, queue, priority, max_attempts,
                              run_at, parked, waits_for, delay_until, key)
    SELECT q.run_id, q.step, q.workflow, q.version, q.queue,
           LEAST(GREATEST(q.priority::int + q.run_priority, -32768), 32767)::smallint,
           q.max_attempts, d.due, d.due > now() + interval '1 second', q.waits_for,
           CASE WHEN q.waits_for IS NOT NULL THEN w.ready END, q.run_key
    FROM ready q
    CROSS JOIN LATERAL (SELECT q.run_at + interval '1 millisecond' * q.delay_ms AS ready) w
    CROSS JOIN LATERAL (
        -- a signal step (only): due after its delay if its signal came, else at its
        -- timeout (a signal that comes later makes it due, see `pgflow.signal`)
        SELECT CASE WHEN q.waits_for IS NULL THEN w.ready
                    ELSE pgflow.signal_due(q.run_id, q.waits_for, w.ready, q.wait_ms)
               END AS due
    ) d
    WHERE q.map_from IS NULL
    RETURNING queue, run_at
)"
    };
}
pub(crate) use enqueue_plain_cte;

/// How far ahead of its due time a task leaves the parked set for `tasks_available`
/// (written as `interval '1 second'` in the statements): a task due later than this
/// is parked when enqueued or put back, and [`promote`] moves it back this long
/// before it is due. Claims walk only tasks due within it.
pub(crate) const PARK_AHEAD: std::time::Duration = std::time::Duration::from_secs(1);

/// Steps to enqueue, as the bind arrays of [`enqueue`]. Names are borrowed (from
/// the linked definitions, or a stored one): nothing is copied per task.
#[derive(Debug, Default)]
pub(crate) struct NewTasks<'a> {
    run_ids: Vec<i64>,
    steps: Vec<i16>,
    workflows: Vec<&'a str>,
    versions: Vec<i32>,
    queues: Vec<&'a str>,
    priorities: Vec<i16>,
    max_attempts: Vec<i32>,
    delays_ms: Vec<i64>,
    map_from: Vec<Option<i16>>,
    waits_for: Vec<Option<String>>,
    wait_ms: Vec<i64>,
}

impl<'a> NewTasks<'a> {
    /// Adds step `step` of run `run_id` of `flow`.
    pub(crate) fn push(&mut self, flow: &Entry, run_id: i64, step: usize) {
        if let Some(row) = flow.step_row(step) {
            let def = flow.def;
            self.push_row(
                run_id,
                step,
                (def.name(), version_i32(def.version()), def.queue()),
                row,
            );
        }
    }

    /// Adds step `step` of run `run_id` of the workflow `(name, version, queue)`.
    pub(crate) fn push_row(
        &mut self,
        run_id: i64,
        step: usize,
        (workflow, version, queue): (&'a str, i32, &'a str),
        row: &StepRow,
    ) {
        self.run_ids.push(run_id);
        self.steps.push(step_i16(step));
        self.workflows.push(workflow);
        self.versions.push(version);
        self.queues.push(queue);
        self.priorities.push(row.priority);
        self.max_attempts.push(row.max_attempts);
        self.delays_ms.push(row.delay_ms);
        self.map_from.push(row.map_from);
        self.waits_for.push(row.waits_for.clone());
        self.wait_ms.push(row.wait_ms);
    }

    /// Whether nothing was added.
    pub(crate) fn is_empty(&self) -> bool {
        self.run_ids.is_empty()
    }
}

/// Promotes up to `limit` parked tasks due within [`PARK_AHEAD`] back into
/// `tasks_available`, soonest first (index `tasks_parked`), skipping rows another
/// instance is promoting. Returns the queues of the promoted tasks already due (to
/// notify) and how many were promoted.
pub(crate) async fn promote(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<(Vec<String>, i64), sqlx::Error> {
    let rows: Vec<(String, bool, i64)> = sqlx::query_as(
        "WITH p AS (
             UPDATE pgflow.tasks t SET parked = false
             WHERE t.id = ANY (ARRAY(
                 SELECT a.id FROM pgflow.tasks a
                 WHERE a.parked AND a.run_at <= now() + interval '1 second'
                 ORDER BY a.run_at
                 LIMIT $1
                 FOR UPDATE SKIP LOCKED))
             RETURNING t.queue, t.run_at <= now() AS due
         )
         SELECT queue, bool_or(due), count(*) FROM p GROUP BY queue",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?;
    let promoted = rows.iter().map(|r| r.2).sum();
    let due = rows.into_iter().filter(|r| r.1).map(|r| r.0).collect();
    Ok((due, promoted))
}

/// Enqueues `tasks`, due now (see [`enqueue_ctes!`]). Returns the queues that got
/// tasks.
pub(crate) async fn enqueue(
    conn: &mut PgConnection,
    tasks: &NewTasks<'_>,
) -> Result<Vec<String>, sqlx::Error> {
    if tasks.is_empty() {
        return Ok(Vec::new());
    }
    sqlx::query_scalar(concat!(
        "WITH ready AS (
             -- the runs by primary key; only running ones get tasks
             SELECT u.*, now() AS run_at, r.priority AS run_priority,
                    CASE WHEN u.map_from < 0 THEN r.input END AS run_input, r.key AS run_key
             FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::int[], $5::text[],
                         $6::smallint[], $7::int[], $8::smallint[], $9::bigint[], $10::text[],
                         $11::bigint[])
                  AS u(run_id, step, workflow, version, queue, priority, max_attempts, map_from,
                       delay_ms, waits_for, wait_ms)
             JOIN pgflow.runs r ON r.id = u.run_id AND r.status = 'running'
         ), ",
        enqueue_ctes!(),
        "
         SELECT DISTINCT queue FROM enqueued WHERE due"
    ))
    .bind(&tasks.run_ids)
    .bind(&tasks.steps)
    .bind(&tasks.workflows)
    .bind(&tasks.versions)
    .bind(&tasks.queues)
    .bind(&tasks.priorities)
    .bind(&tasks.max_attempts)
    .bind(&tasks.map_from)
    .bind(&tasks.delays_ms)
    .bind(&tasks.waits_for)
    .bind(&tasks.wait_ms)
    .fetch_all(conn)
    .await
}

/// A claimed task with what its step needs.
#[derive(Debug)]
pub(crate) struct Claimed {
    pub(crate) task_id: i64,
    pub(crate) run_id: i64,
    pub(crate) step: i16,
    pub(crate) workflow: String,
    pub(crate) version: i32,
    pub(crate) attempt: i32,
    /// How many times it snoozed.
    pub(crate) snoozes: i32,
    /// Earlier failed attempts (JSON array of `AttemptFailure`).
    pub(crate) errors: Option<String>,
    pub(crate) run_status: String,
    /// The run input, when the step reads it.
    pub(crate) input: Option<String>,
    pub(crate) parent_steps: Option<Vec<i16>>,
    /// The parents' outputs, in `parent_steps` order; `None` for a skipped parent.
    pub(crate) parent_outputs: Option<Vec<Option<String>>>,
    /// For an element task of a map step: its index.
    pub(crate) element: Option<i32>,
    /// For an element task of a map step: the element.
    pub(crate) item: Option<String>,
    /// For a task waiting for a signal: its payload (`None` when its timeout passed
    /// first).
    pub(crate) signal: Option<String>,
    /// For the task of a step that started a child run (a subflow): the child.
    pub(crate) child_run_id: Option<i64>,
    /// Its run has a budget: the attempt reserves its step's estimate first.
    pub(crate) budgeted: bool,
    /// Its run's key.
    pub(crate) key: Option<String>,
    /// Seconds from when it was due to this claim.
    pub(crate) wait_secs: Option<f64>,
    /// The trace context its run was started in (see `crate::otel`).
    pub(crate) trace_context: Option<String>,
}

crate::store::by_position!(Claimed {
    task_id,
    run_id,
    step,
    workflow,
    version,
    attempt,
    snoozes,
    errors,
    run_status,
    input,
    parent_steps,
    parent_outputs,
    element,
    item,
    signal,
    child_run_id,
    budgeted,
    key,
    wait_secs,
    trace_context,
});

/// The claim statement. The inner SELECT walks `tasks_available` in claim order
/// (the `claim_uses_the_partial_index` test explains this very statement). An element
/// task of a map step reads its element (`item`) instead of its parent's whole
/// output, and the run input only when another parameter takes it.
macro_rules! claim_sql {
    ($pick:expr) => {
        concat!(
        "
WITH steps AS MATERIALIZED (
    -- each step's parents as an array once per claim, not an edge list scanned per task
    SELECT s.workflow, s.version, s.step, s.lease_ms, s.needs_input, s.element_needs_input,
           string_to_array(NULLIF(s.parents, ''), ',')::smallint[] AS parents
    FROM unnest($5::text[], $6::int[], $7::smallint[], $8::bigint[], $9::bool[],
                $11::bool[], $10::text[])
        AS s(workflow, version, step, lease_ms, needs_input, element_needs_input, parents)
), claimed AS (
    -- the lease by a hash join with `steps`, not a scan of it per task (the pick
    -- takes only tasks of steps this runtime knows, so every task finds its step)
    UPDATE pgflow.tasks t
    SET claimed_by = $1,
        claim_token = $2,
        claimed_at = now(),
        lease_until = now() + interval '1 millisecond' * s.lease_ms
    FROM steps s
    -- The ids are locked once, in claim order, by an uncorrelated ARRAY(..) (an
    -- InitPlan, run once). Inside `WHERE id IN (SELECT .. LIMIT n FOR UPDATE SKIP
    -- LOCKED)` the planner may re-run the subquery per row, and each re-run skips
    -- the rows this statement already updated and locks the next n: one claim then
    -- takes thousands of tasks (seen here under load).
    WHERE t.id = ANY (ARRAY(", $pick, "))
      AND s.workflow = t.workflow AND s.version = t.version AND s.step = t.step
    RETURNING t.id, t.run_id, t.step, t.workflow, t.version, t.attempt, t.errors, t.element,
              t.item, t.snoozes, t.waits_for, t.child_run_id, t.key, t.run_at,
              s.needs_input, s.element_needs_input, s.parents
)
SELECT c.id AS task_id, c.run_id, c.step, c.workflow, c.version, c.attempt, c.snoozes,
       EXTRACT(EPOCH FROM (now() - c.run_at))::float8 AS wait_secs,
       c.child_run_id, c.key, r.trace_context, (r.budget_cents IS NOT NULL OR r.budget_tokens IS NOT NULL) AS budgeted,
       c.errors::text AS errors, r.status AS run_status,
       CASE WHEN CASE WHEN c.element IS NULL THEN c.needs_input ELSE c.element_needs_input END
            THEN r.input::text END AS input,
       p.steps AS parent_steps, p.outputs AS parent_outputs, c.element, c.item::text AS item,
       -- a task waiting for a signal (only): the accepted one's payload, by the unique
       -- index signals_accepted; NULL when its timeout passed first
       CASE WHEN c.waits_for IS NOT NULL
            THEN (SELECT g.payload::text FROM pgflow.signals g
                  WHERE g.run_id = c.run_id AND g.name = c.waits_for AND g.status = 'accepted')
       END AS signal
FROM claimed c
JOIN pgflow.runs r ON r.id = c.run_id
LEFT JOIN LATERAL (
    -- a root step (no parents) or an element task reads no step state
    SELECT array_agg(ss.step) AS steps, array_agg(ss.output::text) AS outputs
    FROM pgflow.step_states ss
    WHERE c.element IS NULL AND c.parents IS NOT NULL
      AND ss.run_id = c.run_id
      AND ss.step = ANY (c.parents)
      AND ss.status IN ('completed', 'skipped')
) p ON true")
    };
}
/// The claim's pick in arrival order: the due tasks of the queue by priority, then
/// due time, then id (index `tasks_available`).
macro_rules! fifo_pick {
    () => {
        "
        SELECT a.id FROM pgflow.tasks a
        WHERE a.queue = $3
          AND a.claimed_by IS NULL
          AND NOT a.parked
          -- an instance declared dead claims nothing until it heartbeats again
          AND EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = $1 AND i.status = 'online')
          AND a.run_at <= now()
          -- only steps this runtime knows (a task of another version, or of a step
          -- index its version does not have, is left to the instances that do);
          -- a hashed subplan, one probe per task: `IS TRUE` keeps the planner from
          -- making the IN a semi-join, which it runs as a nested loop over every
          -- known step per task (measured: a fifth of the pick)
          AND ((a.workflow, a.version, a.step) IN (SELECT workflow, version, step FROM steps)) IS TRUE
        ORDER BY a.priority DESC, a.run_at, a.id
        LIMIT $4
        FOR UPDATE SKIP LOCKED"
    };
}

/// The claim's pick in a fair queue: round robin across run keys. The keys with due
/// tasks are enumerated in rotation from the claimer's cursor `$12` (the last key it
/// served: those below it, downwards, then from the last down to it; at most `$13` of
/// them) by skipping through `tasks_available_by_key` (one probe per key, entering
/// each key's range from its live end however long its drained backlog); each key offers an equal share of the batch (its own order:
/// priority, due time, id), and the picks are taken in rounds (every key's first,
/// then every key's second, ..; in a round, keys in rotation order), so one key's
/// backlog of 100,000 tasks does not delay another key's one, even when a claim takes
/// one task. Tasks without a key get the room the keys left, from the head of the
/// queue (`tasks_available`, in arrival order), last in each round.
macro_rules! fair_pick {
    () => {
        "
        WITH RECURSIVE k AS (
            -- keys below the cursor, downwards: a key's range is entered from its
            -- newest (live) end, not through the dead entries of its drained front
            (SELECT a.key FROM pgflow.tasks a
             WHERE a.queue = $3 AND a.key < $12 AND a.key IS NOT NULL
               AND a.claimed_by IS NULL AND NOT a.parked AND a.run_at <= now()
             ORDER BY a.key DESC LIMIT 1)
            UNION ALL
            SELECT (SELECT a.key FROM pgflow.tasks a
                    WHERE a.queue = $3 AND a.key < k.key
                      AND a.claimed_by IS NULL AND NOT a.parked AND a.run_at <= now()
                    ORDER BY a.key DESC LIMIT 1)
            FROM k WHERE k.key IS NOT NULL
        ), w AS (
            -- the rotation wraps around: the keys from the last down to the cursor
            (SELECT a.key FROM pgflow.tasks a
             WHERE a.queue = $3 AND a.key IS NOT NULL AND a.key >= $12
               AND a.claimed_by IS NULL AND NOT a.parked AND a.run_at <= now()
             ORDER BY a.key DESC LIMIT 1)
            UNION ALL
            SELECT (SELECT a.key FROM pgflow.tasks a
                    WHERE a.queue = $3 AND a.key < w.key AND a.key >= $12
                      AND a.claimed_by IS NULL AND NOT a.parked AND a.run_at <= now()
                    ORDER BY a.key DESC LIMIT 1)
            FROM w WHERE w.key IS NOT NULL
        ), keys0 AS MATERIALIZED (
            -- with a key limit `$14`: only keys with a free slot, each offering at
            -- most its free slots (`room`; the claim then takes the slots for real)
            SELECT r.key, r.part,
                   CASE WHEN $14::int IS NOT NULL THEN $14 - COALESCE(s.running, 0) END AS room
            FROM (SELECT key, 1 AS part FROM k WHERE key IS NOT NULL
                  UNION ALL
                  SELECT key, 2 FROM w WHERE key IS NOT NULL) r
            LEFT JOIN pgflow.key_slots s ON $14::int IS NOT NULL AND s.queue = $3 AND s.key = r.key
            WHERE ($14::int IS NULL OR $14 - COALESCE(s.running, 0) > 0)
              -- an instance declared dead claims nothing until it heartbeats again
              AND EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = $1 AND i.status = 'online')
            LIMIT $13
        ), keys AS MATERIALIZED (
            -- each key's place in the rotation: below the cursor first, downwards
            SELECT key, room, row_number() OVER (ORDER BY part, key DESC) AS ord FROM keys0
        ), share AS MATERIALIZED (
            -- rounded up: a batch is filled when every key has enough
            SELECT CASE WHEN count(*) = 0 THEN $4
                        ELSE GREATEST(1, ($4 + count(*) - 1) / count(*)) END::bigint AS n
            FROM keys
        ), keyed AS MATERIALIZED (
            SELECT p.id, p.rn, keys.ord, p.priority, p.run_at
            FROM keys CROSS JOIN LATERAL (
                SELECT b.id, b.priority, b.run_at,
                       row_number() OVER (ORDER BY b.priority DESC, b.run_at, b.id) AS rn
                FROM (SELECT a.id, a.priority, a.run_at FROM pgflow.tasks a
                      -- the key as a range of one, and first in the order: only the
                      -- key index gives that order, so the planner cannot walk the
                      -- queue's index through every other key's tasks. With `key =`,
                      -- both indexes give the order; when the statistics say
                      -- nothing, their sizes decide, and with long keys the key
                      -- index lost (seen here: 21,906 rows filtered out of a pick of
                      -- 4, tenant A at half speed)
                      WHERE a.queue = $3 AND a.key >= keys.key AND a.key <= keys.key
                        AND a.claimed_by IS NULL AND NOT a.parked AND a.run_at <= now()
                        -- a hashed subplan (see `fifo_pick!`)
                        AND ((a.workflow, a.version, a.step) IN (SELECT workflow, version, step FROM steps)) IS TRUE
                      ORDER BY a.key, a.priority DESC, a.run_at, a.id
                      -- two shares: a key with fewer due tasks leaves its room to
                      -- the others (the batch still takes every key's first in
                      -- round one)
                      LIMIT LEAST($4, 2 * (SELECT n FROM share))
                      FOR UPDATE SKIP LOCKED) b
            ) p
            WHERE keys.room IS NULL OR p.rn <= keys.room
        ), keyless AS (
            -- tasks without a key: the room the keys left, from the head of the queue
            SELECT b.id, row_number() OVER (ORDER BY b.priority DESC, b.run_at, b.id) AS rn,
                   $13 + 1 AS ord, b.priority, b.run_at
            FROM (SELECT a.id, a.priority, a.run_at FROM pgflow.tasks a
                  WHERE a.id IN (SELECT h.id FROM pgflow.tasks h
                                 WHERE h.queue = $3 AND h.claimed_by IS NULL AND NOT h.parked
                                   AND h.run_at <= now()
                                 ORDER BY h.priority DESC, h.run_at, h.id
                                 LIMIT GREATEST(0, $4 - (SELECT count(*) FROM keyed)))
                    AND a.key IS NULL
                    AND EXISTS (SELECT 1 FROM pgflow.instances i WHERE i.id = $1 AND i.status = 'online')
                    AND ((a.workflow, a.version, a.step) IN (SELECT workflow, version, step FROM steps)) IS TRUE
                  FOR UPDATE SKIP LOCKED) b
        )
        -- in rounds; in a round, keys in rotation order (keyless tasks last)
        SELECT id FROM (SELECT * FROM keyed UNION ALL SELECT * FROM keyless) picks
        ORDER BY rn, ord, priority DESC, run_at, id LIMIT $4"
    };
}

pub(crate) const CLAIM_SQL: &str = claim_sql!(fifo_pick!());
/// The claim of a fair queue (see [`fair_pick!`]); also binds `$12` (the cursor
/// key), `$13` (the most keys one claim serves) and `$14` (the key limit, or NULL).
pub(crate) const FAIR_CLAIM_SQL: &str = claim_sql!(fair_pick!());

/// The planner settings of a claim connection (see [`claim_connection`]): no
/// sequential or bitmap scans, no sorts where an index gives the order; and no JIT
/// compilation (the costs of the disabled paths count against `jit_above_cost`:
/// with JIT on, a claim of 100 tasks compiles 200 functions for 2 s, seen here).
const CLAIM_PLANNER_SETTINGS: &str = "SELECT set_config('enable_seqscan', 'off', false),
       set_config('enable_bitmapscan', 'off', false),
       set_config('enable_sort', 'off', false),
       set_config('jit', 'off', false)";

/// What one claim asks for.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClaimRequest<'a> {
    /// The claiming instance.
    pub(crate) instance: &'a str,
    /// The batch's claim token (see the module docs).
    pub(crate) token: i64,
    /// The queue.
    pub(crate) queue: &'a str,
    /// The most tasks to take.
    pub(crate) limit: usize,
    /// A fair queue's claim: the cursor key (serve keys after it; `""` from the
    /// first) and the most keys to serve.
    pub(crate) fair: Option<(&'a str, i64)>,
    /// The queue's key limit: at most this many running tasks per key (a fair
    /// claim, whose slots are taken in the claim's transaction).
    pub(crate) key_limit: Option<i32>,
}

fn claim_query<'q>(
    sql: &'q str,
    catalog: &'q Catalog,
    req: ClaimRequest<'q>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    let c = &catalog.claim;
    let query = sqlx::query(sql)
        .bind(req.instance)
        .bind(req.token)
        .bind(req.queue)
        .bind(i64::try_from(req.limit).unwrap_or(i64::MAX))
        .bind(&c.step_workflow)
        .bind(&c.step_version)
        .bind(&c.step_index)
        .bind(&c.step_lease_ms)
        .bind(&c.step_needs_input)
        .bind(&c.step_parents)
        .bind(&c.step_element_needs_input);
    match req.fair {
        Some((cursor, keys)) => query.bind(cursor).bind(keys).bind(req.key_limit),
        None => query,
    }
}

/// Claims up to `req.limit` due tasks of `req.queue` (see the module docs).
pub(crate) async fn claim(
    conn: &mut PgConnection,
    catalog: &Catalog,
    req: ClaimRequest<'_>,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let Some(limit) = req.key_limit else {
        let sql = if req.fair.is_some() {
            FAIR_CLAIM_SQL
        } else {
            CLAIM_SQL
        };
        return crate::store::fetch_by_position(claim_query(sql, catalog, req), conn).await;
    };
    // A key limit: the claim and its slots in one transaction (see `store::slots`).
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    let claimed: Vec<Claimed> =
        crate::store::fetch_by_position(claim_query(FAIR_CLAIM_SQL, catalog, req), &mut *tx)
            .await?;
    let keyed: Vec<(i64, String)> = claimed
        .iter()
        .filter_map(|c| Some((c.task_id, c.key.clone()?)))
        .collect();
    let granted = crate::store::slots::take(&mut tx, req.queue, limit, req.token, &keyed).await?;
    tx.commit().await?;
    Ok(claimed
        .into_iter()
        .filter(|c| c.key.is_none() || granted.contains(&c.task_id))
        .collect())
}

/// The plan of the claim statement with these parameters (`EXPLAIN EXECUTE` of the
/// statement prepared here, not run): the plan made for their values, or with
/// `generic` the one made without them, which a claim connection uses from its
/// sixth claim on when it costs no more.
#[doc(hidden)]
pub(crate) async fn explain_claim(
    conn: &mut PgConnection,
    catalog: &Catalog,
    req: ClaimRequest<'_>,
    generic: bool,
) -> Result<Vec<String>, sqlx::Error> {
    use sqlx::Row;
    let (sql, types) = match req.fair {
        Some(_) => (FAIR_CLAIM_SQL, CLAIM_PARAM_TYPES_FAIR),
        None => (CLAIM_SQL, CLAIM_PARAM_TYPES),
    };
    let mode = if generic {
        "force_generic_plan"
    } else {
        "force_custom_plan"
    };
    sqlx::raw_sql(&format!(
        "SET plan_cache_mode = {mode}; PREPARE pgflow_claim({types}) AS {sql}"
    ))
    .execute(&mut *conn)
    .await?;
    // EXECUTE takes no parameters: its arguments as quoted literals (`%L`)
    let args = types.split(',').count();
    let params: Vec<String> = (1..=args).map(|i| format!("${i}")).collect();
    let format = format!(
        "SELECT format('EXPLAIN EXECUTE pgflow_claim({})', {})",
        vec!["%L"; args].join(", "),
        params.join(", ")
    );
    let explain: String = claim_query(&format, catalog, req)
        .fetch_one(&mut *conn)
        .await?
        .try_get(0)?;
    let rows = sqlx::raw_sql(&explain).fetch_all(&mut *conn).await;
    sqlx::raw_sql("DEALLOCATE pgflow_claim; RESET plan_cache_mode")
        .execute(&mut *conn)
        .await?;
    rows?.iter().map(|r| r.try_get::<String, _>(0)).collect()
}

/// The types of the ordinary claim's parameters, in order (see [`claim_query`]).
macro_rules! claim_param_types {
    () => {
        "text, bigint, text, bigint, text[], int[], smallint[], bigint[], bool[], text[], bool[]"
    };
}
const CLAIM_PARAM_TYPES: &str = claim_param_types!();
/// The types of the fair claim's parameters: the ordinary claim's, then its own three.
const CLAIM_PARAM_TYPES_FAIR: &str = concat!(claim_param_types!(), ", text, bigint, int");

/// A claimed task whose lease expired or whose instance died.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct Stranded {
    pub(crate) id: i64,
    pub(crate) token: i64,
    pub(crate) run_id: i64,
    pub(crate) step: i16,
    pub(crate) workflow: String,
    pub(crate) version: i32,
    pub(crate) attempt: i32,
    pub(crate) max_attempts: i32,
    pub(crate) errors: Option<String>,
    pub(crate) owner: Option<String>,
    pub(crate) owner_offline: bool,
    /// For an element task of a map step: its index.
    pub(crate) element: Option<i32>,
}

/// Locks (SKIP LOCKED) up to 1,000 claimed tasks of the catalog's workflows to give
/// back: with `owner`, every claim of that instance id; otherwise those whose lease
/// expired or whose instance is offline. Walks `tasks_leased` (`lease_until WHERE
/// claimed_by IS NOT NULL`), soonest expiry first.
pub(crate) async fn stranded(
    conn: &mut PgConnection,
    catalog: &Catalog,
    owner: Option<&str>,
) -> Result<Vec<Stranded>, sqlx::Error> {
    let c = &catalog.claim;
    sqlx::query_as(
        "SELECT t.id, t.claim_token AS token, t.run_id, t.step, t.workflow, t.version,
                t.attempt, t.max_attempts, t.errors::text AS errors,
                t.claimed_by AS owner, COALESCE(i.status = 'offline', false) AS owner_offline,
                t.element
         FROM pgflow.tasks t
         LEFT JOIN pgflow.instances i ON i.id = t.claimed_by
         WHERE t.claimed_by IS NOT NULL
           AND CASE WHEN $3::text IS NULL
                    THEN t.lease_until < now() OR i.status = 'offline'
                    ELSE t.claimed_by = $3 END
           AND (t.workflow, t.version) IN
               (SELECT DISTINCT * FROM unnest($1::text[], $2::int[]))
         ORDER BY t.lease_until
         LIMIT 1000
         FOR UPDATE OF t SKIP LOCKED",
    )
    .bind(&c.step_workflow)
    .bind(&c.step_version)
    .bind(owner)
    .fetch_all(conn)
    .await
}

/// How long the oldest due task of each queue has waited (ms), over the due,
/// unclaimed tasks (index `tasks_available`).
#[cfg(any(feature = "dashboard", feature = "metrics"))]
pub(crate) async fn oldest_due(
    db: impl sqlx::PgExecutor<'_>,
) -> Result<Vec<(String, i64)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT queue, (EXTRACT(EPOCH FROM (now() - min(run_at))) * 1000)::bigint
         FROM pgflow.tasks
         WHERE claimed_by IS NULL AND NOT parked AND run_at <= now()
         GROUP BY queue",
    )
    .fetch_all(db)
    .await
}

/// Tasks of one queue, by state.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct QueueDepthRow {
    pub(crate) queue: String,
    pub(crate) available: i64,
    pub(crate) scheduled: i64,
    pub(crate) awaiting_signal: i64,
    pub(crate) awaiting_subflow: i64,
    pub(crate) running: i64,
}

/// Tasks per queue: due, due later, waiting for a signal (until it comes or their
/// timeout), waiting for a child run, claimed. Scans the queue table.
pub(crate) async fn depths(conn: &mut PgConnection) -> Result<Vec<QueueDepthRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT queue,
                count(*) FILTER (WHERE claimed_by IS NULL AND run_at <= now()) AS available,
                count(*) FILTER (WHERE claimed_by IS NULL AND run_at > now()
                                 AND waits_for IS NULL AND child_run_id IS NULL) AS scheduled,
                count(*) FILTER (WHERE claimed_by IS NULL AND run_at > now()
                                 AND waits_for IS NOT NULL) AS awaiting_signal,
                count(*) FILTER (WHERE claimed_by IS NULL AND run_at > now()
                                 AND child_run_id IS NOT NULL) AS awaiting_subflow,
                count(*) FILTER (WHERE claimed_by IS NOT NULL) AS running
         FROM pgflow.tasks
         GROUP BY queue
         ORDER BY queue",
    )
    .fetch_all(conn)
    .await
}

/// One task of a run, as tools show it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct RunTask {
    pub(crate) step: i16,
    /// For an element task of a map step: its index.
    pub(crate) element: Option<i32>,
    pub(crate) attempt: i32,
    pub(crate) claimed_by: Option<String>,
    pub(crate) claimed_at: Option<chrono::DateTime<chrono::Utc>>,
    pub(crate) errors: Option<String>,
    pub(crate) created_at: chrono::DateTime<chrono::Utc>,
    /// Waits for a signal the run does not have yet.
    pub(crate) awaits_signal: bool,
    /// The child run it started (a subflow) and waits for.
    pub(crate) child_run_id: Option<i64>,
}

/// The tasks of run `run_id`, oldest first (index `tasks_run_id`; a task waiting
/// for a signal looks its signal up by `signals_accepted`).
pub(crate) async fn of_run(
    conn: &mut PgConnection,
    run_id: i64,
) -> Result<Vec<RunTask>, sqlx::Error> {
    sqlx::query_as(
        "SELECT step, element, attempt, claimed_by, claimed_at, errors::text AS errors, created_at,
                t.waits_for IS NOT NULL AND t.claimed_by IS NULL
                AND NOT EXISTS (SELECT 1 FROM pgflow.signals g
                                WHERE g.run_id = t.run_id AND g.name = t.waits_for
                                  AND g.status = 'accepted') AS awaits_signal,
                child_run_id
         FROM pgflow.tasks t WHERE run_id = $1 ORDER BY id",
    )
    .bind(run_id)
    .fetch_all(conn)
    .await
}

/// Deletes every task of run `run_id` (index `tasks_run_id`): this waits for a flush
/// that holds one, and makes any later completion of an attempt still executing fail
/// its fence.
pub(crate) async fn delete_of_run(conn: &mut PgConnection, run_id: i64) -> Result<(), sqlx::Error> {
    // the concurrency slots and limit reservations their claims held go back with them
    let rows: Vec<(Option<String>, Option<String>, Option<String>)> = sqlx::query_as(
        "DELETE FROM pgflow.tasks WHERE run_id = $1
         RETURNING CASE WHEN holds_slot THEN queue END, CASE WHEN holds_slot THEN key END,
                   limit_holds::text",
    )
    .bind(run_id)
    .fetch_all(&mut *conn)
    .await?;
    let slots: Vec<(String, String)> = rows
        .iter()
        .filter_map(|(q, k, _)| Some((q.clone()?, k.clone()?)))
        .collect();
    let holds: Vec<(crate::store::limits::Hold, i64)> = rows
        .iter()
        .flat_map(|(_, _, h)| crate::store::limits::holds(h.as_deref()))
        .map(|h| (h, 0))
        .collect();
    crate::store::limits::settle(conn, &holds).await?;
    crate::store::slots::release(conn, &slots).await
}

/// How long a lease lasts, as the claim statement binds it.
pub(crate) fn lease_ms(timeout: std::time::Duration, grace: std::time::Duration) -> i64 {
    millis(timeout.saturating_add(grace))
}

/// Opens a connection of its own for claiming: claims need no fsync
/// (`synchronous_commit = off`: a claim lost in a crash only puts the task back, and
/// its completion would then fail the fence), and a claim never runs long, so a
/// statement timeout bounds a wait on a broken server (and so shutdown).
pub(crate) async fn claim_connection(pool: &sqlx::PgPool) -> Result<PgConnection, sqlx::Error> {
    use sqlx::Connection;
    let options = pool.connect_options();
    let connect = PgConnection::connect_with(&options);
    let mut conn = tokio::time::timeout(std::time::Duration::from_secs(10), connect)
        .await
        .map_err(|_| sqlx::Error::PoolTimedOut)??;
    sqlx::query("SET synchronous_commit = off")
        .execute(&mut conn)
        .await?;
    sqlx::query("SET statement_timeout = '30s'")
        .execute(&mut conn)
        .await?;
    // A queue table's statistics are stale more often than not: analyzed nearly
    // empty, it holds 100,000 tasks a second later (and the cached generic plan was
    // made for the empty one). The claim's plan is known: walk an index in claim
    // order, stop at the limit, reach everything else by primary key. Planned on
    // statistics of an empty table, it becomes a sequential scan of the queue (and of
    // `runs`), or a sort of every due task: 100-300 ms a claim instead of 1 (seen
    // here). On this connection, which sends nothing but claims, the planner keeps
    // to index paths whatever the statistics say.
    sqlx::query(CLAIM_PLANNER_SETTINGS)
        .execute(&mut conn)
        .await?;
    Ok(conn)
}

/// Advisory lock key under which one instance at a time rescues ("pgflow" in ASCII).
const RESCUE_LOCK: i64 = 0x7067_666c_6f77;

/// Takes the rescue lock for the caller's transaction: with `wait`, waits for it
/// (a takeover must surely give its dead predecessor's claims back); otherwise
/// returns false when another instance holds it (a periodic rescue skips the round).
pub(crate) async fn lock_rescue(conn: &mut PgConnection, wait: bool) -> Result<bool, sqlx::Error> {
    if wait {
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(RESCUE_LOCK)
            .execute(conn)
            .await?;
        Ok(true)
    } else {
        sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
            .bind(RESCUE_LOCK)
            .fetch_one(conn)
            .await
    }
}
