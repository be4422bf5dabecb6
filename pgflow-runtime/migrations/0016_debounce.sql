-- pgflow schema, version 16: debounced starts. A start with a debounce key
-- (`StartOptions::debounce`) joins the pending run of the same workflow and key —
-- one that has not started a step yet — replacing its input and pushing its start
-- back; only when none is pending does it start a new run, due after the window.
-- Never edit once applied: add a migration.
ALTER TABLE pgflow.runs ADD COLUMN debounce_key text;

CREATE INDEX runs_debounce_key ON pgflow.runs (workflow, debounce_key)
    WHERE debounce_key IS NOT NULL AND status = 'running';
