-- Tasks by run: failing a run deletes its pending siblings inside the flush, and
-- cancel and retry delete a run's tasks; without this index each of those scans the
-- whole queue table.
CREATE INDEX tasks_run_id ON pgflow.tasks (run_id);
