-- pgflow schema, version 7: tasks that are not due soon are "parked", out of the
-- claim's index, so that claims of ready work never walk past them (100,000 runs
-- waiting on a delay cost an idle claim nothing). A task is parked when it is
-- enqueued (or put back) due more than a second ahead: a step `delay`, a start's
-- `run_at`, a long retry backoff, a snooze. Every instance promotes the parked
-- tasks that are about to be due (index `tasks_parked`) back into `tasks_available`.
-- `snoozes` counts a task's snoozes (they do not count as attempts).
-- Never edit once applied: add a migration.
ALTER TABLE pgflow.tasks ADD COLUMN parked boolean NOT NULL DEFAULT false;
ALTER TABLE pgflow.tasks ADD COLUMN snoozes integer NOT NULL DEFAULT 0;

-- Tasks already waiting for a time more than a second ahead are parked now.
UPDATE pgflow.tasks SET parked = true
WHERE claimed_by IS NULL AND run_at > now() + interval '1 second';

CREATE INDEX tasks_available_unparked ON pgflow.tasks (queue, priority DESC, run_at, id)
    WHERE claimed_by IS NULL AND NOT parked;
DROP INDEX pgflow.tasks_available;
ALTER INDEX pgflow.tasks_available_unparked RENAME TO tasks_available;

CREATE INDEX tasks_parked ON pgflow.tasks (run_at) WHERE parked;
