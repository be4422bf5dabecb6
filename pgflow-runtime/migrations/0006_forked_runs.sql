-- pgflow schema, version 6: forks. A run started by `fork` from another run records
-- which run (`forked_from`) and from which step (`forked_at`, the first step it ran
-- again); the steps upstream of it were copied from the original. NULL for every
-- other run (adding the columns rewrites nothing). Never edit once applied: add a
-- migration.
ALTER TABLE pgflow.runs ADD COLUMN forked_from bigint;
ALTER TABLE pgflow.runs ADD COLUMN forked_at text;

-- The forks of a run, for `pgflow run` (only forked runs are in the index).
CREATE INDEX runs_forked_from ON pgflow.runs (forked_from) WHERE forked_from IS NOT NULL;
