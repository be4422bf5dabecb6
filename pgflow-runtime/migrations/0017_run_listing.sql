-- The run listing (the dashboard, `pgflow runs`) pages by keyset, newest first: one
-- index range per filter, whatever the size of the table. The columns indexed
-- never change after insert, so a run's completion stays a HOT update.
CREATE INDEX runs_workflow_id ON pgflow.runs (workflow, id);
CREATE INDEX runs_key_id ON pgflow.runs (key, id) WHERE key IS NOT NULL;
CREATE INDEX runs_idempotency_key_only ON pgflow.runs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
