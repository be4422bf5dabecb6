//! Phases 2 to 8 of the flush: the statements that write what the fenced
//! completions amount to (see the parent module for the order and why).

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::Completion;
use crate::catalog::{Catalog, Entry};
use crate::store::StepState;
use crate::store::step_index;
use crate::store::tasks::NewTasks;

/// Element completions of map steps, as bind arrays.
#[derive(Default)]
pub(super) struct ElementRows<'c> {
    pub(super) flows: HashMap<(i64, i16), &'c Entry>,
    pub(super) run_ids: Vec<i64>,
    pub(super) steps: Vec<i16>,
    pub(super) elements: Vec<i32>,
    pub(super) outputs: Vec<&'c str>,
    pub(super) attempts: Vec<i32>,
    pub(super) started: Vec<Option<DateTime<Utc>>>,
}

impl<'c> ElementRows<'c> {
    pub(super) fn push(
        &mut self,
        flow: &'c Entry,
        c: &Completion,
        element: i32,
        output: &'c str,
        started_at: Option<DateTime<Utc>>,
    ) {
        self.started.push(started_at);
        self.flows.insert((c.run_id, c.step), flow);
        self.run_ids.push(c.run_id);
        self.steps.push(c.step);
        self.elements.push(element);
        self.outputs.push(output);
        self.attempts.push(c.attempt);
    }
}

/// Phase 2: stores the elements' outputs and counts down their map steps; returns
/// the map steps whose last element completed (now `completed`).
pub(super) async fn complete_elements<'c>(
    conn: &mut PgConnection,
    instance: &str,
    rows: &ElementRows<'c>,
) -> Result<Vec<(&'c Entry, i64, i16)>, sqlx::Error> {
    if rows.run_ids.is_empty() {
        return Ok(Vec::new());
    }
    // Rows are locked in (run_id, step) order so that two instances counting down
    // the same map steps cannot deadlock. Both tables are reached by their primary
    // keys (`step_elements (run_id, step, element)`, `step_states (run_id, step)`).
    // A map step that failed (status no longer `running`) counts nothing.
    let counted: Vec<(i64, i16, i32)> = sqlx::query_as(
        "WITH ins AS (
             INSERT INTO pgflow.step_elements
                 (run_id, step, element, output, attempts, instance_id, started_at)
             SELECT u.run_id, u.step, u.element, u.output::jsonb, u.attempts, $6, u.started_at
             FROM unnest($1::bigint[], $2::smallint[], $3::int[], $4::text[], $5::int[],
                         $7::timestamptz[])
                  AS u(run_id, step, element, output, attempts, started_at)
             ON CONFLICT (run_id, step, element) DO NOTHING
             RETURNING run_id, step
         ), d AS (
             SELECT run_id, step, count(*)::int AS n FROM ins GROUP BY run_id, step
         ), locked AS (
             SELECT s.run_id, s.step FROM pgflow.step_states s
             JOIN d USING (run_id, step)
             WHERE s.status = 'running'
             ORDER BY s.run_id, s.step
             FOR UPDATE OF s
         )
         UPDATE pgflow.step_states s
         SET remaining = s.remaining - d.n,
             status = CASE WHEN s.remaining = d.n THEN 'completed' ELSE s.status END,
             completed_at = CASE WHEN s.remaining = d.n THEN now() END
         FROM d JOIN locked USING (run_id, step)
         WHERE s.run_id = d.run_id AND s.step = d.step
         RETURNING s.run_id, s.step, s.remaining",
    )
    .bind(&rows.run_ids)
    .bind(&rows.steps)
    .bind(&rows.elements)
    .bind(&rows.outputs)
    .bind(&rows.attempts)
    .bind(instance)
    .bind(&rows.started)
    .fetch_all(&mut *conn)
    .await?;
    Ok(counted
        .into_iter()
        .filter(|&(_, _, remaining)| remaining == 0)
        .filter_map(|(run_id, step, _)| {
            let flow = rows.flows.get(&(run_id, step))?;
            Some((*flow, run_id, step))
        })
        .collect())
}

/// One row of the step-state upsert.
pub(super) struct StepStateRow<'c> {
    pub(super) run_id: i64,
    pub(super) step: i16,
    pub(super) state: StepState,
    pub(super) attempts: i32,
    pub(super) output: Option<&'c str>,
    /// The output is the aggregate of the map step's elements.
    pub(super) from_elements: bool,
    pub(super) errors: Option<String>,
    pub(super) reason: Option<&'c str>,
    pub(super) started_at: Option<DateTime<Utc>>,
}

/// Step states to upsert, as bind arrays: one row per (run, step), since an upsert
/// may not touch a row twice (two failed elements of one map step fail the same
/// step).
#[derive(Default)]
pub(super) struct StepStateRows<'c> {
    pub(super) seen: HashSet<(i64, i16)>,
    pub(super) run_ids: Vec<i64>,
    pub(super) steps: Vec<i16>,
    pub(super) states: Vec<&'static str>,
    pub(super) attempts: Vec<i32>,
    pub(super) outputs: Vec<Option<&'c str>>,
    pub(super) from_elements: Vec<bool>,
    pub(super) errors: Vec<Option<String>>,
    pub(super) reasons: Vec<Option<&'c str>>,
    pub(super) started: Vec<Option<DateTime<Utc>>>,
}

impl<'c> StepStateRows<'c> {
    pub(super) fn push(&mut self, row: StepStateRow<'c>) {
        if !self.seen.insert((row.run_id, row.step)) {
            return;
        }
        self.run_ids.push(row.run_id);
        self.steps.push(row.step);
        self.states.push(row.state.as_str());
        self.attempts.push(row.attempts);
        self.outputs.push(row.output);
        self.from_elements.push(row.from_elements);
        self.errors.push(row.errors);
        self.reasons.push(row.reason);
        self.started.push(row.started_at);
    }
}

/// Phase 3: upserts step states (by primary key). A map step's output is its
/// elements' outputs in element order, aggregated here (primary key of
/// `step_elements`).
pub(super) async fn store_step_states(
    conn: &mut PgConnection,
    instance: &str,
    rows: &StepStateRows<'_>,
) -> Result<(), sqlx::Error> {
    if rows.run_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO pgflow.step_states
             (run_id, step, status, attempts, output, errors, reason, instance_id, completed_at,
              started_at)
         SELECT u.run_id, u.step, u.status, u.attempts,
                -- CASE evaluates the aggregates only for a map step (no cost for the
                -- others, the common case)
                CASE WHEN u.from_elements
                     THEN (SELECT jsonb_agg(e.output ORDER BY e.element)
                           FROM pgflow.step_elements e
                           WHERE e.run_id = u.run_id AND e.step = u.step)
                     ELSE u.output::jsonb END,
                u.errors::jsonb, u.reason, $9, now(),
                CASE WHEN u.from_elements
                     THEN (SELECT min(e.started_at) FROM pgflow.step_elements e
                           WHERE e.run_id = u.run_id AND e.step = u.step)
                     ELSE u.started_at END
         FROM unnest($1::bigint[], $2::smallint[], $3::text[], $4::int[], $5::text[], $6::text[],
                     $7::text[], $8::bool[], $10::timestamptz[])
              AS u(run_id, step, status, attempts, output, errors, reason, from_elements,
                   started_at)
         ON CONFLICT (run_id, step) DO UPDATE
         SET status = EXCLUDED.status, attempts = EXCLUDED.attempts, output = EXCLUDED.output,
             errors = EXCLUDED.errors, reason = EXCLUDED.reason,
             instance_id = EXCLUDED.instance_id, completed_at = EXCLUDED.completed_at,
             started_at = EXCLUDED.started_at",
    )
    .bind(&rows.run_ids)
    .bind(&rows.steps)
    .bind(&rows.states)
    .bind(&rows.attempts)
    .bind(&rows.outputs)
    .bind(&rows.errors)
    .bind(&rows.reasons)
    .bind(&rows.from_elements)
    .bind(instance)
    .bind(&rows.started)
    .execute(conn)
    .await?;
    Ok(())
}

/// Parents of joins completed in this flush.
#[derive(Default)]
pub(super) struct JoinHits {
    pub(super) run_ids: Vec<i64>,
    pub(super) steps: Vec<i16>,
}

/// Phase 4: counts down the joins (by primary key of `step_states`, the run by its
/// own); those at zero become ready.
pub(super) async fn count_down_joins(
    conn: &mut PgConnection,
    catalog: &Catalog,
    hits: &JoinHits,
    ready: &mut NewTasks<'static>,
) -> Result<(), sqlx::Error> {
    if hits.run_ids.is_empty() {
        return Ok(());
    }
    #[derive(sqlx::FromRow)]
    struct Counted {
        run_id: i64,
        step: i16,
        remaining: i32,
        workflow: String,
        version: i32,
    }
    // Two parents completing in one batch count down twice: group first.
    let rows: Vec<Counted> = sqlx::query_as(
        "WITH d AS (
             SELECT run_id, step, count(*)::int AS n
             FROM unnest($1::bigint[], $2::smallint[]) AS u(run_id, step)
             GROUP BY run_id, step
         )
         UPDATE pgflow.step_states s SET remaining = s.remaining - d.n
         FROM d, pgflow.runs r
         WHERE s.run_id = d.run_id AND s.step = d.step AND s.status = 'waiting'
           AND r.id = s.run_id
         RETURNING s.run_id, s.step, s.remaining, r.workflow, r.version",
    )
    .bind(&hits.run_ids)
    .bind(&hits.steps)
    .fetch_all(conn)
    .await?;
    for r in rows.into_iter().filter(|r| r.remaining == 0) {
        if let (Some(flow), Some(step)) = (catalog.get(&r.workflow, r.version), step_index(r.step))
        {
            ready.push(flow, r.run_id, step);
        }
    }
    Ok(())
}

/// Runs whose terminal step is done.
#[derive(Default)]
pub(super) struct FinishedRuns<'c> {
    pub(super) run_ids: Vec<i64>,
    /// The output; `None` when it is aggregated from a terminal map step's elements.
    pub(super) outputs: Vec<Option<&'c str>>,
    /// The terminal map step whose elements make the output.
    pub(super) from_elements: Vec<Option<i16>>,
    pub(super) costs: Vec<i64>,
    pub(super) started: Vec<Option<DateTime<Utc>>>,
}

impl<'c> FinishedRuns<'c> {
    pub(super) fn push(
        &mut self,
        run_id: i64,
        output: Option<&'c str>,
        from: Option<i16>,
        cost: i64,
        started_at: Option<DateTime<Utc>>,
    ) {
        self.started.push(started_at);
        self.run_ids.push(run_id);
        self.outputs.push(output);
        self.from_elements.push(from);
        self.costs.push(cost);
    }
}

/// A run that finished in this flush.
#[derive(Debug)]
pub(super) struct Ended {
    pub(super) id: i64,
    /// It is a child run (a subflow): its parent's task waits for it.
    pub(super) has_parent: bool,
}

crate::store::by_position!(Ended { id, has_parent });

/// Phase 6: runs still `running` succeed with their output (by primary key).
pub(super) async fn finish_runs(
    conn: &mut PgConnection,
    instance: &str,
    runs: &FinishedRuns<'_>,
) -> Result<Vec<Ended>, sqlx::Error> {
    if runs.run_ids.is_empty() {
        return Ok(Vec::new());
    }
    let query = sqlx::query(
        "UPDATE pgflow.runs r
         SET status = 'succeeded', completed_at = now(), instance_id = $5,
             cost_cents = r.cost_cents + u.cost,
             output = CASE WHEN u.from_elements IS NULL THEN u.output::jsonb
                           ELSE (SELECT jsonb_agg(e.output ORDER BY e.element)
                                 FROM pgflow.step_elements e
                                 WHERE e.run_id = u.id AND e.step = u.from_elements) END,
             terminal_started_at = CASE WHEN u.from_elements IS NULL THEN u.started_at
                                        ELSE (SELECT min(e.started_at) FROM pgflow.step_elements e
                                              WHERE e.run_id = u.id AND e.step = u.from_elements)
                                        END
         FROM unnest($1::bigint[], $2::text[], $3::smallint[], $4::bigint[], $6::timestamptz[])
              AS u(id, output, from_elements, cost, started_at)
         WHERE r.id = u.id AND r.status = 'running'
         RETURNING r.id, r.parent_run_id IS NOT NULL AS has_parent",
    )
    .bind(&runs.run_ids)
    .bind(&runs.outputs)
    .bind(&runs.from_elements)
    .bind(&runs.costs)
    .bind(instance)
    .bind(&runs.started);
    crate::store::fetch_by_position(query, conn).await
}

/// Runs that fail in this flush.
#[derive(Default)]
pub(super) struct FailedRuns {
    pub(super) run_ids: Vec<i64>,
    pub(super) errors: Vec<String>,
    pub(super) costs: Vec<i64>,
}

impl FailedRuns {
    pub(super) fn push(&mut self, run_id: i64, error: String, cost: i64) {
        self.run_ids.push(run_id);
        self.errors.push(error);
        self.costs.push(cost);
    }
}

/// Phase 7: runs still `running` fail with their error; their pending tasks are
/// deleted (index `tasks_run_id`) so pending siblings never start, while running
/// ones finish into a failed run.
pub(super) async fn fail_runs(
    conn: &mut PgConnection,
    instance: &str,
    runs: &FailedRuns,
) -> Result<Vec<Ended>, sqlx::Error> {
    if runs.run_ids.is_empty() {
        return Ok(Vec::new());
    }
    let query = sqlx::query(
        "WITH f AS (
             UPDATE pgflow.runs r
             SET status = 'failed', error = u.error::jsonb, completed_at = now(),
                 instance_id = $4, cost_cents = r.cost_cents + u.cost
             FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(id, error, cost)
             WHERE r.id = u.id AND r.status = 'running'
             RETURNING r.id, r.parent_run_id IS NOT NULL AS has_parent
         ), gone AS (
             DELETE FROM pgflow.tasks t USING f
             WHERE t.run_id = f.id AND t.claimed_by IS NULL
         )
         SELECT id, has_parent FROM f",
    )
    .bind(&runs.run_ids)
    .bind(&runs.errors)
    .bind(&runs.costs)
    .bind(instance);
    crate::store::fetch_by_position(query, conn).await
}

/// What a flush adds to a run besides what finishing or failing it adds: the cost of
/// attempts that did not finish it, tokens, and reservations released.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Settle {
    pub(super) cents: i64,
    pub(super) tokens_in: i64,
    pub(super) tokens_out: i64,
    pub(super) release_cents: i64,
    pub(super) release_tokens: i64,
}

impl Settle {
    fn is_zero(&self) -> bool {
        self.cents == 0
            && self.tokens_in == 0
            && self.tokens_out == 0
            && self.release_cents == 0
            && self.release_tokens == 0
    }
}

/// Phase 8: adds costs and tokens, and releases reservations (by primary key). Runs
/// that only count cost take the lean statement.
pub(super) async fn add_costs(
    conn: &mut PgConnection,
    mut costs: foldhash::HashMap<i64, Settle>,
) -> Result<(), sqlx::Error> {
    costs.retain(|_, c| !c.is_zero());
    if costs.is_empty() {
        return Ok(());
    }
    let cents_only = costs.values().all(|c| {
        c.tokens_in == 0 && c.tokens_out == 0 && c.release_cents == 0 && c.release_tokens == 0
    });
    let mut ids = Vec::with_capacity(costs.len());
    let mut cents = Vec::with_capacity(costs.len());
    let mut rest: [Vec<i64>; 4] = Default::default();
    // in id order: two flushes touching the same runs lock them in one order
    let mut costs: Vec<(i64, Settle)> = costs.into_iter().collect();
    costs.sort_unstable_by_key(|(id, _)| *id);
    for (id, c) in costs {
        ids.push(id);
        cents.push(c.cents);
        for (column, v) in
            rest.iter_mut()
                .zip([c.tokens_in, c.tokens_out, c.release_cents, c.release_tokens])
        {
            column.push(v);
        }
    }
    if cents_only {
        sqlx::query(
            "UPDATE pgflow.runs r SET cost_cents = r.cost_cents + u.cost
             FROM unnest($1::bigint[], $2::bigint[]) AS u(id, cost) WHERE r.id = u.id",
        )
        .bind(&ids)
        .bind(&cents)
        .execute(conn)
        .await?;
        return Ok(());
    }
    let [tokens_in, tokens_out, release_cents, release_tokens] = rest;
    sqlx::query(
        "UPDATE pgflow.runs r
         SET cost_cents = r.cost_cents + u.cost,
             tokens_in = CASE WHEN u.tin = 0 THEN r.tokens_in
                              ELSE COALESCE(r.tokens_in, 0) + u.tin END,
             tokens_out = CASE WHEN u.tout = 0 THEN r.tokens_out
                               ELSE COALESCE(r.tokens_out, 0) + u.tout END,
             reserved_cents = CASE WHEN u.rc = 0 THEN r.reserved_cents
                                   ELSE GREATEST(COALESCE(r.reserved_cents, 0) - u.rc, 0) END,
             reserved_tokens = CASE WHEN u.rt = 0 THEN r.reserved_tokens
                                    ELSE GREATEST(COALESCE(r.reserved_tokens, 0) - u.rt, 0) END
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                     $6::bigint[]) AS u(id, cost, tin, tout, rc, rt)
         WHERE r.id = u.id",
    )
    .bind(&ids)
    .bind(&cents)
    .bind(&tokens_in)
    .bind(&tokens_out)
    .bind(&release_cents)
    .bind(&release_tokens)
    .execute(conn)
    .await?;
    Ok(())
}

/// Usage ledger rows, as bind arrays: one per attempt and model.
#[derive(Default)]
pub(super) struct UsageRows {
    run_ids: Vec<i64>,
    steps: Vec<&'static str>,
    elements: Vec<Option<i32>>,
    attempts: Vec<i32>,
    models: Vec<String>,
    tokens_in: Vec<i64>,
    tokens_out: Vec<i64>,
    cents: Vec<i64>,
}

impl UsageRows {
    pub(super) fn push(&mut self, c: &Completion, step: &'static str) {
        for u in &c.usage {
            self.run_ids.push(c.run_id);
            self.steps.push(step);
            self.elements.push(c.element);
            self.attempts.push(c.attempt);
            self.models.push(u.model.clone());
            self.tokens_in
                .push(i64::try_from(u.tokens_in).unwrap_or(i64::MAX));
            self.tokens_out
                .push(i64::try_from(u.tokens_out).unwrap_or(i64::MAX));
            self.cents.push(u.cost_cents);
        }
    }
}

/// Writes the usage ledger rows (each with its run's workflow and key, by primary
/// key of `runs`).
pub(super) async fn record_usage(
    conn: &mut PgConnection,
    instance: &str,
    rows: &UsageRows,
) -> Result<(), sqlx::Error> {
    if rows.run_ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "INSERT INTO pgflow.step_usage (run_id, workflow, step, element, attempt, key, model,
                                        tokens_in, tokens_out, cost_cents, instance_id)
         SELECT u.run_id, r.workflow, u.step, u.element, u.attempt, r.key, u.model, u.tin,
                u.tout, u.cents, $9
         FROM unnest($1::bigint[], $2::text[], $3::int[], $4::int[], $5::text[], $6::bigint[],
                     $7::bigint[], $8::bigint[])
              WITH ORDINALITY AS u(run_id, step, element, attempt, model, tin, tout, cents, ord)
         JOIN pgflow.runs r ON r.id = u.run_id
         ORDER BY u.ord",
    )
    .bind(&rows.run_ids)
    .bind(&rows.steps)
    .bind(&rows.elements)
    .bind(&rows.attempts)
    .bind(&rows.models)
    .bind(&rows.tokens_in)
    .bind(&rows.tokens_out)
    .bind(&rows.cents)
    .bind(instance)
    .execute(conn)
    .await?;
    Ok(())
}
