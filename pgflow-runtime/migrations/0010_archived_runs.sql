-- pgflow schema, version 10: retention. Finished runs older than a configured age
-- are pruned in small batches (their step states and map elements with them); a
-- runtime or `pgflow prune --archive` may move them here instead of deleting them:
-- one row per run, its steps as one JSON array. Nothing reads this table on the hot
-- path. Never edit once applied: add a migration.
CREATE TABLE pgflow.archived_runs (
    id              bigint      PRIMARY KEY,
    workflow        text        NOT NULL,
    version         integer     NOT NULL,
    status          text        NOT NULL,
    input           jsonb       NOT NULL,
    output          jsonb,
    error           jsonb,
    idempotency_key text,
    cost_cents      bigint      NOT NULL,
    instance_id     text,
    forked_from     bigint,
    created_at      timestamptz NOT NULL,
    completed_at    timestamptz,
    -- [{step, status, attempts, output, errors, reason, started_at, completed_at,
    --   elements: [{element, output, attempts, started_at, completed_at}] | null}]
    steps           jsonb       NOT NULL,
    archived_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX archived_runs_workflow ON pgflow.archived_runs (workflow, completed_at);
