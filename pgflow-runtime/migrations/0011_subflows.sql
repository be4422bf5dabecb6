-- pgflow schema, version 11: subflows. A step returning `Subflow<W>` starts a child
-- run of `W`, linked to its parent: the parent run, the name of the parent's step
-- and, for a map step, the element (NULL for every other run: adding the columns
-- rewrites nothing). The parent's task stays in the queue, parked (out of the
-- claim's index, due 'infinity') with the child's id in `child_run_id`, until the
-- child finishes: the transaction that finishes, fails or cancels the child makes
-- the parent's task due, and the parent's step completes from the child's stored
-- output (or fails with its error). Never edit once applied: add a migration.
ALTER TABLE pgflow.runs ADD COLUMN parent_run_id bigint;
ALTER TABLE pgflow.runs ADD COLUMN parent_step text;
ALTER TABLE pgflow.runs ADD COLUMN parent_element integer;

-- The children of a run: cancel cascades, `pgflow run` draws the tree.
CREATE INDEX runs_parent_run_id ON pgflow.runs (parent_run_id) WHERE parent_run_id IS NOT NULL;

ALTER TABLE pgflow.tasks ADD COLUMN child_run_id bigint;

-- The parent task waiting for a child: found when the child finishes.
CREATE INDEX tasks_child_run_id ON pgflow.tasks (child_run_id) WHERE child_run_id IS NOT NULL;

ALTER TABLE pgflow.archived_runs ADD COLUMN parent_run_id bigint;
