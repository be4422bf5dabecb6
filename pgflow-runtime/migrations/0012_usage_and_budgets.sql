-- pgflow schema, version 12: the usage ledger, run keys and budgets.
-- Never edit once applied: add a migration.

-- A run's key (`#[workflow(key = ..)]` or the start's own): the tenant, customer or
-- provider its usage is counted under. Its tokens (what its steps reported, next to
-- `cost_cents`), and its budget: a step is not started when its estimate would take
-- the run past it (`reserved_*`: what the steps running now reserved). All NULL
-- (= none, 0) for runs that use none of it: no rewrite, and nothing stored per row.
ALTER TABLE pgflow.runs ADD COLUMN key text;
ALTER TABLE pgflow.runs ADD COLUMN tokens_in bigint;
ALTER TABLE pgflow.runs ADD COLUMN tokens_out bigint;
ALTER TABLE pgflow.runs ADD COLUMN budget_cents bigint;
ALTER TABLE pgflow.runs ADD COLUMN budget_tokens bigint;
ALTER TABLE pgflow.runs ADD COLUMN reserved_cents bigint;
ALTER TABLE pgflow.runs ADD COLUMN reserved_tokens bigint;

-- What a claimed task reserved of its run's budget: released when its completion is
-- applied (fenced: once) or when a rescue gives the task back.
ALTER TABLE pgflow.tasks ADD COLUMN reserved_cents bigint;
ALTER TABLE pgflow.tasks ADD COLUMN reserved_tokens bigint;

-- The usage ledger: one row per step attempt and model that reported usage
-- (`ctx.add_usage`, `ctx.add_cost_cents` under model ''), written with the attempt's
-- completion — failed and retried attempts included: they were paid for.
CREATE TABLE pgflow.step_usage (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id      bigint      NOT NULL,
    workflow    text        NOT NULL,
    step        text        NOT NULL,
    element     integer,
    attempt     integer     NOT NULL,
    key         text,
    model       text        NOT NULL,
    tokens_in   bigint      NOT NULL,
    tokens_out  bigint      NOT NULL,
    cost_cents  bigint      NOT NULL,
    instance_id text,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX step_usage_run_id ON pgflow.step_usage (run_id);
-- `pgflow costs --since`: a window of recent rows.
CREATE INDEX step_usage_recorded_at ON pgflow.step_usage (recorded_at);

ALTER TABLE pgflow.archived_runs ADD COLUMN key text;
ALTER TABLE pgflow.archived_runs ADD COLUMN tokens_in bigint;
ALTER TABLE pgflow.archived_runs ADD COLUMN tokens_out bigint;

-- Finished runs, now with their key and tokens (new columns at the end).
CREATE OR REPLACE VIEW pgflow.job_results AS
SELECT r.workflow,
       r.instance_id,
       r.id AS run_id,
       CASE r.status WHEN 'succeeded' THEN 'success' ELSE 'failure' END AS status,
       r.input,
       r.output,
       r.error,
       (EXTRACT(EPOCH FROM (r.completed_at - GREATEST(r.created_at, r.run_at))) * 1000)::bigint
           AS duration_ms,
       r.cost_cents,
       r.created_at AS inserted_at,
       r.completed_at,
       r.key,
       COALESCE(r.tokens_in, 0) AS tokens_in,
       COALESCE(r.tokens_out, 0) AS tokens_out
FROM pgflow.runs r
WHERE r.status IN ('succeeded', 'failed');

-- An archived run keeps its usage rows: [{step, element, attempt, model, tokens_in,
-- tokens_out, cost_cents, recorded_at}].
ALTER TABLE pgflow.archived_runs ADD COLUMN usage jsonb;
