-- pgflow schema, version 14: concurrency limits per run key. A queue served with a
-- key limit (`RuntimeBuilder::key_concurrency`) runs at most that many tasks of one
-- key at once, across every instance: `key_slots` counts the tasks of each (queue,
-- key) holding a slot; a claim takes slots in its own transaction (locking the
-- counters, so instances claiming the same key queue up) and gives back what it
-- could not get; ending a claim (completion, retry, rescue) releases its slot,
-- fenced on the task row's `holds_slot`. Never edit once applied: add a migration.
CREATE TABLE pgflow.key_slots (
    queue   text    NOT NULL,
    key     text    NOT NULL,
    running integer NOT NULL DEFAULT 0 CHECK (running >= 0),
    PRIMARY KEY (queue, key)
);

ALTER TABLE pgflow.tasks ADD COLUMN holds_slot boolean;
