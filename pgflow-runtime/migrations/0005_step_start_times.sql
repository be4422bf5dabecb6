-- pgflow schema, version 5: when each step (and each map element) started its
-- last attempt — the claim of the task that completed it — so a step's duration
-- excludes the time it waited in the queue. For the terminal step, whose output is
-- the run's, it is kept on the run. Nullable: rows written before stay as they are.
-- Never edit once applied: add a migration.
ALTER TABLE pgflow.step_states ADD COLUMN started_at timestamptz;
ALTER TABLE pgflow.step_elements ADD COLUMN started_at timestamptz;
ALTER TABLE pgflow.runs ADD COLUMN terminal_started_at timestamptz;
