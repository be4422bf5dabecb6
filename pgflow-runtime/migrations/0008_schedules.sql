-- pgflow schema, version 8: cron schedules. One row per schedule name, upserted by
-- every runtime that registers the schedule in code (`RuntimeBuilder::schedule`) when
-- it starts; the row is the schedule's truth for every instance (the expression, time
-- zone and missed-tick policy of the last instance that started with a changed
-- definition), and `next_tick` is its durable deadline: a scheduler that finds it
-- due locks the row (`FOR UPDATE SKIP LOCKED`), starts the tick's run with the
-- idempotency key `schedule:<name>:<tick in RFC 3339, UTC>` and moves `next_tick`
-- on, in one transaction. So each tick starts one run however many instances
-- run the schedule, and a restart of every instance loses no tick beyond what the
-- missed-tick policy says. Removing a schedule deletes its row (an instance that
-- registers it in code puts it back when it next starts). Never edit once applied:
-- add a migration.
CREATE TABLE pgflow.schedules (
    name        text        PRIMARY KEY,
    -- The workflow each tick starts (the version is that of the instance firing it).
    workflow    text        NOT NULL,
    -- The cron expression (5, 6 or 7 fields: optional seconds first, optional year
    -- last) and the IANA time zone it is read in.
    cron        text        NOT NULL,
    time_zone   text        NOT NULL DEFAULT 'UTC',
    -- What happens to ticks that passed while no instance could fire them.
    missed      text        NOT NULL DEFAULT 'run_once'
                CHECK (missed IN ('skip', 'run_once', 'run_each')),
    -- Under 'skip': how late a tick may still start its run.
    grace_ms    bigint      NOT NULL DEFAULT 60000 CHECK (grace_ms >= 0),
    -- The next tick to fire (NULL: the expression has no tick left, e.g. a past year).
    next_tick   timestamptz,
    -- The last tick that started a run, and that run.
    last_tick   timestamptz,
    last_run_id bigint,
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- When an instance last changed the definition (expression, zone, policy, workflow).
    updated_at  timestamptz NOT NULL DEFAULT now()
);
