-- pgflow schema, version 13: fair claiming across run keys. A task carries its
-- run's key (the tenant or customer, `runs.key`; NULL for runs without one), and a
-- queue served fairly (`RuntimeBuilder::fair_queue`) claims round robin across the
-- keys that have due tasks, so one key's backlog does not delay another key's
-- trickle. Only tasks with a key enter the index (ordinary tasks cost it nothing).
-- Never edit once applied: add a migration.
ALTER TABLE pgflow.tasks ADD COLUMN key text;

CREATE INDEX tasks_available_by_key ON pgflow.tasks (queue, key, priority DESC, run_at, id)
    WHERE claimed_by IS NULL AND NOT parked AND key IS NOT NULL;
