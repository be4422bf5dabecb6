-- pgflow schema, version 1. Applied by pgflow-runtime at start (MIGRATOR) or with
-- `sqlx migrate run --source migrations`. Never edit once applied: add a migration.

CREATE SCHEMA IF NOT EXISTS pgflow;

-- Every (name, version) a runtime has registered, with its step table as JSON
-- (`WorkflowDef::describe`): a changed definition under the same version is refused.
CREATE TABLE pgflow.workflows (
    name          text        NOT NULL,
    version       integer     NOT NULL,
    definition    jsonb       NOT NULL,
    registered_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, version)
);

-- One row per run: its input, and once finished its output or error, cost, the
-- instance that finished it and when. Updated when the run finishes (and when a step
-- reports a cost); fillfactor leaves room for those updates to stay HOT.
CREATE TABLE pgflow.runs (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    workflow        text        NOT NULL,
    version         integer     NOT NULL,
    status          text        NOT NULL DEFAULT 'running'
                    CHECK (status IN ('running', 'succeeded', 'failed', 'cancelled')),
    input           jsonb       NOT NULL,
    output          jsonb,
    error           jsonb,
    idempotency_key text,
    priority        smallint    NOT NULL DEFAULT 0,
    cost_cents      bigint      NOT NULL DEFAULT 0,
    instance_id     text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    run_at          timestamptz NOT NULL DEFAULT now(),
    completed_at    timestamptz
) WITH (fillfactor = 80);

-- The second start with the same key returns the first run.
CREATE UNIQUE INDEX runs_idempotency_key ON pgflow.runs (workflow, idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- The durable state of steps: the output of every completed non-terminal step (what
-- its children read), failed steps with their error history, and for steps with
-- several parents a 'waiting' row created at start whose `remaining` counts the
-- parents still to complete.
CREATE TABLE pgflow.step_states (
    run_id       bigint      NOT NULL,
    step         smallint    NOT NULL,
    status       text        NOT NULL CHECK (status IN ('waiting', 'completed', 'failed')),
    remaining    integer     NOT NULL DEFAULT 0,
    attempts     integer     NOT NULL DEFAULT 0,
    output       jsonb,
    errors       jsonb,
    instance_id  text,
    completed_at timestamptz,
    PRIMARY KEY (run_id, step)
) WITH (fillfactor = 90);

-- The hot queue: one row per step attempt that is ready or running. A row leaves the
-- table when its step completes or fails for good; a retry puts it back with a later
-- run_at. claim_token fences completions: a completion only applies if the row still
-- carries the token of the claim that produced it.
CREATE TABLE pgflow.tasks (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       bigint      NOT NULL,
    step         smallint    NOT NULL,
    workflow     text        NOT NULL,
    version      integer     NOT NULL,
    queue        text        NOT NULL,
    priority     smallint    NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    attempt      integer     NOT NULL DEFAULT 1,
    max_attempts integer     NOT NULL,
    errors       jsonb,
    claimed_by   text,
    claim_token  bigint,
    claimed_at   timestamptz,
    lease_until  timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now()
) WITH (
    fillfactor = 70,
    autovacuum_vacuum_scale_factor = 0.0,
    autovacuum_vacuum_threshold = 5000,
    autovacuum_vacuum_insert_scale_factor = 0.0,
    autovacuum_vacuum_insert_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0,
    autovacuum_analyze_scale_factor = 0.0,
    autovacuum_analyze_threshold = 5000
);

-- The claim query walks this index in claim order; claimed rows drop out of it.
CREATE INDEX tasks_available ON pgflow.tasks (queue, priority DESC, run_at, id)
    WHERE claimed_by IS NULL;

-- Claimed rows by lease expiry: what the rescuer scans.
CREATE INDEX tasks_leased ON pgflow.tasks (lease_until) WHERE claimed_by IS NOT NULL;

-- One row per runtime instance (heartbeats and recovery build on it).
CREATE TABLE pgflow.instances (
    id             text        PRIMARY KEY,
    host           text        NOT NULL,
    pid            integer     NOT NULL,
    queues         jsonb       NOT NULL DEFAULT '{}',
    capacity       integer     NOT NULL DEFAULT 0,
    load           integer     NOT NULL DEFAULT 0,
    status         text        NOT NULL DEFAULT 'online' CHECK (status IN ('online', 'offline')),
    started_at     timestamptz NOT NULL DEFAULT now(),
    last_heartbeat timestamptz NOT NULL DEFAULT now()
);

-- Finished runs, in the shape the reference's monitoring queries read.
CREATE VIEW pgflow.job_results AS
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
       r.completed_at
FROM pgflow.runs r
WHERE r.status IN ('succeeded', 'failed');
