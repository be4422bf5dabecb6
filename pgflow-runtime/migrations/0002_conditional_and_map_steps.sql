-- pgflow schema, version 2: conditional steps (`when`) and map steps (`map`).
-- Never edit once applied: add a migration.

-- A conditional step whose predicate was false is stored as 'skipped', with the
-- reason and no output (its children read SQL NULL and receive `None`). A map step
-- is 'running' while its elements run; `remaining` counts the elements still to
-- complete.
ALTER TABLE pgflow.step_states DROP CONSTRAINT step_states_status_check;
ALTER TABLE pgflow.step_states ADD CONSTRAINT step_states_status_check
    CHECK (status IN ('waiting', 'running', 'completed', 'skipped', 'failed'));
ALTER TABLE pgflow.step_states ADD COLUMN reason text;

-- A map step first runs as one task with `element` NULL, which splits the `Vec` it
-- maps over; then as one task per element, each carrying its index and its input
-- (`item`), so that no element task reads the whole vector. Both columns stay NULL
-- for every other task (adding them rewrites nothing).
ALTER TABLE pgflow.tasks ADD COLUMN element integer;
ALTER TABLE pgflow.tasks ADD COLUMN item jsonb;

-- The output of each completed element of a map step, and which instance ran it.
-- When the last element completes, the outputs are aggregated in element order into
-- the map step's `step_states.output` (or the run's output, for a terminal map step).
CREATE TABLE pgflow.step_elements (
    run_id       bigint      NOT NULL,
    step         smallint    NOT NULL,
    element      integer     NOT NULL,
    output       jsonb       NOT NULL,
    attempts     integer     NOT NULL DEFAULT 1,
    instance_id  text,
    completed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, step, element)
);

-- The step tables of the registered definitions, one row per step, for tools: kind
-- (`single`, `map`, `conditional`), the predicate of a conditional step and the
-- element parameter of a map step.
CREATE VIEW pgflow.workflow_steps AS
SELECT w.name AS workflow,
       w.version,
       (s.ord - 1)::int AS step,
       s.def ->> 'name' AS name,
       s.def ->> 'kind' AS kind,
       s.def ->> 'when' AS predicate,
       s.def #>> '{map,param}' AS map_param,
       ARRAY(SELECT jsonb_array_elements_text(s.def -> 'parents')) AS parents,
       s.def ->> 'output' AS output,
       (s.def ->> 'max_attempts')::int AS max_attempts,
       (s.def ->> 'timeout_ms')::bigint AS timeout_ms
FROM pgflow.workflows w,
     jsonb_array_elements(w.definition -> 'steps') WITH ORDINALITY AS s(def, ord);
